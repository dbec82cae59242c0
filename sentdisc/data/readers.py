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
      -> ray.data.read_datasource(CorpusDatasource)   read: bytes -> raw lines / records
      -> map_batches(parse_records)                  parse: JSON + encode_batch -> rows

Read tasks: one per piece (a file, or a byte range of a big one: ``sentdisc.data.datasource``),
and blocks of 8 MiB (``BLOCK_BYTES``, set on the dataset's own DataContext, not the global
one), so a read streams into the parse stage as it goes rather than in Ray's default 128 MiB
steps. Left to choose, Ray asks for at least 200 read tasks; with fewer pieces than that it
splits every block of each task into sub-MiB pieces and stops fusing. Measured on this 2-core
machine (``benchmarks/bench_pipeline.py``'s driver, 30 gzipped 12 MB shards and 10 listed
copies): one task per piece read 1x in 15 s (first window 4.3 s) against 26 s (12.6 s), 10x in
84 s against 95 s, and its peak memory stayed flat from 1x to 10x (driver 282 -> 285 MiB,
largest worker 192 -> 201 MiB) where Ray's split plan at 1x and fused plan at 10x made it look
like growth (147 -> 203 MiB). A corpus of many tiny files pays a task each: preprocess it.

Fused or not: Ray Data fuses a read with the map after it when their remote args agree
(``operator_fusion.py``). Measured the same way (MB/s of encoded records into the driver,
best of 3, load ~3, 8 MiB blocks, one task per piece):

    corpus                              fused   parse as its own stage
    1 gzipped file, 140 MB of JSON       50       50   (read 0.7 s, then 18 parse tasks)
    16 gzipped files, 170 MB             48       39

Fused costs nothing where there are files enough to spread, and saves a trip through the
object store; but fused, a compressed file is parsed in its one read task, on one core
(~50 MB/s), since it has no byte ranges to split. So the stages are fused unless the corpus
holds a compressed line file over ``read_task_bytes``: then read tasks ask for half a CPU
(they stream and decompress: gunzip runs at ~250 MB/s against ~70 MB/s of parsing per core),
and unequal remote args keep the parse stage its own operator, whose tasks spread the raw
blocks over every core.

Rows: ``bytes``, ``error``, ``file``, ``line``, ``capped`` (+ ``label``): see
``sentdisc.data.records``. Splits: ``sentdisc.data.splits``, by (file relative to the corpus
root, compression suffix dropped; line), so a corpus moved between storages or gzipped keeps
its split.
"""
from __future__ import annotations

import dataclasses
import heapq
import re
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sentdisc.data.config import (  # noqa: F401  (re-exported: the names callers import from here)
    _EXT_FORMATS,
    FORMATS,
    LINE_FORMATS,
    REASONS,
    DataConfig,
    DataError,
    compression_of,
    file_format,
)
from sentdisc.data.paths import corpus_root, list_corpus, on_one_filesystem, resolve_paths  # noqa: F401
from sentdisc.data.splits import parse_split, split_filter

BLOCK_BYTES = 8 << 20
# What a read task reserves when the parse stage must be its own operator: less than the
# parse stage's 1 CPU, and unequal remote args are what keeps Ray Data from fusing them.
STREAM_READ_CPUS = 0.5
ENCODED_COLUMNS = ["bytes", "error", "file", "line"]


def read_dataset(paths, cfg: DataConfig):
    """Corpus -> ray.data.Dataset with columns bytes, error, file, line, capped (+ label).

    Paths are listed (and fail) on the driver; the read and parse stages then run as Ray tasks.
    """
    return read_files(list_corpus(paths), cfg)


def read_files(files: list[tuple[str, int]], cfg: DataConfig):
    """``read_dataset`` of files listed already (``list_corpus``)."""
    from sentdisc.data.datasource import CorpusDatasource
    from sentdisc.data.records import check_encoded, parse_records

    if cfg.data_format not in FORMATS:
        raise DataError(f"unknown data_format {cfg.data_format!r} (one of {', '.join(FORMATS)})")
    fs, prefix, paths = on_one_filesystem([uri for uri, _ in files])
    formats = {file_format(uri, cfg) for uri, _ in files}  # a compressed Parquet fails here
    sized = list(zip(paths, [size for _, size in files]))
    if _is_encoded(formats, fs, paths[0], cfg):  # already rows: no parse stage
        cfg = _encoded(fs, paths[0], cfg)
        return _read(CorpusDatasource(sized, cfg, fs, prefix)).map_batches(
            check_encoded(cfg), batch_format="pyarrow", batch_size=None)
    source = CorpusDatasource(sized, cfg, fs, prefix)
    big_stream = any(compression_of(uri) and file_format(uri, cfg) in LINE_FORMATS
                     and size > cfg.read_task_bytes for uri, size in files)
    ds = _read(source, num_cpus=STREAM_READ_CPUS) if big_stream else _read(source)
    return ds.map_batches(parse_records(cfg), batch_format="pyarrow", batch_size=None,
                          zero_copy_batch=True)


def _read(source, **kw):
    """One read task per piece, blocks of BLOCK_BYTES."""
    import ray

    ds = ray.data.read_datasource(source, override_num_blocks=source.num_pieces, **kw)
    ds.context.target_max_block_size = BLOCK_BYTES  # this dataset's context, a copy
    return ds


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
    listed = {name: list_corpus(getattr(cfg, attr))  # fail on the driver, before any task
              for name, attr in (("val", "valid"), ("test", "test")) if getattr(cfg, attr)}
    files = list_corpus(cfg.train)
    root = corpus_root([uri for uri, _ in files])
    base = read_files(files, cfg)
    out = {}
    for name, bounds in split_bounds(cfg).items():
        if name in listed:
            out[name] = read_files(listed[name], cfg)
        elif bounds is None:
            out[name] = None
        elif bounds == (0.0, ALL):
            out[name] = base
        else:
            out[name] = base.map_batches(split_filter(*bounds, root, cfg.seed),
                                         batch_format="pyarrow", batch_size=None)
    return out


ALL = 1.0 + 1e-9  # the upper bound of a split that takes everything above its lower one


def split_bounds(cfg: DataConfig) -> dict:
    """{"train", "val", "test"}: the [lo, hi) of split_fraction each takes of --train, None
    for a split of proportion 0 (an explicit --valid / --test takes its proportion's place)."""
    props = parse_split(cfg.split)
    for i, attr in ((1, "valid"), (2, "test")):
        if getattr(cfg, attr):
            props[i] = 0.0
    total = sum(props)
    props = [p / total for p in props]
    edges = np.cumsum([0.0] + props)
    out = {}
    for i, name in enumerate(("train", "val", "test")):
        last = i == 2 or props[i + 1:] == [0.0] * (2 - i)
        out[name] = None if props[i] == 0 else (float(edges[i]), ALL if last else float(edges[i + 1]))
    return out


def train_split(cfg: DataConfig) -> dict:
    """What a worker needs to tell the training split's lines from the others' (the data
    position's ranges span the gaps the split leaves): {lo, hi, root, seed}, or {} when the
    training split is the whole corpus."""
    bounds = split_bounds(cfg)["train"]
    if bounds == (0.0, ALL):
        return {}
    root = corpus_root([uri for uri, _ in list_corpus(cfg.train)])
    return {"lo": bounds[0], "hi": bounds[1], "root": root, "seed": cfg.seed}


# ----------------------------------------------------------------------------- survey
# What a corpus holds, in one streaming pass before training: the driver sizes a run from
# ``bytes`` (what the packer can use) and stops before any worker starts when ``records`` is 0.
# Each block becomes one row of counts (pyarrow compute, in the Ray tasks); the driver adds
# rows up, so its memory stays flat whatever the corpus size.

SURVEY_KEYS = ("lines", "records", "bytes", "capped_records", "capped_bytes") + tuple(
    f"skipped_{r}" for r in REASONS)
EXAMPLE_TYPE = pa.list_(pa.struct([("file", pa.string()), ("line", pa.int64()),
                                   ("reason", pa.string())]))


def block_counts(table: pa.Table, examples: Optional[int] = None) -> pa.Table:
    """One row of counts for a block of rows: SURVEY_KEYS, the corrupt files and, with
    ``examples``, the block's first that many bad records."""
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
    if examples is not None:
        first = table.select(["file", "line", "error"]).filter(pc.invert(ok)).slice(0, examples)
        row["examples"] = pa.array([[{"file": f, "line": n, "reason": r} for f, n, r in zip(
            *(first.column(c).to_pylist() for c in ("file", "line", "error")))]], EXAMPLE_TYPE)
    return pa.table(row)


def skipped_by_reason(counts: dict) -> dict:
    """{reason: records} of the skip reasons that occurred in ``survey``'s counts."""
    return {k[len("skipped_"):]: v for k, v in counts.items() if k.startswith("skipped_") and v}


def survey(ds, examples: Optional[int] = None) -> dict:
    """Counts of a dataset of rows (``read_dataset``'s): ``lines`` (all rows), ``records`` and
    ``bytes`` (good ones, bytes after capping), ``capped_records``, ``capped_bytes``, one
    ``skipped_<reason>`` per reason in ``REASONS``, and ``corrupt_files`` ("file:line" of each
    file that could not be read to its end); with ``examples``, also ``examples``: the first
    that many bad records by (file, line), each {file, line, reason}."""
    totals = dict.fromkeys(SURVEY_KEYS, 0)
    corrupt: list[str] = []
    first: list[dict] = []
    counted = ds.map_batches(block_counts, fn_kwargs={"examples": examples},
                             batch_format="pyarrow", batch_size=None)
    for batch in counted.iter_batches(batch_format="pyarrow", batch_size=None):
        for k in SURVEY_KEYS:
            totals[k] += int(np.sum(batch.column(k).to_numpy()))
        corrupt += [name for names in batch.column("corrupt_files").to_pylist() for name in names]
        if examples is not None:  # blocks come in any order: keep the smallest seen so far
            found = [e for block in batch.column("examples").to_pylist() for e in block]
            first = heapq.nsmallest(examples, first + found, key=lambda e: (e["file"], e["line"]))
    totals["corrupt_files"] = sorted(corrupt)
    if examples is not None:
        totals["examples"] = first
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
