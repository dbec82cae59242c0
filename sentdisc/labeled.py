"""Labeled sets for transfer (SST-2, the Amazon-Blitzer and IMDB CSVs): small, read in process.

``read_table`` reads one table; ``prepare_data`` turns a ``LabeledDataConfig`` into the train /
val / test ``LabeledSet``s of a transfer run: labels checked to be 0/1 (or ratings binarized
at the scale's midpoint), unlabeled rows rejected or dropped, seeded subsets, and a seeded
validation split off train when no validation file is given.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

import numpy as np

from sentdisc import storage
from sentdisc.data.readers import _EXT_FORMATS, DataError
from sentdisc.errors import InputError

# what pandas and pyarrow call the codecs a labeled file may be compressed with
_COMPRESSED = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}


def read_table(path: str, text_key: str, label_key: str | None = None,
               data_format: str = "auto", delim: str | None = None):
    """A small labeled set, read in process -> pandas DataFrame with 'text' (+ 'label').

    For transfer (SST-2, the Blitzer CSVs): CSV/TSV/JSON/loose JSON/Parquet. A row whose text
    is null or empty is an error naming the row; a missing column lists the columns found.
    Missing labels are passed on (null / "") for the caller to drop or reject.
    """
    import pandas as pd

    if not storage.is_file(path):
        raise DataError(f"{path}: no such file")
    name = path.lower()
    compression = next((c for ext, c in _COMPRESSED.items() if name.endswith(ext)), None)
    if compression:
        name = name.rsplit(".", 1)[0]
    fmt = data_format
    if fmt == "auto":
        ext = os.path.splitext(name)[1]
        fmt = _EXT_FORMATS.get(ext, "json" if ext == ".json" else "csv")
    raw = storage.read_bytes(path)  # a labeled set is small: one read, from any storage
    try:
        if fmt in ("csv", "tsv"):
            sep = delim or ("\t" if fmt == "tsv" else ",")
            df = pd.read_csv(io.BytesIO(raw), sep=sep, dtype={text_key: str},
                             keep_default_na=False, encoding="utf-8", compression=compression)
        elif fmt in ("json", "loose_json"):
            text = _decompressed(raw, compression)
            df = pd.read_json(io.BytesIO(text), lines=not text[:4096].lstrip().startswith(b"["),
                              dtype=False)
        elif fmt == "parquet":
            df = pd.read_parquet(io.BytesIO(raw))
        else:
            raise DataError(f"{path}: read_table reads csv/tsv/json/loose_json/parquet, "
                            f"not {fmt!r}")
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


# --- labeled sets for transfer: options, loading, splits ----------------------------------------

class TransferError(InputError):
    """Bad transfer input (labels, options), reported in one line without a traceback.

    Defined here, where most of it is raised, so ``sentdisc.transfer`` can import this module
    without a cycle; ``sentdisc.transfer`` re-exports it.
    """


@dataclass
class LabeledDataConfig:
    """Where the labeled sets are and how to read them; ``TransferConfig`` extends it."""
    train: str = field(default="", metadata={
        "help": "labeled training table (csv/tsv/json)", "path": True})
    valid: str = field(default="", metadata={
        "help": "validation table; empty: split val_fraction off train (seeded)", "path": True})
    test: str = field(default="", metadata={"help": "test table (optional)", "path": True})
    text_key: str = field(default="sentence", metadata={"help": "column/field holding the text"})
    label_key: str = field(default="label", metadata={"help": "column/field holding the label"})
    data_format: str = field(default="auto", metadata={"help": "auto|csv|tsv|json|loose_json|..."})
    delim: str = field(default="", metadata={"help": "field delimiter; empty: from the format"})
    drop_unlabeled: bool = field(default=False, metadata={
        "help": "drop rows without a label instead of failing"})
    binarize_sent: bool = field(default=False, metadata={
        "help": "ratings -> 0/1: lower half 0, upper half 1, the middle dropped"})
    no_test_eval: bool = field(default=False, metadata={"help": "test set has no labels"})
    max_train: int = field(default=0, metadata={"help": "seeded subset of train (0: all)"})
    max_eval: int = field(default=0, metadata={"help": "seeded subset of val and test (0: all)"})
    val_fraction: float = field(default=0.1, metadata={"help": "split off train when no --valid"})
    seed: int = field(default=42, metadata={"help": "seed for subsets, splits and solvers"})

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        for name in ("max_train", "max_eval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class LabeledSet:
    texts: list
    labels: np.ndarray | None   # int64 0/1, or None for an unlabeled test set
    path: str
    dropped: dict = field(default_factory=dict)   # reason -> rows dropped

    def __len__(self):
        return len(self.texts)

    def rows(self, index: np.ndarray, path: str | None = None) -> LabeledSet:
        """The rows at ``index``: a subset of this file (its drop counts kept), or, given
        ``path``, a set of its own named so (a validation split off train)."""
        labels = None if self.labels is None else self.labels[index]
        texts = [self.texts[i] for i in index]
        return LabeledSet(texts, labels, path or self.path, {} if path else self.dropped)


def rating_midpoint(labels: np.ndarray) -> float:
    """Middle of the rating scale seen in a file: 1-5 stars -> 3, 0/1 -> 0.5."""
    return (float(np.min(labels)) + float(np.max(labels))) / 2.0


def _decompressed(raw: bytes, compression: str | None) -> bytes:
    if compression in ("gzip", "bz2", "xz"):
        import bz2
        import gzip
        import lzma

        return {"gzip": gzip, "bz2": bz2, "xz": lzma}[compression].decompress(raw)
    if compression == "zstd":
        import pyarrow as pa

        with pa.input_stream(pa.py_buffer(raw), compression="zstd") as f:
            return f.read()
    return raw


def _read(path: str, cfg: LabeledDataConfig, label_key: str | None, role: str):
    if not storage.exists(path):
        raise TransferError(f"{role} file {path} does not exist")
    try:
        return read_table(path, cfg.text_key, label_key, data_format=cfg.data_format,
                          delim=cfg.delim or None)
    except DataError as e:
        hint = " (use --no_test_eval for a test set without labels)" if role == "test" else ""
        raise TransferError(f"{role}: {e}{hint}") from None


def _missing(values) -> np.ndarray:
    import pandas as pd

    s = pd.Series(values)
    return (s.isna() | s.astype(str).str.strip().eq("")).to_numpy()


def _numeric_labels(raw, path: str) -> np.ndarray:
    import pandas as pd

    num = pd.to_numeric(pd.Series(raw), errors="coerce")
    if num.isna().any():
        bad = sorted({str(v) for v, n in zip(raw, num, strict=True) if pd.isna(n)})[:10]
        raise TransferError(f"{path}: labels must be numbers (0/1, or ratings with "
                            f"--binarize_sent); found {bad}")
    return num.to_numpy(dtype=np.float64)


def _drop_unlabeled(texts: list, raw: np.ndarray, path: str, cfg: LabeledDataConfig,
                    dropped: dict) -> tuple[list, np.ndarray]:
    """Rows with a label; rows without one are an error unless ``drop_unlabeled``."""
    missing = _missing(raw)
    if not missing.any():
        return texts, raw
    if not cfg.drop_unlabeled:
        first = int(np.argmax(missing))
        raise TransferError(f"{path}: {int(missing.sum())} of {len(raw)} rows have no "
                            f"{cfg.label_key!r} (first at row {first + 1}); pass "
                            f"--drop_unlabeled to skip them")
    dropped["unlabeled"] = int(missing.sum())
    return [t for t, m in zip(texts, missing, strict=True) if not m], raw[~missing]


def _binary_labels(values: np.ndarray, path: str, label_key: str) -> np.ndarray:
    found = np.unique(values)
    if not set(found.tolist()) <= {0.0, 1.0}:
        shown = [int(v) if float(v).is_integer() else float(v) for v in found[:10]]
        raise TransferError(
            f"{path}: labels of {label_key!r} must be binary 0/1; found values "
            f"{shown}{' ...' if len(found) > 10 else ''}. Pass --binarize_sent to map "
            f"ratings (lower half -> 0, upper half -> 1, middle dropped)")
    return values.astype(np.int64)


def load_labeled(path: str, cfg: LabeledDataConfig, role: str, labeled: bool = True,
                 midpoint: float | None = None) -> tuple[LabeledSet, float | None]:
    """Read one table; returns the set and the rating midpoint used (``binarize_sent``).

    ``midpoint`` given (train's), a validation or test file is cut where train was, even if
    its own ratings span less of the scale.
    """
    df = _read(path, cfg, cfg.label_key if labeled else None, role)
    texts = df["text"].astype(str).tolist()
    if not labeled:
        return LabeledSet(texts, None, path), midpoint
    dropped = {}
    texts, raw = _drop_unlabeled(texts, df["label"].to_numpy(), path, cfg, dropped)
    values = _numeric_labels(raw, path)
    if cfg.binarize_sent:
        if len(values) == 0:
            raise TransferError(f"{path}: no labeled rows")
        midpoint = rating_midpoint(values) if midpoint is None else midpoint
        keep = values != midpoint
        dropped["middle_rating"] = int((~keep).sum())
        texts = [t for t, k in zip(texts, keep, strict=True) if k]
        labels = (values[keep] > midpoint).astype(np.int64)
    else:
        labels = _binary_labels(values, path, cfg.label_key)
    if len(texts) == 0:
        raise TransferError(f"{path}: no labeled rows left (dropped {dropped})")
    return LabeledSet(texts, labels, path, dropped), midpoint


def _subset(s: LabeledSet, n: int, seed: int) -> LabeledSet:
    if not n or len(s) <= n:
        return s
    return s.rows(np.sort(np.random.default_rng(seed).choice(len(s), n, replace=False)))


def _split_validation(train: LabeledSet, cfg: LabeledDataConfig) -> tuple[LabeledSet, LabeledSet]:
    """(train, val) with val_fraction of train's rows; seeded, so repeated runs compare like
    with like."""
    perm = np.random.default_rng(cfg.seed).permutation(len(train))
    n_val = max(1, int(round(cfg.val_fraction * len(train))))
    if len(train) - n_val < 2:
        raise TransferError(f"{cfg.train}: too few rows ({len(train)}) to split off validation")
    val = train.rows(np.sort(perm[:n_val]), path=f"{cfg.train} (split)")
    return train.rows(np.sort(perm[n_val:])), val


def prepare_data(cfg: LabeledDataConfig) -> dict:
    """{"train", "val", "test" (or None)} LabeledSets plus "val_source" ('file'|'split') and
    "rating_midpoint" (None unless ``binarize_sent``)."""
    if not cfg.train:
        raise TransferError("--train is required (a labeled table)")
    train, mid = load_labeled(cfg.train, cfg, "train")
    train = _subset(train, cfg.max_train, cfg.seed)
    if cfg.valid:
        val, _ = load_labeled(cfg.valid, cfg, "valid", midpoint=mid)
        val_source = "file"
    else:
        train, val = _split_validation(train, cfg)
        val_source = "split"
    val = _subset(val, cfg.max_eval, cfg.seed + 1)
    test = None
    if cfg.test:
        test, _ = load_labeled(cfg.test, cfg, "test", labeled=not cfg.no_test_eval, midpoint=mid)
        test = _subset(test, cfg.max_eval, cfg.seed + 2)
    if len(np.unique(train.labels)) < 2:
        raise TransferError(f"{cfg.train}: training labels hold one class only "
                            f"({int(train.labels[0])}); a classifier needs both")
    return {"train": train, "val": val, "test": test, "val_source": val_source,
            "rating_midpoint": mid if cfg.binarize_sent else None}
