"""Corpora -> Ray Datasets of preprocessed bytes -> packed "transposed" training windows."""
from sentdisc.data.packer import BytePacker, Window
from sentdisc.data.readers import (DataConfig, DataError, as_data_error, build_datasets,
                                   read_dataset, read_table, resolve_paths)

__all__ = ["BytePacker", "Window", "DataConfig", "DataError", "as_data_error", "build_datasets",
           "read_dataset", "read_table", "resolve_paths"]
