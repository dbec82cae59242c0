"""Corpora -> Ray Datasets of preprocessed bytes -> packed "transposed" training windows.

Names load lazily: Ray Data tasks import the reading modules only, and should not pay for
torch (which the packer needs) in every worker process.
"""
import importlib

_EXPORTS = {
    "BytePacker": "packer", "Window": "packer",
    "DataConfig": "config", "DataError": "config", "REASONS": "config",
    "as_data_error": "readers", "build_datasets": "readers", "read_dataset": "readers",
    "list_corpus": "paths", "resolve_paths": "paths",
    "survey": "readers", "synthesize": "synth",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"sentdisc.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'sentdisc.data' has no attribute {name!r}")
