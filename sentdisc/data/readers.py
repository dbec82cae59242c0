"""Review corpora -> Ray Datasets of preprocessed bytes, one row per record.

A corpus is files, folders (walked recursively), globs or a comma list of those, in one of:
loose JSON (one object per line: the Amazon dump), JSON arrays, CSV/TSV, Parquet, plain text
(one sample per line) or the already-encoded Parquet shards that ``sentdisc data preprocess``
writes. Each file is read by its own Ray task, which yields bounded chunks of records, so memory
stays a few blocks whatever the corpus size. The encoding stage is a vectorised ``map_batches``
over ``sentdisc.text.encode_batch``: the one preprocessing used everywhere.

Every record becomes one row: ``bytes`` (preprocessed UTF-8, empty when the record is bad),
``error`` ('' or a reason), ``file``, ``line`` (1-based; for JSON arrays and Parquet the record
number) and optional ``label``. Bad records are kept as rows so the packer can count them
(``skipped_<reason>``): nothing is lost silently. ``strict=True`` stops at the first one instead
with ``file:line: reason``.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa

from sentdisc.data.splits import parse_split, split_filter
from sentdisc.errors import InputError
from sentdisc.report import parse_cell
from sentdisc.text import END_PAD, FRONT_PAD, encode_batch

FORMATS = ("auto", "loose_json", "json", "csv", "tsv", "parquet", "text", "encoded")
REASONS = ("bad_json", "missing_key", "empty_text", "invalid_utf8")
_EXT_FORMATS = {".jsonl": "loose_json", ".ndjson": "loose_json", ".csv": "csv", ".tsv": "tsv",
                ".parquet": "parquet", ".pq": "parquet", ".txt": "text"}
# A reader task yields a block once it holds this many records or raw bytes: bounds memory.
CHUNK_RECORDS = 8192
CHUNK_BYTES = 8 << 20


class DataError(InputError):
    """Bad corpus input: a missing path, an unknown format, or (strict mode) a bad record."""


@dataclass
class DataConfig:
    train: str = field(default="", metadata={
        "help": "training corpus: files, folders, globs, comma list", "path": True})
    valid: str = field(default="", metadata={
        "help": "explicit validation corpus (else taken from --split)", "path": True})
    test: str = field(default="", metadata={
        "help": "explicit test corpus (else taken from --split)", "path": True})
    split: str = field(default="1000,1,1", metadata={"help": "train,val,test proportions of --train"})
    text_key: str = field(default="reviewText", metadata={"help": "field/column holding the text"})
    label_key: Optional[str] = field(default=None, metadata={"help": "field/column holding a label"})
    loose_json: bool = field(default=True, metadata={"help": ".json files hold one object per line"})
    data_format: str = field(default="auto", metadata={"help": "|".join(FORMATS)})
    delim: str = field(default=",", metadata={"help": "CSV delimiter"})
    strict: bool = field(default=False, metadata={"help": "stop at the first malformed record"})
    transliterate: bool = field(default=False, metadata={"help": "unidecode text to ASCII"})
    shuffle: bool = field(default=False, metadata={"help": "shuffle file order and records within chunks"})
    persist_state: int = field(default=0, metadata={
        "help": "0 reset state at each record, 1 at each epoch start, -1 never"})
    seed: int = field(default=1234, metadata={"help": "seed of the split and shuffle"})


# ----------------------------------------------------------------------------- paths

_HIDDEN = ("_", ".")  # _SUCCESS, _manifest.json, .crc: bookkeeping files beside shards


def resolve_paths(spec: str | list[str]) -> list[str]:
    """Files, folders (recursive), globs or a comma list -> sorted absolute file paths.

    Raises DataError naming the first entry that matches nothing, so a typo fails on the
    driver before any Ray task starts.
    """
    parts = spec if isinstance(spec, (list, tuple)) else [p for p in str(spec).split(",")]
    parts = [str(p).strip() for p in parts if str(p).strip()]
    if not parts:
        raise DataError("no data path given")
    out: list[str] = []
    for part in parts:
        path = os.path.expanduser(part)
        if os.path.isfile(path):
            found = [path]
        elif os.path.isdir(path):
            found = []
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith(_HIDDEN))
                found += [os.path.join(root, f) for f in sorted(files) if not f.startswith(_HIDDEN)]
            if not found:
                raise DataError(f"{part}: folder holds no data files")
        elif glob.has_magic(path):
            found = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
            if not found:
                raise DataError(f"{part}: glob matches no files")
        else:
            raise DataError(f"{part}: no such file or folder")
        out += [os.path.abspath(p) for p in found]
    return sorted(dict.fromkeys(out))


def _root_of(paths: list[str]) -> str:
    """The folder the split key is relative to, so moving a corpus keeps its split."""
    return os.path.commonpath([os.path.dirname(p) for p in paths])


def _file_format(path: str, cfg: DataConfig) -> str:
    if cfg.data_format != "auto":
        return cfg.data_format
    name = path.lower()
    for suffix in (".gz", ".bz2", ".xz"):
        if name.endswith(suffix):
            raise DataError(f"{path}: compressed files are not read; decompress it or run "
                            "'sentdisc data preprocess'")
    ext = os.path.splitext(name)[1]
    if ext in _EXT_FORMATS:
        return _EXT_FORMATS[ext]
    if ext == ".json":
        return "loose_json" if cfg.loose_json else "json"
    return "loose_json" if cfg.loose_json else "text"


# ----------------------------------------------------------------------------- per-file readers
# Each yields lists of (line, text or None, label, error, detail); text is a valid Python str.

def _check_text(value) -> tuple[Optional[str], str, str]:
    """A field value -> (text, error, detail). Lone surrogates from JSON escapes are invalid UTF-8."""
    if value is None:
        return None, "missing_key", "null"
    if not isinstance(value, str):
        value = str(value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return None, "invalid_utf8", str(e)
    return value, "", ""


def _from_record(obj, line: int, text_key: str, label_key: Optional[str]):
    if not isinstance(obj, dict):
        return (line, None, None, "bad_json", f"expected an object, got {type(obj).__name__}")
    if text_key not in obj:
        return (line, None, None, "missing_key", f"no field {text_key!r}")
    if label_key and obj.get(label_key) is None:
        return (line, None, None, "missing_key", f"no field {label_key!r}")
    text, err, detail = _check_text(obj[text_key])
    label = obj.get(label_key) if label_key else None
    return (line, text, label, err, detail)


def _read_loose_json(path, cfg):
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue  # blank lines are layout, not records
            try:
                obj = json.loads(raw)
            except UnicodeDecodeError as e:
                yield (line_no, None, None, "invalid_utf8", str(e))
                continue
            except ValueError as e:
                yield (line_no, None, None, "bad_json", str(e))
                continue
            yield _from_record(obj, line_no, cfg.text_key, cfg.label_key)


def _read_json_array(path, cfg):
    with open(path, "rb") as f:
        try:
            data = json.load(f)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: invalid_utf8: {e}") from None
        except ValueError as e:
            raise DataError(f"{path}: bad_json: not a JSON array ({e}); loose JSON needs "
                            "--loose_json / --data_format loose_json") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: bad_json: expected a JSON array of objects")
    for i, obj in enumerate(data, 1):
        yield _from_record(obj, i, cfg.text_key, cfg.label_key)


def _read_csv(path, cfg, delim):
    # surrogateescape keeps invalid bytes visible to _check_text instead of failing the file.
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, delimiter=delim)
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        cols = {h: i for i, h in enumerate(header)}
        missing = [k for k in (cfg.text_key, cfg.label_key) if k and k not in cols]
        start = reader.line_num + 1
        for row in reader:
            line_no, start = start, reader.line_num + 1
            if not row:
                continue
            if missing:
                yield (line_no, None, None, "missing_key",
                       f"no column {missing[0]!r} (columns: {', '.join(header)})")
                continue
            if len(row) <= cols[cfg.text_key] or (cfg.label_key and len(row) <= cols[cfg.label_key]):
                yield (line_no, None, None, "missing_key", f"row has {len(row)} fields")
                continue
            text, err, detail = _check_text(row[cols[cfg.text_key]])
            label = parse_cell(row[cols[cfg.label_key]]) if cfg.label_key else None
            yield (line_no, text, label, err, detail)


def _read_text(path, cfg):
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                yield (line_no, None, None, "invalid_utf8", str(e))
                continue
            yield (line_no, text, None, "", "")


def _read_parquet_rows(pf, path, cfg):
    names = pf.schema_arrow.names
    if cfg.text_key not in names:
        raise DataError(f"{path}: no column {cfg.text_key!r} (columns: {', '.join(names)})")
    if cfg.label_key and cfg.label_key not in names:
        raise DataError(f"{path}: no column {cfg.label_key!r} (columns: {', '.join(names)})")
    cols = [cfg.text_key] + ([cfg.label_key] if cfg.label_key else [])
    line_no = 0
    for batch in pf.iter_batches(batch_size=CHUNK_RECORDS, columns=cols):
        texts = batch.column(0).to_pylist()
        labels = batch.column(1).to_pylist() if cfg.label_key else [None] * len(texts)
        for text, label in zip(texts, labels):
            line_no += 1
            if cfg.label_key and label is None:
                yield (line_no, None, None, "missing_key", f"null {cfg.label_key!r}")
                continue
            if isinstance(text, bytes):
                try:
                    text = text.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield (line_no, None, None, "invalid_utf8", str(e))
                    continue
            text, err, detail = _check_text(text)
            yield (line_no, text, label, err, detail)


def _records(path: str, fmt: str, cfg: DataConfig):
    if fmt == "loose_json":
        return _read_loose_json(path, cfg)
    if fmt == "json":
        return _read_json_array(path, cfg)
    if fmt in ("csv", "tsv"):
        return _read_csv(path, cfg, "\t" if fmt == "tsv" else (cfg.delim or ","))
    if fmt == "text":
        return _read_text(path, cfg)
    raise DataError(f"{path}: unknown data_format {fmt!r} (one of {', '.join(FORMATS)})")


# ----------------------------------------------------------------------------- Ray stages

def _chunk_table(path, rows, cfg) -> pa.Table:
    lines, texts, labels, errors, details = zip(*rows)
    cols = {"file": pa.array([path] * len(rows), pa.string()),
            "line": pa.array(lines, pa.int64()),
            "text": pa.array(texts, pa.large_string()),
            "error": pa.array(errors, pa.string()),
            "detail": pa.array(details, pa.string())}
    if cfg.label_key:
        cols["label"] = pa.array(labels)
    return pa.table(cols)


def _shuffled(table: pa.Table, cfg: DataConfig, path: str, chunk: int) -> pa.Table:
    digest = hashlib.blake2b(f"{cfg.seed}:{path}:{chunk}".encode(), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    return table.take(pa.array(rng.permutation(len(table))))


def _encoded_chunks(pf, path, cfg) -> Iterator[pa.Table]:
    """Shards written by ``preprocess_corpus``: already encoded, read as they are."""
    names = pf.schema_arrow.names
    want = ["bytes", "error", "file", "line"] + (["label"] if cfg.label_key else [])
    missing = [c for c in want if c not in names]
    if missing:
        raise DataError(f"{path}: not an encoded shard: no column {missing[0]!r} "
                        f"(columns: {', '.join(names)})")
    for batch in pf.iter_batches(batch_size=CHUNK_RECORDS, columns=want):
        table = pa.Table.from_batches([batch])
        if cfg.strict:
            _raise_first_error(table)
        yield table


def _read_file_task(cfg: DataConfig):
    """Ray map_batches UDF: one file path in, bounded chunks of raw records out."""

    def read(batch: dict) -> Iterator[pa.Table]:
        import pyarrow.parquet as pq

        for path in batch["path"]:
            path = str(path)
            fmt = _file_format(path, cfg)
            if fmt in ("parquet", "encoded"):
                pf = pq.ParquetFile(path)
                names = pf.schema_arrow.names
                if fmt == "encoded" or ("bytes" in names and cfg.text_key not in names):
                    for chunk, table in enumerate(_encoded_chunks(pf, path, cfg)):
                        yield _shuffled(table, cfg, path, chunk) if cfg.shuffle else table
                    continue
                records = _read_parquet_rows(pf, path, cfg)
            else:
                records = _records(path, fmt, cfg)
            rows, size, chunk = [], 0, 0
            for rec in records:
                if cfg.strict and rec[3]:
                    raise DataError(f"{path}:{rec[0]}: {rec[3]}: {rec[4]}")
                rows.append(rec)
                size += len(rec[1]) if rec[1] is not None else 0
                if len(rows) >= CHUNK_RECORDS or size >= CHUNK_BYTES:
                    table = _encode(_chunk_table(path, rows, cfg), cfg)
                    yield _shuffled(table, cfg, path, chunk) if cfg.shuffle else table
                    rows, size, chunk = [], 0, chunk + 1
            if rows:
                table = _encode(_chunk_table(path, rows, cfg), cfg)
                yield _shuffled(table, cfg, path, chunk) if cfg.shuffle else table

    return read


def _raise_first_error(table: pa.Table) -> None:
    errors = table.column("error").to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(errors != "")
    if len(bad):
        i = int(bad[0])
        detail = table.column("detail")[i].as_py() if "detail" in table.column_names else ""
        raise DataError(f"{table.column('file')[i].as_py()}:{table.column('line')[i].as_py()}: "
                        f"{errors[i]}" + (f": {detail}" if detail else ""))


def _encode(table: pa.Table, cfg: DataConfig) -> pa.Table:
    """Raw text rows -> ``bytes`` via the one vectorised preprocessing; flags empty texts."""
    n = len(table)
    errors = table.column("error").to_numpy(zero_copy_only=False).astype(object)
    ok = np.flatnonzero(errors == "")
    flat, offsets = encode_batch(table.column("text").take(pa.array(ok)), cfg.transliterate)
    lengths = np.zeros(n, np.int64)
    lengths[ok] = np.diff(offsets)
    # preprocess pads every text with "\n " + " ": a record of padding only had no text.
    pad = len(FRONT_PAD.encode()) + len(END_PAD.encode())
    pad_only = ok[lengths[ok] <= pad]
    if len(pad_only):
        errors[pad_only] = "empty_text"
        flat = flat[np.repeat(lengths[ok] > pad, np.diff(offsets))]
        lengths[pad_only] = 0
    full = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=full[1:])
    data = pa.LargeBinaryArray.from_buffers(pa.large_binary(), n,
                                            [None, pa.py_buffer(full), pa.py_buffer(flat)])
    cols = {"bytes": data, "error": pa.array(errors, pa.string()),
            "file": table.column("file"), "line": table.column("line"),
            "detail": table.column("detail")}
    if cfg.label_key:
        cols["label"] = table.column("label")
    out = pa.table(cols)
    if cfg.strict:
        _raise_first_error(out)
    return out.select(["bytes", "error", "file", "line"] + (["label"] if cfg.label_key else []))


def read_dataset(paths, cfg: DataConfig):
    """Corpus -> ray.data.Dataset with columns bytes, error, file, line (+ label).

    Paths are resolved (and fail) on the driver; each file then becomes one Ray read task
    whose output blocks hold at most CHUNK_RECORDS records.
    """
    import ray

    if cfg.data_format not in FORMATS:
        raise DataError(f"unknown data_format {cfg.data_format!r} (one of {', '.join(FORMATS)})")
    files = resolve_paths(paths)
    for path in files:
        _file_format(path, cfg)  # compressed files fail here, before any task
    if cfg.shuffle:
        rng = np.random.default_rng(cfg.seed)
        files = [files[i] for i in rng.permutation(len(files))]
    items = [{"path": p} for p in files]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.map_batches(_read_file_task(cfg), batch_size=1, batch_format="numpy")


def build_datasets(cfg: DataConfig) -> dict:
    """{"train", "val", "test"} Ray Datasets: explicit paths, else a deterministic split.

    Proportions apply to the splits not given explicitly: with --valid set, --split 1000,1,1
    sends 1/1001 of --train to test and the rest to train. A split of proportion 0 is None.
    """
    if not cfg.train:
        raise DataError("no training data: set --train")
    props = parse_split(cfg.split)
    explicit = {"val": cfg.valid, "test": cfg.test}
    for i, name in ((1, "val"), (2, "test")):
        if explicit[name]:
            props[i] = 0.0
            resolve_paths(explicit[name])  # fail on the driver, before any task
    total = sum(props)
    props = [p / total for p in props]
    files = resolve_paths(cfg.train)
    root = _root_of(files)
    base = read_dataset(files, cfg)
    out = {}
    edges = np.cumsum([0.0] + props)
    for i, name in enumerate(("train", "val", "test")):
        if name != "train" and explicit[name]:
            out[name] = read_dataset(explicit[name], cfg)
        elif props[i] == 0:
            out[name] = None
        elif props[i] == 1:
            out[name] = base
        else:
            hi = 1.0 + 1e-9 if i == 2 or props[i + 1:] == [0.0] * (2 - i) else edges[i + 1]
            out[name] = base.map_batches(split_filter(edges[i], hi, root, cfg.seed),
                                         batch_format="pyarrow", batch_size=None)
    return out


# ----------------------------------------------------------------------------- errors from Ray

_DATA_ERROR_RE = re.compile(r"DataError: ([^\n]+)")


def as_data_error(exc: BaseException) -> Optional[DataError]:
    """The DataError behind a Ray task failure (Ray wraps it in RayTaskError), or None.

    Use it where a dataset is consumed to turn strict mode's failure back into one clear line:
    ``except Exception as e: raise (as_data_error(e) or e) from None``.
    """
    if type(exc) is DataError:
        return exc
    match = _DATA_ERROR_RE.findall(str(exc))  # Ray keeps the message, not always the class
    if match:
        return DataError(match[-1].strip())
    return exc if isinstance(exc, DataError) else None
