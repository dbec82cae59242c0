"""One file, or one byte range of it -> blocks of raw records: the read stage's whole job.

A raw block has the columns ``file``, ``line`` (1-based physical line; the record number for
JSON arrays and Parquet), ``raw`` (large_binary), ``json`` (whether ``raw`` is a JSON object or
a text line), ``error`` and ``detail``. Line formats (loose JSON, text) are only split into
lines here, with numpy over 1 MiB reads, so reading costs about what decompressing costs;
parsing and encoding are the parse stage's (``sentdisc.data.records``), which Ray Data fuses
into the read tasks or, for a big compressed file, runs as tasks of its own (see readers).
CSV, JSON arrays and Parquet cannot be split without parsing, so their records are parsed
here and handed on re-expressed as small JSON objects: one parse stage serves every format.

A read error that Ray Data would not retry (a truncated or damaged archive) ends the file with
one ``corrupt_file`` row at the first line not read; the lines before it are kept.
"""
from __future__ import annotations

import csv
import io
import json
import lzma
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa

from sentdisc.data.config import MAX_LINE_BYTES, DataConfig, DataError

READ_BYTES = 1 << 20     # one read; on a damaged archive what the failing read held is lost
CHUNK_RECORDS = 8192     # records per block for the formats parsed here
READ_ERRORS = (OSError, EOFError, lzma.LZMAError, pa.ArrowInvalid, csv.Error)


def raw_block(uri: str, lines, raw: pa.Array, is_json: bool, errors=None, details=None) -> pa.Table:
    n = len(raw)
    return pa.table({
        "file": pa.array([uri] * n, pa.string()),
        "line": pa.array(lines, pa.int64()),
        "raw": raw,
        "json": pa.array(np.full(n, is_json)),
        "error": pa.array(errors if errors is not None else [""] * n, pa.string()),
        "detail": pa.array(details if details is not None else [""] * n, pa.string()),
    })


def error_block(uri: str, line: int, reason: str, detail: str) -> pa.Table:
    return raw_block(uri, [line], pa.array([b""], pa.large_binary()), False, [reason], [detail])


def damage(line: int, e: BaseException) -> str:
    text = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return f"cannot be read past line {line - 1} ({text}); the lines before it were kept"


# ----------------------------------------------------------------------------- lines

def _as_lines(buf: bytes, start: int, ends: np.ndarray) -> pa.LargeBinaryArray:
    """Lines buf[start:ends[0]], buf[ends[0]:ends[1]], ... without copying buf."""
    offsets = np.concatenate(([start], ends)).astype(np.int64)
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(ends),
                                            [None, pa.py_buffer(offsets), pa.py_buffer(buf)])


def _lines_or_too_long(buf: bytes, ends: np.ndarray, too_long: tuple) -> Iterator:
    """The whole lines of buf (ending at ``ends``), each over MAX_LINE_BYTES as ``too_long``."""
    starts = np.concatenate(([0], ends[:-1]))
    prev = 0
    for i in np.flatnonzero(ends - starts > MAX_LINE_BYTES):  # rare: a loop is fine
        if i > prev:
            yield _as_lines(buf, int(starts[prev]), ends[prev:i])
        yield too_long
        prev = i + 1
    if prev < len(ends):
        yield _as_lines(buf, int(starts[prev]), ends[prev:])


def line_arrays(f, limit: int | None = None, read_bytes: int = READ_BYTES,
                transient: Callable[[BaseException], bool] = lambda e: False) -> Iterator:
    """Whole lines of a stream (each keeping its newline), an array per read.

    With ``limit``, only the lines that start before that offset (a byte range: a line belongs
    to the range holding its first byte). Yields ``(reason, detail)`` instead of lines for a
    line over MAX_LINE_BYTES (dropped as it streams, never held whole) and, last, for a read
    error that is not ``transient`` (transient ones propagate, for Ray Data to retry).
    """
    too_long = ("too_long", f"a line over {MAX_LINE_BYTES} bytes")
    tail, offset, skipping = b"", 0, False  # offset: where tail, the unfinished line, starts
    while limit is None or offset < limit:
        try:
            chunk = f.read(read_bytes)
        except READ_ERRORS as e:
            if transient(e):
                raise
            yield ("corrupt_file", e)
            return
        if not chunk:  # the end: the last line may lack its newline
            if skipping:
                yield too_long
            elif tail:
                yield from _lines_or_too_long(tail, np.array([len(tail)]), too_long)
            return
        buf = tail + chunk if tail else chunk
        ends = np.flatnonzero(np.frombuffer(buf, np.uint8) == 10) + 1
        if skipping:
            if not len(ends):
                tail, offset = b"", offset + len(buf)
                continue
            yield too_long
            cut = int(ends[0])
            skipping, buf, offset, ends = False, buf[cut:], offset + cut, ends[1:] - cut
            if limit is not None and offset >= limit:
                return
        if limit is not None:  # lines starting at or past the limit belong to the next range
            starts = offset + np.concatenate(([0], ends[:-1]))
            ends = ends[: np.searchsorted(starts, limit)]
        yield from _lines_or_too_long(buf, ends, too_long)
        cut = int(ends[-1]) if len(ends) else 0
        tail, offset = buf[cut:], offset + cut
        if len(tail) > MAX_LINE_BYTES:
            tail, offset, skipping = b"", offset + len(tail), True


def line_blocks(f, uri: str, first_line: int, is_json: bool, limit: int | None = None,
                transient: Callable[[BaseException], bool] = lambda e: False) -> Iterator[pa.Table]:
    """``line_arrays`` as raw blocks numbered from ``first_line`` (Ray Data's output buffer
    gathers them into blocks of the dataset's target size)."""
    line = first_line
    for item in line_arrays(f, limit, transient=transient):
        if isinstance(item, tuple):
            reason, detail = item
            yield error_block(uri, line, reason, damage(line, detail) if reason == "corrupt_file" else detail)
            line += 1
        else:
            yield raw_block(uri, np.arange(line, line + len(item)), item, is_json)
            line += len(item)


# ----------------------------------------------------------------------------- records
# Each yields (line, raw JSON object or b"", error, detail).

def record_blocks(uri: str, records, transient) -> Iterator[pa.Table]:
    """Records gathered CHUNK_RECORDS to a block; a read error ends them with corrupt_file."""
    rows, line = [], 0
    try:
        for rec in records:
            rows.append(rec)
            line = rec[0]
            if len(rows) >= CHUNK_RECORDS:
                yield _records_table(uri, rows)
                rows = []
    except READ_ERRORS as e:
        if transient(e):
            raise
        rows.append((line + 1, b"", "corrupt_file", damage(line + 1, e)))
    if rows:
        yield _records_table(uri, rows)


def _records_table(uri: str, rows: list) -> pa.Table:
    lines, raws, errors, details = zip(*rows)
    return raw_block(uri, lines, pa.array(raws, pa.large_binary()), True, errors, details)


def _as_json(text, label, cfg: DataConfig) -> bytes:
    """A record found in a table, as the JSON object the parse stage reads. Surrogate-escaped
    bytes (CSV's invalid UTF-8) survive as escapes and are reported there as invalid_utf8."""
    obj = {cfg.text_key: text}
    if cfg.label_key:
        obj[cfg.label_key] = label
    return json.dumps(obj, default=str).encode()


def csv_records(f, cfg: DataConfig, delim: str):
    # surrogateescape keeps invalid bytes visible to the parse stage instead of failing the file.
    # utf-8-sig drops a byte-order mark (Excel writes one), which would otherwise stick to the
    # first column's name and make every row missing_key; the JSON and text parsers drop it too.
    text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline="")
    csv.field_size_limit(max(csv.field_size_limit(), MAX_LINE_BYTES))
    reader = csv.reader(text, delimiter=delim)
    header = next(reader, None)
    if header is None:
        return
    header = [h.strip() for h in header]
    cols = {h: i for i, h in enumerate(header)}
    missing = [k for k in (cfg.text_key, cfg.label_key) if k and k not in cols]
    need = max(cols.get(k, 0) for k in (cfg.text_key, cfg.label_key) if k)
    start = reader.line_num + 1
    for row in reader:
        line, start = start, reader.line_num + 1
        if not row:
            yield (line, b"", "blank", "")
        elif missing:
            yield (line, b"", "missing_key", f"no column {missing[0]!r} (columns: {', '.join(header)})")
        elif len(row) <= need:
            yield (line, b"", "missing_key", f"row has {len(row)} fields")
        else:
            # The cell as written: the label column is also scoring's id, and reading numbers
            # out of it would rewrite ids (000123 -> 123, 1e5 -> 100000.0) and, with numeric and
            # other cells in one column, give the block mixed types that Arrow cannot hold.
            label = row[cols[cfg.label_key]] if cfg.label_key else None
            yield (line, _as_json(row[cols[cfg.text_key]], label, cfg), "", "")


def json_array_records(f, cfg: DataConfig):
    """A JSON array of objects (or one object), parsed whole: the format has no lines to split."""
    try:
        data = json.loads(f.read())
    except UnicodeDecodeError as e:
        yield (1, b"", "invalid_utf8", str(e))
        return
    except json.JSONDecodeError as e:
        yield (1, b"", "bad_json", f"not a JSON array ({e}); loose JSON needs --loose_json "
                                   "or --data_format loose_json")
        return
    data = [data] if isinstance(data, dict) else data
    if not isinstance(data, list):
        yield (1, b"", "bad_json", f"expected a JSON array of objects, got {type(data).__name__}")
        return
    keys = [k for k in (cfg.text_key, cfg.label_key) if k]
    for i, obj in enumerate(data, 1):
        if isinstance(obj, dict):
            yield (i, json.dumps({k: obj[k] for k in keys if k in obj}).encode(), "", "")
        else:
            yield (i, b"", "bad_json", f"expected an object, got {type(obj).__name__}")


def parquet_records(f, cfg: DataConfig, uri: str):
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    names = pf.schema_arrow.names
    cols = [k for k in (cfg.text_key, cfg.label_key) if k]
    for key in cols:
        if key not in names:
            raise DataError(f"{uri}: no column {key!r} (columns: {', '.join(names)})")
    line = 0
    for batch in pf.iter_batches(batch_size=CHUNK_RECORDS, columns=cols):
        texts = batch.column(0).to_pylist()
        labels = batch.column(1).to_pylist() if cfg.label_key else [None] * len(texts)
        for text, label in zip(texts, labels):
            line += 1
            if isinstance(text, bytes):
                try:
                    text = text.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield (line, b"", "invalid_utf8", str(e))
                    continue
            yield (line, _as_json(text, label, cfg), "", "")


def encoded_blocks(f, cfg: DataConfig) -> Iterator[pa.Table]:
    """Shards ``sentdisc data preprocess`` wrote: rows already, read as they are."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    names = pf.schema_arrow.names
    cols = [c for c in ("bytes", "error", "file", "line", "capped") if c in names]
    cols += ["label"] if cfg.label_key else []
    for batch in pf.iter_batches(batch_size=CHUNK_RECORDS, columns=cols):
        yield pa.Table.from_batches([batch])
