"""What a corpus read is configured by, and the vocabulary every stage shares.

``DataConfig`` (the ``data:`` section of a run), ``DataError``, the formats, the compression
suffixes read transparently, and ``REASONS``: the one list of reasons a record is skipped.
Every bad record becomes a row whose ``error`` is one of them; the packer and ``survey`` count
it as ``skipped_<reason>`` and the training loop derives its counter names from this tuple.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from sentdisc.errors import InputError

FORMATS = ("auto", "loose_json", "json", "csv", "tsv", "parquet", "text", "encoded")
REASONS = (
    "bad_json",       # not a JSON object (a cut line, a raw NUL byte, a bare value)
    "missing_key",    # no text field (or no label field when one is asked for), or null
    "not_text",       # the text field holds a number, a list, an object or a bool
    "empty_text",     # nothing left once whitespace is stripped
    "invalid_utf8",   # bytes that are not UTF-8, or a lone surrogate escape in JSON
    "blank",          # an empty line: a row, so a file's rows add up to its line count
    "too_long",       # a line over MAX_LINE_BYTES: skipped as it streams, never buffered
    "corrupt_file",   # the file cannot be read past this line (a cut or damaged archive)
)
# Formats read as lines, so the read stage only splits bytes and the parse stage does the rest.
LINE_FORMATS = ("loose_json", "text")
_EXT_FORMATS = {".jsonl": "loose_json", ".ndjson": "loose_json", ".csv": "csv", ".tsv": "tsv",
                ".parquet": "parquet", ".pq": "parquet", ".txt": "text"}
# Read through a decompressing stream (pyarrow's codecs; xz through Python's lzma). The split
# key drops them, so ``x.json.gz`` splits exactly like ``x.json``.
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4", ".xz": "xz"}
# A line longer than this is not a review: it is skipped while it streams (``too_long``)
# rather than held in memory whole.
MAX_LINE_BYTES = 64 << 20


class DataError(InputError):
    """Bad corpus input: a missing path, an unknown format, or (strict mode) a bad record."""


@dataclass
class DataConfig:
    train: str = field(default="", metadata={
        "help": "training corpus: files, folders, globs, comma list; local or a URI (s3://, gs://)",
        "path": True, "comma": True})
    valid: str = field(default="", metadata={
        "help": "explicit validation corpus (else taken from --split)", "path": True, "comma": True})
    test: str = field(default="", metadata={
        "help": "explicit test corpus (else taken from --split)", "path": True, "comma": True})
    split: str = field(default="1000,1,1", metadata={
        "help": "train,val,test proportions of --train", "comma": True})
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
    # 256 MiB: several seconds of parsing per task, enough that per-task overhead is noise,
    # small enough that a 20 GB dump file becomes ~80 tasks that all cores share.
    read_task_bytes: int = field(default=256 << 20, metadata={
        "help": "an uncompressed line file larger than this is read as several byte-range tasks"})
    # 64 KiB: Amazon caps a review at ~5,000 words (~30 KB), so only broken records are cut;
    # it bounds what one packer stream holds and so the end-of-epoch drop (<= B x this).
    max_record_bytes: int = field(default=64 << 10, metadata={
        "help": "a record's encoded bytes are capped here (counted as capped_records/bytes)"})

    def __post_init__(self):
        from sentdisc.data.splits import parse_split  # (splits reads this module's names)

        parse_split(self.split)  # a bad --split fails with the flags, before Ray starts
        # a cap that leaves no room for a review's first words would empty every record
        if self.max_record_bytes < 64:
            raise InputError(f"--max_record_bytes must be at least 64, got {self.max_record_bytes}")
        if self.read_task_bytes < 1:
            raise InputError(f"--read_task_bytes must be at least 1, got {self.read_task_bytes}")
        if self.persist_state not in (-1, 0, 1):
            raise InputError(f"--persist_state must be -1, 0 or 1, got {self.persist_state}")


def compression_of(path: str) -> Optional[str]:
    """The codec a file name asks for ("gzip", "bz2", "zstd", "lz4", "xz"), or None."""
    return COMPRESSIONS.get(os.path.splitext(str(path).lower())[1])


def strip_compression(name: str) -> str:
    """``x.json.gz`` -> ``x.json``: the name a compressed file stands for."""
    return name[: -len(os.path.splitext(name)[1])] if compression_of(name) else name


def open_decompressed(fs, path: str, uri: str, buffer_size: int = 0):
    """A sequential stream of ``path`` on ``fs``, decompressed as ``uri``'s suffix says
    (pyarrow's codecs; xz through Python's lzma, which pyarrow lacks): how every reader here,
    corpora and labeled sets alike, opens a file."""
    import lzma

    codec = compression_of(uri)
    if codec == "xz":
        return lzma.open(fs.open_input_stream(path, buffer_size=buffer_size or None))
    return fs.open_input_stream(path, compression=codec, buffer_size=buffer_size or None)


def file_format(path: str, cfg: DataConfig, unknown: Optional[str] = None) -> str:
    """The format a file is read as: ``cfg.data_format``, else from its (uncompressed) name;
    a name this table does not know is ``unknown`` if given (a labeled table: csv), else loose
    JSON or text as ``cfg.loose_json`` says."""
    name = strip_compression(str(path).lower())
    fmt = cfg.data_format
    if fmt == "auto":
        ext = os.path.splitext(name)[1]
        if ext in _EXT_FORMATS:
            fmt = _EXT_FORMATS[ext]
        elif ext == ".json":
            fmt = "loose_json" if cfg.loose_json else "json"
        else:
            fmt = unknown or ("loose_json" if cfg.loose_json else "text")
    if fmt not in FORMATS:
        raise DataError(f"unknown data_format {fmt!r} (one of {', '.join(FORMATS)})")
    if fmt in ("parquet", "encoded") and compression_of(path):
        raise DataError(f"{path}: a compressed Parquet file is not read (Parquet compresses "
                        "its own pages: write it uncompressed)")
    return fmt
