"""Corpora -> Ray Datasets of preprocessed bytes -> packed "transposed" training windows.

Names load lazily: Ray Data tasks import ``sentdisc.data.readers`` only, and should not pay
for torch (which the packer needs) in every worker process.
"""
import importlib

_EXPORTS = {
    "BytePacker": "packer", "Window": "packer",
    "DataConfig": "readers", "DataError": "readers", "as_data_error": "readers",
    "build_datasets": "readers", "read_dataset": "readers",
    "resolve_paths": "readers",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"sentdisc.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'sentdisc.data' has no attribute {name!r}")
