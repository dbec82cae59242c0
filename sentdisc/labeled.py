"""Labeled sets for transfer and fine-tuning (SST-2, the Amazon-Blitzer and IMDB CSVs): small,
read in process.

``read_table`` reads one table, through the corpora's own format table and decompression
(``sentdisc.data.config``). ``prepare_data`` turns a ``LabeledDataConfig`` into the train / val
/ test ``LabeledSet``s of a run and the ``LabelSpec`` they share. The spec is decided on train
(``--label_kind auto`` reads it off the data) and every other split is held to it:

    binary      one column, two classes: 0/1 (named negative/positive), ratings cut at their
                midpoint (``--binarize_sent``), or any two values (sorted; the second is the
                positive class)
    multiclass  one column, K values (strings or integers): ``--label_key category``
    multilabel  several 0/1 columns: ``--label_key books,dvd,positive``

Bad labels stop the run before any featurization, in one line naming the file, the row (1-based,
header excluded) and the column: a missing column, a value outside the label set, a multi-label
cell that is not 0/1, a list or object cell (JSON, Parquet), a CSV row with more fields than
the header (an unquoted comma), a class absent from train (or from what ``--max_train`` and
``--val_fraction`` leave of it: the message names them), fewer than two classes. In a CSV label
column pandas' missing-value strings ("NA", "NaN", "null", "") are missing labels, not a class.
"""
from __future__ import annotations

import codecs
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from sentdisc import storage
from sentdisc.data.config import DataConfig, DataError, file_format, open_decompressed
from sentdisc.errors import InputError
from sentdisc.text import is_blank

LABEL_KINDS = ("auto", "binary", "multiclass", "multilabel")
SENTIMENT = ("negative", "positive")  # what 0/1 and binarized ratings are called
# what pandas reads as missing by default: a CSV label cell holding one of these has no label
NA_STRINGS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan",
                        "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a",
                        "nan", "null"})


def read_table(path: str, text_key: str, label_key: str | Sequence[str] | None = None,
               data_format: str = "auto", delim: str | None = None):
    """A small labeled set, read in process -> pandas DataFrame with 'text' and the labels:
    one ``label_key`` as column 'label', several (a list) under their own names.

    CSV/TSV/JSON/loose JSON/Parquet, compressed as corpora may be, a leading UTF-8 BOM
    ignored. A row whose text is null or empty after preprocessing (blank, or only HTML
    entities of whitespace such as ``&nbsp;``) is an error naming the row; so are a CSV row with
    more fields than the header (an unquoted comma in a text) and a text or label cell that is
    a list or an object (JSON, Parquet); a missing column lists the columns found. Missing
    labels are passed on (null / "", and in a CSV label column pandas' missing-value strings
    such as "NA" or "NaN") for the caller to drop or reject; a text "NA" stays a text.
    """
    import pandas as pd

    if not storage.is_file(path):
        raise DataError(f"{path}: no such file")
    # the corpora's format table; ".json" may hold lines or one array: the bytes decide below
    fmt = file_format(path, DataConfig(data_format=data_format), unknown="csv")
    if fmt not in ("csv", "tsv", "json", "loose_json", "parquet"):
        raise DataError(f"{path}: a labeled set is csv/tsv/json/loose_json/parquet, not {fmt!r}")
    fs, inner = storage.filesystem(path)
    try:
        with open_decompressed(fs, inner, path) as f:  # a labeled set is small: one read
            raw = f.read()
        if fmt != "parquet":  # as the corpus readers do; pandas' JSON reader rejects it
            raw = raw.removeprefix(codecs.BOM_UTF8)
        if fmt in ("csv", "tsv"):
            sep = delim or ("\t" if fmt == "tsv" else ",")
            # a text is read as written ("NA" is a text); a label cell pandas reads as missing
            # by default ("", "NA", "NaN", "null", ...) is missing, not a class
            try:
                df = pd.read_csv(io.BytesIO(raw), sep=sep, dtype={text_key: str},
                                 keep_default_na=False, encoding="utf-8",
                                 na_values={k: sorted(NA_STRINGS) for k in _keys(label_key)})
            except pd.errors.ParserError:
                _check_fields(raw, sep, path)
                raise
            if not isinstance(df.index, pd.RangeIndex):  # a row longer than the header
                _check_fields(raw, sep, path)
        elif fmt == "parquet":
            df = pd.read_parquet(io.BytesIO(raw))
        else:
            df = pd.read_json(io.BytesIO(raw), lines=not raw[:4096].lstrip().startswith(b"["),
                              dtype=False)
    except DataError:
        raise
    except (ValueError, UnicodeDecodeError, OSError, EOFError, pd.errors.ParserError) as e:
        raise DataError(f"{path}: cannot read as {fmt}: {e}") from None
    keys = _keys(label_key)
    for key in (text_key, *keys):
        if key not in df.columns:
            cols = ", ".join(str(c) for c in df.columns)
            raise DataError(f"{path}: no column {key!r} (columns: {cols})")
    for key, what in ((text_key, "text"), *((k, "a label") for k in keys)):
        _check_scalars(df[key], path, key, what)
    out = pd.DataFrame({"text": df[text_key]})
    if isinstance(label_key, str):
        out["label"] = df[label_key].values
    else:
        for key in keys:
            out[key] = df[key].values
    # empty as the model would see it: such a text has no heatmap to draw (extremes.html)
    missing = out["text"].isna().to_numpy()
    bad = missing | np.array([is_blank(str(t)) for t in out["text"]], dtype=bool)
    if bad.any():  # a labeled set is small and precious: name the row rather than drop it
        i = int(np.flatnonzero(bad)[0])
        cell = out["text"].iloc[i]
        why = "" if missing[i] or not str(cell).strip() else \
            f" after preprocessing ({str(cell)!r}: HTML entities of whitespace only)"
        raise DataError(f"{path}: row {i + 1}: empty {text_key!r}{why}")
    out["text"] = out["text"].astype(str)
    return out.reset_index(drop=True)


def _keys(label_key: str | Sequence[str] | None) -> list[str]:
    return [label_key] if isinstance(label_key, str) else list(label_key or [])


def _check_fields(raw: bytes, sep: str, path: str) -> None:
    """A DataError naming the first row with more fields than the header (an unquoted
    delimiter in a text), which pandas would otherwise read as an index column or refuse with
    a tokenizer's message."""
    import csv

    rows = csv.reader(io.StringIO(raw.decode("utf-8", errors="replace"), newline=""),
                      delimiter=sep)
    header = next(rows, [])
    n = 0
    for fields in rows:
        if not fields:  # a blank line, which pandas skips too
            continue
        n += 1
        if len(fields) > len(header):
            what = "commas" if sep == "," else "tabs" if sep == "\t" else repr(sep)
            raise DataError(f"{path}: row {n} has {len(fields)} fields, the header "
                            f"{len(header)}: quote texts that contain {what}")


def _check_scalars(column, path: str, key: str, what: str) -> None:
    """A DataError naming the first cell that is a list or an object (JSON, Parquet), which
    would otherwise be read as its string ("['x']")."""
    for i, v in enumerate(column.to_numpy()):
        if isinstance(v, (list, tuple, np.ndarray)):
            kind = "a list"
        elif isinstance(v, dict):
            kind = "an object"
        else:
            continue
        raise DataError(f"{path}: row {i + 1}: column {key!r} holds {kind}, not {what}")


# --- options -------------------------------------------------------------------------------------

class TransferError(InputError):
    """Bad transfer input (labels, options), reported in one line without a traceback.

    Defined here, where most of it is raised, so ``sentdisc.transfer`` can import this module
    without a cycle; ``sentdisc.transfer`` re-exports it.
    """


@dataclass
class LabeledDataConfig:
    """Where the labeled sets are and how to read them; ``TransferConfig`` extends it."""
    train: str = field(default="", metadata={
        "help": "labeled training table (csv/tsv/json/parquet, compressed or not)", "path": True})
    valid: str = field(default="", metadata={
        "help": "validation table; empty: split val_fraction off train (seeded)", "path": True})
    test: str = field(default="", metadata={"help": "test table (optional)", "path": True})
    text_key: str = field(default="sentence", metadata={"help": "column/field holding the text"})
    label_key: str = field(default="label", metadata={
        "help": "column holding the label; several, comma-separated, for multi-label "
                "(books,dvd,positive: each 0/1)", "comma": True})
    label_kind: str = field(default="auto", metadata={
        "help": "auto (from the data: several columns multilabel, two values binary, more "
                "multiclass) | binary | multiclass | multilabel"})
    labels: str = field(default="", metadata={
        "help": "the classes, comma-separated, in the order the classifier lists them; a "
                "value outside them is an error (default: the values train holds)", "comma": True})
    data_format: str = field(default="auto", metadata={"help": "auto|csv|tsv|json|loose_json|parquet"})
    delim: str = field(default="", metadata={"help": "field delimiter; empty: from the format"})
    drop_unlabeled: bool = field(default=False, metadata={
        "help": "drop rows without a label instead of failing"})
    binarize_sent: bool = field(default=False, metadata={
        "help": "ratings -> binary: lower half negative, upper half positive, the middle dropped"})
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
        if self.label_kind not in LABEL_KINDS:
            raise ValueError(f"label_kind must be one of {LABEL_KINDS}, got {self.label_kind!r}")
        keys = self.label_keys
        if not keys:
            raise ValueError("label_key names no column")
        if len(keys) > 1 and self.label_kind in ("binary", "multiclass"):
            raise ValueError(f"label_kind {self.label_kind} reads one column; label_key names "
                             f"{len(keys)} ({', '.join(keys)}): use label_kind multilabel")
        if self.binarize_sent and (len(keys) > 1 or self.label_kind in ("multiclass",
                                                                          "multilabel")):
            raise ValueError("binarize_sent makes one rating column binary: it goes with one "
                             "label_key and label_kind auto or binary")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        _no_repeats("label_key", keys)
        declared = self.declared_labels
        if declared:
            _no_repeats("labels", declared, [v.strip() for v in self.labels.split(",")
                                             if v.strip()])
            if self.binarize_sent:
                raise ValueError("labels and binarize_sent exclude each other: binarize_sent "
                                 "names the classes negative, positive")
            if len(keys) > 1 or self.label_kind == "multilabel":
                raise ValueError("labels declares the classes of one label column; a "
                                 "multi-label run's labels are its label_key columns")

    @property
    def label_keys(self) -> list[str]:
        return [k.strip() for k in self.label_key.split(",") if k.strip()]

    @property
    def declared_labels(self) -> list[str]:
        """--labels as the names cells are matched by (``cell_name``: 1.0 and 1 are "1")."""
        return [cell_name(v) for v in self.labels.split(",") if v.strip()]


def _no_repeats(flag: str, names: list[str], written: list[str] | None = None) -> None:
    """A ValueError naming a name ``--flag`` lists twice (as written, when ``names`` are
    normalized)."""
    seen: dict = {}
    for i, name in enumerate(names):
        if name in seen:
            first, again = (written[seen[name]], written[i]) if written else (name, name)
            twice = f"{first!r} twice" if first == again else \
                f"{first!r} and {again!r}, the same {'class' if flag == 'labels' else 'name'}"
            raise ValueError(f"{flag} lists {twice}: each must be listed once")
        seen[name] = i


# --- what the labels are -------------------------------------------------------------------------

@dataclass(frozen=True)
class LabelSpec:
    """The labels of a run: decided on train, applied to every split, and handed to the
    classifier, which names its outputs by ``labels``."""
    kind: str                   # binary | multiclass | multilabel
    labels: tuple               # class names in index order; multi-label: the columns
    keys: tuple                 # the label columns read
    values: tuple = ()          # binary / multiclass: the cell value each class stands for
    midpoint: float | None = None  # binarize_sent: ratings above it are positive
    declared: bool = False      # the classes came from --labels (else from train's values)

    def describe(self) -> str:
        if self.kind == "multilabel":
            n = len(self.labels)
            return f"multilabel: {n} label{'s' * (n != 1)} ({', '.join(self.labels)}), each 0/1"
        if self.midpoint is not None:
            return (f"binary: ratings of {self.keys[0]!r} below {self.midpoint:g} negative, "
                    f"above it positive")
        pairs = ", ".join(n if n == v else f"{n} ({v})"
                          for n, v in zip(self.labels, self.values, strict=True))
        return f"{self.kind}: {len(self.labels)} labels of {self.keys[0]!r}: {pairs}"


def cell_name(v) -> str:
    """A label cell as the name it is matched by: 1, 1.0 and "1" are all "1"."""
    if isinstance(v, (bool, np.bool_)):
        return "1" if v else "0"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return str(int(v)) if math.isfinite(v) and float(v).is_integer() else repr(float(v))
    text = str(v).strip()
    number = _number(text)  # "1.0" in one file, 1 in another: the same class
    return cell_name(number) if number is not None else text


def _number(name: str) -> float | None:
    try:
        x = float(name)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _sorted_names(names) -> list[str]:
    """Numbers in numeric order (1, 2, 10), otherwise as strings."""
    names = list(names)
    if all(_number(n) is not None for n in names):
        return sorted(names, key=_number)
    return sorted(names)


@dataclass
class LabelCells:
    """A table's label cells as names (``cell_name``), by column, with each row's 1-based row
    in the file (so an error names the row a user finds)."""
    path: str
    columns: dict     # key -> [name per row]
    rows: np.ndarray  # row in the file of each entry

    def where(self, i: int, key: str) -> str:
        return f"{self.path}: row {int(self.rows[i])}: column {key!r} holds {self.columns[key][i]!r}"


def _ratings(cells: LabelCells, key: str) -> np.ndarray:
    values = [_number(n) for n in cells.columns[key]]
    bad = next((i for i, x in enumerate(values) if x is None), None)
    if bad is not None:
        raise TransferError(f"{cells.where(bad, key)}: --binarize_sent needs numeric ratings")
    return np.array(values, dtype=np.float64)


def infer_spec(cells: LabelCells, cfg: LabeledDataConfig) -> LabelSpec:
    """The LabelSpec of train's label cells under ``cfg`` (``--label_kind auto``: from the
    data)."""
    keys, kind = cfg.label_keys, cfg.label_kind
    if kind == "multilabel" or (kind == "auto" and len(keys) > 1):
        return LabelSpec("multilabel", tuple(keys), tuple(keys))
    key = keys[0]
    if cfg.binarize_sent:
        return LabelSpec("binary", SENTIMENT, (key,), (), rating_midpoint(_ratings(cells, key)))
    declared = cfg.declared_labels
    found = declared or _sorted_names(set(cells.columns[key]))
    if kind == "auto":
        kind = "binary" if len(found) == 2 else "multiclass"
    if kind == "binary" and len(found) != 2:
        raise TransferError(
            f"{cells.path}: labels of {key!r} must be binary 0/1 (two classes) for --label_kind "
            f"binary; found {len(found)} values [{', '.join(found[:10])}]"
            f"{' ...' if len(found) > 10 else ''}. Pass --binarize_sent to map ratings (lower "
            f"half -> negative, upper half -> positive, middle dropped), or --label_kind "
            f"multiclass (or auto) for one class per value")
    if kind == "binary" and found == ["0", "1"]:
        return LabelSpec("binary", SENTIMENT, (key,), ("0", "1"), declared=bool(declared))
    return LabelSpec(kind, tuple(found), (key,), tuple(found), declared=bool(declared))


def encode_labels(cells: LabelCells, spec: LabelSpec) -> np.ndarray:
    """Label cells -> class indices [N] (binary, multiclass) or a 0/1 indicator [N, K]
    (multilabel); a cell the spec does not know is an error naming its row and column."""
    if spec.kind == "multilabel":
        out = np.zeros((len(cells.rows), len(spec.keys)), dtype=np.int64)
        for k, key in enumerate(spec.keys):
            for i, name in enumerate(cells.columns[key]):
                if name not in ("0", "1"):
                    raise TransferError(f"{cells.where(i, key)}: a multi-label column holds "
                                        f"0 or 1")
                out[i, k] = name == "1"
        return out
    key = spec.keys[0]
    if spec.midpoint is not None:
        return (_ratings(cells, key) > spec.midpoint).astype(np.int64)
    index = {v: i for i, v in enumerate(spec.values)}
    out = np.empty(len(cells.rows), dtype=np.int64)
    for i, name in enumerate(cells.columns[key]):
        if name not in index:
            source = "declared by --labels" if spec.declared else "that train holds"
            raise TransferError(f"{cells.where(i, key)}, not one of the labels {source}: "
                                f"[{', '.join(spec.values)}]")
        out[i] = index[name]
    return out


# --- labeled sets --------------------------------------------------------------------------------

@dataclass
class LabeledSet:
    texts: list
    labels: np.ndarray | None   # class indices [N] (binary, multiclass), 0/1 [N, K] (multilabel),
    path: str                   # or None for an unlabeled test set
    dropped: dict = field(default_factory=dict)   # reason -> rows dropped
    rows_in_file: np.ndarray | None = None        # each text's 1-based row in its file

    def __len__(self):
        return len(self.texts)

    def rows(self, index: np.ndarray, path: str | None = None) -> LabeledSet:
        """The rows at ``index``: a subset of this file (its drop counts kept), or, given
        ``path``, a set of its own named so (a validation split off train)."""
        labels = None if self.labels is None else self.labels[index]
        texts = [self.texts[i] for i in index]
        where = None if self.rows_in_file is None else self.rows_in_file[index]
        return LabeledSet(texts, labels, path or self.path, {} if path else self.dropped, where)


def rating_midpoint(labels: np.ndarray) -> float:
    """Middle of the rating scale seen in a file: 1-5 stars -> 3, 0/1 -> 0.5."""
    return (float(np.min(labels)) + float(np.max(labels))) / 2.0


def _read(path: str, cfg: LabeledDataConfig, labeled: bool, role: str):
    if not storage.exists(path):
        raise TransferError(f"{role} file {path} does not exist")
    keys = cfg.label_keys
    try:
        return read_table(path, cfg.text_key, (keys[0] if len(keys) == 1 else keys)
                          if labeled else None, data_format=cfg.data_format,
                          delim=cfg.delim or None)
    except DataError as e:
        hint = " (use --no_test_eval for a test set without labels)" if role == "test" else ""
        raise TransferError(f"{role}: {e}{hint}") from None


def _missing(values) -> np.ndarray:
    import pandas as pd

    s = pd.Series(values)
    return (s.isna() | s.astype(str).str.strip().eq("")).to_numpy()


def _label_cells(df, keys: list[str], path: str, cfg: LabeledDataConfig,
                 dropped: dict) -> LabelCells:
    """The rows with every label cell filled; the others are an error unless
    ``drop_unlabeled``."""
    columns = ["label"] if len(keys) == 1 else keys
    missing = np.zeros(len(df), dtype=bool)
    for key, col in zip(keys, columns, strict=True):
        gaps = _missing(df[col].to_numpy())
        if gaps.any() and not cfg.drop_unlabeled:
            first = int(np.argmax(gaps))
            raise TransferError(f"{path}: {int(gaps.sum())} of {len(df)} rows have no "
                                f"{key!r} (first at row {first + 1}); pass --drop_unlabeled to "
                                f"skip them")
        missing |= gaps
    if missing.any():
        dropped["unlabeled"] = int(missing.sum())
    keep = np.flatnonzero(~missing)
    return LabelCells(path, {key: [cell_name(v) for v in df[col].to_numpy()[keep]]
                             for key, col in zip(keys, columns, strict=True)}, keep + 1)


def load_labeled(path: str, cfg: LabeledDataConfig, role: str, labeled: bool = True,
                 spec: LabelSpec | None = None) -> tuple[LabeledSet, LabelSpec | None]:
    """Read one table; returns the set and its LabelSpec: inferred from this table (train),
    or ``spec`` (train's) applied to it, so val and test are held to train's labels and a
    rating scale is cut where train's was."""
    df = _read(path, cfg, labeled, role)
    texts = df["text"].astype(str).tolist()
    if not labeled:
        return LabeledSet(texts, None, path, rows_in_file=np.arange(1, len(texts) + 1)), spec
    dropped: dict = {}
    cells = _label_cells(df, cfg.label_keys, path, cfg, dropped)
    texts, rows = [texts[r - 1] for r in cells.rows], cells.rows
    if not texts:
        raise TransferError(f"{path}: no labeled rows (dropped {dropped})")
    spec = spec or infer_spec(cells, cfg)
    labels = encode_labels(cells, spec)
    if spec.midpoint is not None:
        kept = _ratings(cells, spec.keys[0]) != spec.midpoint
        dropped["middle_rating"] = int((~kept).sum())
        texts = [t for t, k in zip(texts, kept, strict=True) if k]
        labels, rows = labels[kept], rows[kept]
    if len(texts) == 0:
        raise TransferError(f"{path}: no labeled rows left (dropped {dropped})")
    return LabeledSet(texts, labels, path, dropped, rows), spec


def check_train_classes(train: LabeledSet, spec: LabelSpec, path: str,
                        cut: dict | None = None) -> None:
    """Every class (multi-label: both values of every label) present in train: a classifier
    cannot learn one it never sees. ``cut`` ({flag: advice}) names the flags that cut train
    down after the whole file passed this check, so the message blames them, not the file."""
    y = train.labels
    rows = f"the {len(y)} training rows left by {' and '.join(cut)}" if cut else "train"
    fix = f" (the whole file holds every class: {' or '.join(cut.values())})" if cut else ""
    if spec.kind == "multilabel":
        for k, key in enumerate(spec.keys):
            pos = int(y[:, k].sum())
            if pos == 0 or pos == len(y):
                which = "no positive (1)" if pos == 0 else "no negative (0)"
                raise TransferError(f"{path}: column {key!r} has {which} row in {rows}: a "
                                    f"label needs both values to be learned{fix}")
        return
    counts = np.bincount(y, minlength=len(spec.labels))
    if np.count_nonzero(counts) < 2:
        only = spec.labels[int(np.argmax(counts))]
        whose = f"the labels of {spec.keys[0]!r} in {rows}" if cut else \
            f"training labels of {spec.keys[0]!r}"
        raise TransferError(f"{path}: {whose} hold one class only ({only}); a classifier needs "
                            f"at least 2{fix}")
    absent = [spec.labels[i] for i in np.flatnonzero(counts == 0)]
    if absent:
        raise TransferError(f"{path}: column {spec.keys[0]!r}: class(es) {absent} of the label "
                            f"set [{', '.join(spec.labels)}] absent from {rows}{fix}")


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
    """{"train", "val", "test" (or None)} LabeledSets, "spec" (their LabelSpec), "val_source"
    ('file'|'split') and "rating_midpoint" (None unless ``binarize_sent``). Every label is
    checked here, before any featurization."""
    if not cfg.train:
        raise TransferError("--train is required (a labeled table)")
    train, spec = load_labeled(cfg.train, cfg, "train")
    check_train_classes(train, spec, cfg.train)  # the whole file: a subset may miss a class
    train = _subset(train, cfg.max_train, cfg.seed)
    if cfg.valid:
        val, _ = load_labeled(cfg.valid, cfg, "valid", spec=spec)
        val_source = "file"
    else:
        train, val = _split_validation(train, cfg)
        val_source = "split"
    val = _subset(val, cfg.max_eval, cfg.seed + 1)
    test = None
    if cfg.test:
        test, _ = load_labeled(cfg.test, cfg, "test", labeled=not cfg.no_test_eval, spec=spec)
        test = _subset(test, cfg.max_eval, cfg.seed + 2)
    cut = {f"--max_train {cfg.max_train}": "raise --max_train"} if cfg.max_train else {}
    if val_source == "split":
        cut[f"--val_fraction {cfg.val_fraction:g}"] = "lower --val_fraction"
    check_train_classes(train, spec, cfg.train, cut)
    return {"train": train, "val": val, "test": test, "spec": spec, "val_source": val_source,
            "rating_midpoint": spec.midpoint}
