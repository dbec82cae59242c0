"""Review corpora on any storage -> Ray Datasets of preprocessed bytes, one row per record.

A corpus is files, folders (recursive), globs or a comma list of those, local or behind a URI
(``s3://``, ``gs://``, ``file://``), in one of: loose JSON (one object per line: the Amazon
dump, also as it ships, ``.json.gz``), JSON arrays, CSV/TSV, Parquet with a text column, plain
text (one sample per line), each optionally ``.gz``/``.bz2``/``.zst``/``.lz4``/``.xz``; or the
encoded Parquet shards ``sentdisc data preprocess`` writes (the same datasource reads them, with
no parse stage: ``ray.data.read_parquet`` costs ~3 s of planning per pass, measured on 2 cores,
against 0.2 s for a small corpus, and every epoch is a pass).

The pipeline::

    list_corpus (driver: sentdisc.storage; every path error here, before any task)
      -> ray.data.read_datasource(CorpusDatasource)      read: bytes -> raw lines/records
      -> map_batches(parse_records)                     parse: JSON + encode_batch -> rows

The two stages are two operators on purpose: Ray Data fuses a read with the map after it when
their remote args agree (``operator_fusion.py``), and fused, a compressed file's parsing runs
in its one read task. Read tasks ask for half a CPU (they stream, decompress and split lines:
~250 MB/s of gunzip against ~35 MB/s of JSON parsing + encoding per core), so the parse stage
is its own operator whose tasks take the raw blocks onto every core. Measured on 2 cores with
``benchmarks/bench_pipeline.py``'s synthetic dump (see its docstring for the figures).

Rows: ``bytes``, ``error``, ``file``, ``line``, ``capped`` (+ ``label``): see
``sentdisc.data.records``. Splits: ``sentdisc.data.splits``, by (file relative to the corpus
root, compression suffix dropped; line), so a corpus moved between storages or gzipped keeps
its split.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sentdisc.data.config import (  # noqa: F401  (re-exported: the names callers import from here)
    _EXT_FORMATS,
    FORMATS,
    REASONS,
    DataConfig,
    DataError,
    file_format,
)
from sentdisc.data.paths import corpus_root, list_corpus, on_one_filesystem, resolve_paths  # noqa: F401
from sentdisc.data.splits import parse_split, split_filter

# CPUs a read task reserves: below the parse stage's 1, which keeps the two stages apart.
READ_CPUS = 0.5
ENCODED_COLUMNS = ["bytes", "error", "file", "line"]


def read_dataset(paths, cfg: DataConfig):
    """Corpus -> ray.data.Dataset with columns bytes, error, file, line, capped (+ label).

    Paths are listed (and fail) on the driver; the read and parse stages then run as Ray tasks.
    """
    return read_files(list_corpus(paths), cfg)


def read_files(files: list[tuple[str, int]], cfg: DataConfig):
    import ray

    from sentdisc.data.datasource import CorpusDatasource
    from sentdisc.data.records import check_encoded, parse_records

    if cfg.data_format not in FORMATS:
        raise DataError(f"unknown data_format {cfg.data_format!r} (one of {', '.join(FORMATS)})")
    fs, prefix, paths = on_one_filesystem([uri for uri, _ in files])
    formats = {file_format(uri, cfg) for uri, _ in files}  # a compressed Parquet fails here
    sized = list(zip(paths, [size for _, size in files]))
    if _is_encoded(formats, fs, paths[0], cfg):  # already rows: no parse stage
        cfg = _encoded(fs, paths[0], cfg)
        return ray.data.read_datasource(CorpusDatasource(sized, cfg, fs, prefix)).map_batches(
            check_encoded(cfg), batch_format="pyarrow", batch_size=None)
    source = CorpusDatasource(sized, cfg, fs, prefix)
    return ray.data.read_datasource(source, num_cpus=READ_CPUS).map_batches(
        parse_records(cfg), batch_format="pyarrow", batch_size=None, zero_copy_batch=True)


def _is_encoded(formats: set, fs, first: str, cfg: DataConfig) -> bool:
    if formats == {"encoded"}:
        return True
    if formats != {"parquet"}:
        return False
    import pyarrow.parquet as pq

    names = pq.read_schema(first, filesystem=fs).names
    return "bytes" in names and cfg.text_key not in names


def _encoded(fs, path: str, cfg: DataConfig) -> DataConfig:
    """cfg for reading shards ``sentdisc data preprocess`` wrote, checked against the first."""
    import pyarrow.parquet as pq

    names = pq.read_schema(path, filesystem=fs).names
    want = ENCODED_COLUMNS + (["label"] if cfg.label_key else [])
    missing = [c for c in want if c not in names]
    if missing:
        raise DataError(f"{path}: not an encoded shard: no column {missing[0]!r} "
                        f"(columns: {', '.join(names)})")
    return dataclasses.replace(cfg, data_format="encoded")


def build_datasets(cfg: DataConfig) -> dict:
    """{"train", "val", "test"} Ray Datasets: explicit paths, else a deterministic split.

    Proportions apply to the splits not given explicitly: with --valid set, --split 1000,1,1
    sends 1/1001 of --train to test and the rest to train. A split of proportion 0 is None.
    """
    if not cfg.train:
        raise DataError("no training data: set --train")
    props = parse_split(cfg.split)
    explicit = {"val": cfg.valid, "test": cfg.test}
    listed = {}
    for i, name in ((1, "val"), (2, "test")):
        if explicit[name]:
            props[i] = 0.0
            listed[name] = list_corpus(explicit[name])  # fail on the driver, before any task
    total = sum(props)
    props = [p / total for p in props]
    files = list_corpus(cfg.train)
    root = corpus_root([uri for uri, _ in files])
    base = read_files(files, cfg)
    out = {}
    edges = np.cumsum([0.0] + props)
    for i, name in enumerate(("train", "val", "test")):
        if name in listed:
            out[name] = read_files(listed[name], cfg)
        elif props[i] == 0:
            out[name] = None
        elif props[i] == 1:
            out[name] = base
        else:
            hi = 1.0 + 1e-9 if i == 2 or props[i + 1:] == [0.0] * (2 - i) else edges[i + 1]
            out[name] = base.map_batches(split_filter(edges[i], hi, root, cfg.seed),
                                         batch_format="pyarrow", batch_size=None)
    return out


# ----------------------------------------------------------------------------- survey
# What a corpus holds, in one streaming pass before training: the driver sizes a run from
# ``bytes`` (what the packer can use) and stops before any worker starts when ``records`` is 0.
# Each block becomes one row of counts (pyarrow compute, in the Ray tasks); the driver adds
# rows up, so its memory stays flat whatever the corpus size.

SURVEY_KEYS = ("lines", "records", "bytes", "capped_records", "capped_bytes") + tuple(
    f"skipped_{r}" for r in REASONS)


def block_counts(table: pa.Table) -> pa.Table:
    """One row of counts for a block of rows: SURVEY_KEYS, and the corrupt files."""
    error = table.column("error")
    ok = pc.equal(error, "")
    size = pc.if_else(ok, pc.binary_length(table.column("bytes")), 0)
    counts = {"lines": len(table), "records": pc.sum(ok).as_py() or 0,
              "bytes": pc.sum(size).as_py() or 0}
    if "capped" in table.column_names:
        capped = table.column("capped")
        counts["capped_records"] = pc.sum(pc.greater(capped, 0)).as_py() or 0
        counts["capped_bytes"] = pc.sum(capped).as_py() or 0
    found = pc.value_counts(error)
    for value, n in zip(found.field("values").to_pylist(), found.field("counts").to_pylist()):
        if value:
            counts[f"skipped_{value}"] = counts.get(f"skipped_{value}", 0) + n
    bad = pc.equal(error, "corrupt_file").to_numpy(zero_copy_only=False)
    corrupt = [f"{f}:{line}" for f, line in zip(table.column("file").filter(bad).to_pylist(),
                                                  table.column("line").filter(bad).to_pylist())]
    row = {k: pa.array([int(counts.get(k, 0))], pa.int64()) for k in SURVEY_KEYS}
    row["corrupt_files"] = pa.array([corrupt], pa.list_(pa.string()))
    return pa.table(row)


def survey(ds) -> dict:
    """Counts of a dataset of rows (``read_dataset``'s): ``lines`` (all rows), ``records`` and
    ``bytes`` (good ones, bytes after capping), ``capped_records``, ``capped_bytes``, one
    ``skipped_<reason>`` per reason in ``REASONS``, and ``corrupt_files`` ("file:line" of each
    file that could not be read to its end)."""
    totals = dict.fromkeys(SURVEY_KEYS, 0)
    corrupt: list[str] = []
    counted = ds.map_batches(block_counts, batch_format="pyarrow", batch_size=None)
    for batch in counted.iter_batches(batch_format="pyarrow", batch_size=None):
        for k in SURVEY_KEYS:
            totals[k] += int(np.sum(batch.column(k).to_numpy()))
        corrupt += [name for names in batch.column("corrupt_files").to_pylist() for name in names]
    totals["corrupt_files"] = sorted(corrupt)
    return totals


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
