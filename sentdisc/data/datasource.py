"""``CorpusDatasource``: a corpus on any storage as a Ray Data ``FileBasedDatasource``.

Ray Data's file datasource gives the filesystem handling: the pyarrow filesystem passed in
(``sentdisc.storage``'s, so every read task has the same S3 endpoint, timeouts and
credentials), its retries of transient S3 errors (``DataContext.retried_io_errors``), and the
serialisation of the file list as one object-store reference rather than one copy per task.
What we add is the unit of work:

* A **piece** is a whole file, or a byte range of an uncompressed line file (loose JSON, text)
  larger than ``DataConfig.read_task_bytes``, so one big file is many read tasks. A line
  belongs to the range holding its first byte. Line numbers stay exact: at build time one Ray
  task per range counts its newlines (in parallel, at memchr speed) and prefix sums give
  each range its first line number.
* A compressed file is one piece: a deflate stream has no random access. It streams through
  pyarrow's decompressing reader in 1 MiB reads, so memory stays flat whatever its size, and
  it yields raw lines only: the parsing is the parse stage's (``sentdisc.data.records``),
  which for a big compressed file runs in tasks of its own, on every core (see readers).

Read tasks hold consecutive pieces, in order (``read_dataset`` asks for one task per piece);
with ``shuffle`` the pieces are in a seeded order, the same every run.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import ray
from ray._common.retry import matches_error
from ray.data._internal.util import iterate_with_retry
from ray.data.block import BlockMetadata
from ray.data.datasource import FileBasedDatasource, ReadTask
from ray.data.datasource.file_based_datasource import (
    _unwrap_s3_serialization_workaround,
    _wrap_s3_serialization_workaround,
)
from ray.data.datasource.file_meta_provider import DefaultFileMetadataProvider

from sentdisc.data import formats
from sentdisc.data.config import (
    LINE_FORMATS,
    DataConfig,
    DataError,
    compression_of,
    file_format,
    open_decompressed,
)


@dataclass(frozen=True)
class Piece:
    """What one read task reads of one file: all of it, or bytes [start, end)."""
    path: str                  # inside the filesystem
    size: int                  # bytes read (metadata for Ray's planning)
    start: int = 0
    end: Optional[int] = None  # None: the whole file, through its decompressor if any
    first_line: int = 1        # 1 + the newlines before ``start``


class _KnownSizes(DefaultFileMetadataProvider):
    """The sizes listed on the driver already (``list_corpus``): no second listing."""

    def __init__(self, sizes: dict[str, int]):
        super().__init__()
        self._sizes = sizes

    def expand_paths(self, paths, filesystem, partitioning=None, ignore_missing_paths=False):
        for path in paths:
            if path in self._sizes:
                yield path, self._sizes[path]
            else:  # a name Ray normalised differently: ask the filesystem
                yield from super().expand_paths([path], filesystem, partitioning, ignore_missing_paths)


class CorpusDatasource(FileBasedDatasource):
    """Files -> blocks of raw records (``sentdisc.data.formats``), one or more pieces a task."""

    def __init__(self, files: list[tuple[str, int]], cfg: DataConfig, filesystem, prefix: str = ""):
        sizes = dict(files)
        super().__init__(list(sizes), filesystem=filesystem, meta_provider=_KnownSizes(sizes))
        self._reader = _Reader(cfg, prefix, tuple(self._data_context.retried_io_errors),
                               self._data_context.streaming_read_buffer_size)
        pieces = plan_pieces(self._filesystem.unwrap(), files, cfg, prefix)
        if cfg.shuffle:  # file order, seeded: every run and every epoch read the same order
            pieces = [pieces[i] for i in np.random.default_rng(cfg.seed).permutation(len(pieces))]
        self._pieces_ref = ray.put(pieces)
        self.num_pieces = len(pieces)

    def get_name(self) -> str:
        return "Corpus"

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None
                       ) -> list[ReadTask]:
        pieces = ray.get(self._pieces_ref)
        fs = _wrap_s3_serialization_workaround(self._filesystem)
        tasks = []
        for idx in np.array_split(np.arange(len(pieces)), max(1, min(parallelism, len(pieces)))):
            group = [pieces[i] for i in idx]
            meta = BlockMetadata(num_rows=None, size_bytes=int(sum(p.size for p in group)),
                                 input_files=[p.path for p in group], exec_stats=None)
            tasks.append(ReadTask(functools.partial(_read_pieces, fs, group, self._reader), meta,
                                  per_task_row_limit=per_task_row_limit))
        return tasks


def _read_pieces(fs, pieces: list[Piece], reader: _Reader) -> Iterator[pa.Table]:
    fs = _unwrap_s3_serialization_workaround(fs)
    for piece in pieces:
        # A retried attempt replays the piece from its start and skips the blocks already
        # yielded: blocks are deterministic, so nothing is read twice or lost.
        yield from iterate_with_retry(functools.partial(reader.read, fs, piece),
                                      description=f"read {piece.path}", match=list(reader.retried))


# ----------------------------------------------------------------------------- pieces

def plan_pieces(fs, files: list[tuple[str, int]], cfg: DataConfig, prefix: str = "") -> list[Piece]:
    """Whole files, and byte ranges of the uncompressed line files above read_task_bytes."""
    planned: list[list[Piece]] = []
    ranges: dict[int, list[tuple[int, int]]] = {}
    for path, size in files:
        uri = prefix + path
        if (size > cfg.read_task_bytes and compression_of(uri) is None
                and file_format(uri, cfg) in LINE_FORMATS):
            n = -(-size // cfg.read_task_bytes)
            step = -(-size // n)
            ranges[len(planned)] = [(s, min(s + step, size)) for s in range(0, size, step)]
        planned.append([Piece(path, size)])
    # One newline count per range (but each file's last), all in parallel; prefix sums then
    # number each range's first line.
    count = ray.remote(num_cpus=0.5)(_count_newlines)
    refs = {(i, s): count.remote(fs, planned[i][0].path, s, e)
            for i, bounds in ranges.items() for s, e in bounds[:-1]}
    counted = dict(zip(refs, ray.get(list(refs.values()))))
    for i, bounds in ranges.items():
        path, before, out = planned[i][0].path, 0, []
        for s, e in bounds:
            out.append(Piece(path, e - s, s, e, 1 + before))
            before += counted.get((i, s), 0)
        planned[i] = out
    return [piece for group in planned for piece in group]


def _count_newlines(fs, path: str, start: int, end: int) -> int:
    n = 0
    with fs.open_input_file(path) as f:
        f.seek(start)
        left = end - start
        while left > 0:
            chunk = f.read(min(8 << 20, left))
            if not chunk:
                break
            n += chunk.count(b"\n")
            left -= len(chunk)
    return n


# ----------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class _Reader:
    """What a read task needs besides its pieces; small, so cheap to ship with each task."""
    cfg: DataConfig
    prefix: str             # prefix + path = the file's URI as the user named it
    retried: tuple          # Ray Data's retried_io_errors patterns
    buffer_size: int

    def transient(self, e: BaseException) -> bool:
        return any(matches_error(p, str(e)) for p in self.retried)

    def read(self, fs, piece: Piece) -> Iterator[pa.Table]:
        uri, cfg = self.prefix + piece.path, self.cfg
        fmt = file_format(uri, cfg)
        if fmt in LINE_FORMATS and piece.end is not None:
            yield from self._read_range(fs, piece, uri, fmt == "loose_json")
            return
        if fmt in ("parquet", "encoded"):
            with fs.open_input_file(piece.path) as f:  # Parquet needs random access
                yield from (formats.encoded_blocks(f, cfg) if fmt == "encoded" else
                            formats.record_blocks(uri, formats.parquet_records(f, cfg, uri),
                                                  self.transient))
            return
        with self._open(fs, piece.path, uri) as f:
            if fmt in LINE_FORMATS:
                yield from formats.line_blocks(f, uri, 1, fmt == "loose_json",
                                               transient=self.transient)
            elif fmt in ("csv", "tsv"):
                delim = "\t" if fmt == "tsv" else (cfg.delim or ",")
                yield from formats.record_blocks(uri, formats.csv_records(f, cfg, delim),
                                                 self.transient)
            elif fmt == "json":
                yield from formats.record_blocks(uri, formats.json_array_records(f, cfg),
                                                 self.transient)
            else:
                raise DataError(f"{uri}: format {fmt!r} is not read by the corpus reader")

    def _open(self, fs, path: str, uri: str):
        return open_decompressed(fs, path, uri, self.buffer_size)

    def _read_range(self, fs, piece: Piece, uri: str, is_json: bool) -> Iterator[pa.Table]:
        with fs.open_input_file(piece.path) as f:
            first_line, start = piece.first_line, piece.start
            if start > 0:
                f.seek(start - 1)
                if f.read(1) != b"\n":  # the line under way belongs to the previous range
                    start += _skip_line(f)
                    first_line += 1
            if start < piece.end:
                yield from formats.line_blocks(f, uri, first_line, is_json, limit=piece.end - start,
                                               transient=self.transient)


def _skip_line(f) -> int:
    """Move a random-access file past the next newline; return the bytes passed over."""
    here, passed = f.tell(), 0
    while True:
        chunk = f.read(1 << 16)
        if not chunk:
            return passed
        i = chunk.find(b"\n")
        if i >= 0:
            f.seek(here + passed + i + 1)
            return passed + i + 1
        passed += len(chunk)
