"""Labeled sets for transfer (SST-2, the Amazon-Blitzer and IMDB CSVs): small, read in process."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from sentdisc.data.readers import _EXT_FORMATS, DataError


def read_table(path: str, text_key: str, label_key: Optional[str] = None,
               data_format: str = "auto", delim: Optional[str] = None):
    """A small labeled set, read in process -> pandas DataFrame with 'text' (+ 'label').

    For transfer (SST-2, the Blitzer CSVs): CSV/TSV/JSON/loose JSON/Parquet. A row whose text
    is null or empty is an error naming the row; a missing column lists the columns found.
    Missing labels are passed on (null / "") for the caller to drop or reject.
    """
    import pandas as pd

    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    fmt = data_format
    if fmt == "auto":
        ext = os.path.splitext(path.lower())[1]
        fmt = _EXT_FORMATS.get(ext, "json" if ext == ".json" else "csv")
    try:
        if fmt in ("csv", "tsv"):
            sep = delim or ("\t" if fmt == "tsv" else ",")
            df = pd.read_csv(path, sep=sep, dtype={text_key: str}, keep_default_na=False,
                             encoding="utf-8")
        elif fmt in ("json", "loose_json"):
            with open(path, "rb") as f:
                head = f.read(4096).lstrip()
            df = pd.read_json(path, lines=not head.startswith(b"["), dtype=False)
        elif fmt == "parquet":
            df = pd.read_parquet(path)
        else:
            raise DataError(f"{path}: read_table reads csv/tsv/json/loose_json/parquet, not {fmt!r}")
    except DataError:
        raise
    except (ValueError, UnicodeDecodeError, OSError, pd.errors.ParserError) as e:
        raise DataError(f"{path}: cannot read as {fmt}: {e}") from None
    cols = [str(c) for c in df.columns]
    for key in (text_key, label_key):
        if key and key not in df.columns:
            raise DataError(f"{path}: no column {key!r} (columns: {', '.join(cols)})")
    out = pd.DataFrame({"text": df[text_key]})
    if label_key:
        out["label"] = df[label_key].values
    bad = out["text"].isna().to_numpy() | out["text"].astype(str).str.strip().eq("").to_numpy()
    if bad.any():  # a labeled set is small and precious: name the row rather than drop it
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: row {i + 1}: empty {text_key!r}")
    out["text"] = out["text"].astype(str)
    return out.reset_index(drop=True)
