"""Raw records -> training rows: the parse stage, after ``CorpusDatasource``'s read stage.

A ``map_batches`` UDF over the read stage's raw blocks: JSON parsing (per line, the one part
that is Python) and the one vectorised preprocessing, ``sentdisc.text.encode_batch``. Every
raw record becomes one row:

* ``bytes``: the preprocessed UTF-8 (large_binary), empty when the record is bad;
* ``error``: '' or one of ``REASONS``; ``file``, ``line``; ``label`` when ``label_key`` is set
  (a string: as written, or the JSON of a number or other value, so the column has one type);
* ``capped``: how many encoded bytes were cut from a record over ``max_record_bytes`` (0 for
  the others): the packer and ``survey`` count them as ``capped_records`` / ``capped_bytes``.

Bad records stay rows, so nothing is dropped silently and a file's rows add up to its line
count; ``strict=True`` raises at the first one instead, as ``file:line: reason: detail``.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sentdisc.data.config import DataConfig, DataError
from sentdisc.text import END_PAD, FRONT_PAD, encode_batch

# Preprocessing pads every text with "\n " + " ": a record of padding only had no text.
PAD = len(FRONT_PAD.encode()) + len(END_PAD.encode())


def parse_records(cfg: DataConfig) -> Callable[[pa.Table], pa.Table]:
    """The parse stage: raw block in, rows out (``batch_format="pyarrow"``)."""

    def parse(raw: pa.Table) -> pa.Table:
        texts, labels, errors, details = _decode(raw, cfg)
        data, errors, capped = encode_rows(texts, errors, cfg)
        cols = {"bytes": data, "error": pa.array(errors, pa.string()), "file": raw.column("file"),
                "line": raw.column("line"), "capped": pa.array(capped, pa.int64())}
        if cfg.label_key:
            cols["label"] = pa.array(labels, pa.string())
        return _finish(pa.table(cols), cfg, details)

    return parse


def check_encoded(cfg: DataConfig) -> Callable[[pa.Table], pa.Table]:
    """For shards ``sentdisc data preprocess`` wrote: already rows; strict and shuffle only."""

    def check(table: pa.Table) -> pa.Table:
        if "capped" not in table.column_names:  # shards written before capping existed
            table = table.append_column("capped", pa.array(np.zeros(len(table), np.int64)))
        return _finish(table, cfg, None)

    return check


def _finish(table: pa.Table, cfg: DataConfig, details) -> pa.Table:
    if cfg.strict:
        raise_first_error(table, details)
    if cfg.shuffle and len(table) > 1:  # seeded by the block's first record: reproducible
        first = f"{cfg.seed}:{table.column('file')[0]}:{table.column('line')[0]}"
        seed = int.from_bytes(hashlib.blake2b(first.encode(), digest_size=8).digest(), "little")
        table = table.take(pa.array(np.random.default_rng(seed).permutation(len(table))))
    return table


def raise_first_error(table: pa.Table, details=None) -> None:
    bad = np.flatnonzero(pc.not_equal(table.column("error"), "").to_numpy(zero_copy_only=False))
    if len(bad):
        i = int(bad[0])
        detail = details[i] if details is not None else ""
        raise DataError(f"{table.column('file')[i].as_py()}:{table.column('line')[i].as_py()}: "
                        f"{table.column('error')[i].as_py()}" + (f": {detail}" if detail else ""))


# ----------------------------------------------------------------------------- parsing

def _decode(raw: pa.Table, cfg: DataConfig) -> tuple[list, list, list, list]:
    """Raw records -> (texts, labels, errors, details), one of each per record."""
    values = raw.column("raw").to_pylist()
    is_json = raw.column("json").to_pylist()
    errors = raw.column("error").to_pylist()
    details = raw.column("detail").to_pylist()
    texts, labels = [None] * len(values), [None] * len(values)
    for i, value in enumerate(values):
        if errors[i]:
            continue  # found by the read stage (corrupt_file, too_long, a CSV without the column)
        if is_json[i]:
            texts[i], labels[i], errors[i], details[i] = json_record(value, cfg.text_key, cfg.label_key)
        else:
            texts[i], errors[i], details[i] = text_line(value)
    return texts, labels, errors, details


def json_record(raw: bytes, text_key: str, label_key: str | None):
    """One loose-JSON line -> (text, label, error, detail)."""
    if not raw.strip():
        return None, None, "blank", ""
    try:
        # Decoded here, not by json.loads: it would guess UTF-16 from a line's leading NULs.
        obj = json.loads(raw.decode("utf-8").lstrip("\ufeff"))
    except UnicodeDecodeError as e:
        return None, None, "invalid_utf8", str(e)
    except ValueError as e:  # raw NUL bytes and cut lines land here
        return None, None, "bad_json", str(e)
    if not isinstance(obj, dict):
        return None, None, "bad_json", f"expected an object, got {type(obj).__name__}"
    value = obj.get(text_key)
    if value is None:
        return None, None, "missing_key", f"no field {text_key!r}" if text_key not in obj else "null"
    if not isinstance(value, str):  # a number's repr is not a review
        return None, None, "not_text", f"{text_key!r} holds a {type(value).__name__}"
    label = obj.get(label_key) if label_key else None
    if label_key and label is None:
        return None, None, "missing_key", f"no field {label_key!r}"
    if label_key and isinstance(label, str) and not label.strip():  # an empty CSV cell is no id
        return None, None, "missing_key", f"{label_key!r} is empty"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate escape such as "\ud800"
        return None, None, "invalid_utf8", str(e)
    if label_key:
        # One type for the column whatever the file holds (a number here, a string there, in
        # one block or across formats, would fail Arrow): a string as written, else its JSON.
        if not isinstance(label, str):
            label = json.dumps(label, ensure_ascii=False)
        try:  # Arrow fails the whole block on a label (an id) it cannot encode
            label.encode("utf-8")
        except UnicodeEncodeError as e:
            return None, None, "invalid_utf8", f"{label_key!r}: {e}"
    return value, label, "", ""


def text_line(raw: bytes):
    """One line of a plain-text corpus -> (text, error, detail)."""
    try:
        text = raw.decode("utf-8").lstrip("\ufeff").rstrip("\r\n")
    except UnicodeDecodeError as e:
        return None, "invalid_utf8", str(e)
    if not text.strip():
        return None, "blank", ""
    return text, "", ""


# ----------------------------------------------------------------------------- encoding

def encode_rows(texts: list, errors: list, cfg: DataConfig):
    """Texts -> (bytes array, errors, capped) through the one vectorised preprocessing.

    A record of padding only becomes ``empty_text``; a record over ``max_record_bytes`` is cut
    there (at a character boundary) and the bytes cut are returned in ``capped``.
    """
    n = len(texts)
    ok = np.array([not e for e in errors], bool)
    idx = np.flatnonzero(ok)
    flat, offsets = encode_batch(pa.array([texts[i] for i in idx], pa.large_string()),
                                 cfg.transliterate)
    lengths = np.diff(offsets)
    keep = _capped_lengths(flat, offsets, cfg.max_record_bytes)
    keep[lengths <= PAD] = 0
    for i in idx[lengths <= PAD]:
        errors[i] = "empty_text"
    capped = np.zeros(n, np.int64)
    capped[idx] = np.where(keep > 0, lengths - keep, 0)
    full = np.zeros(n + 1, np.int64)
    full[1:][idx] = keep
    np.cumsum(full, out=full)
    data = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), n, [None, pa.py_buffer(full), pa.py_buffer(_select(flat, offsets, keep))])
    return data, errors, capped


def _capped_lengths(flat: np.ndarray, offsets: np.ndarray, cap: int) -> np.ndarray:
    """Each record's length, cut to ``cap`` bytes without splitting a UTF-8 character."""
    keep = np.diff(offsets)
    for i in np.flatnonzero(keep > cap):  # rare: a loop is fine
        cut = cap
        while cut > 0 and (flat[offsets[i] + cut] & 0xC0) == 0x80:  # a continuation byte
            cut -= 1
        keep[i] = cut
    return keep


def _select(flat: np.ndarray, offsets: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The first ``keep[i]`` bytes of each record, as one buffer (no copy when all are kept)."""
    changed = np.flatnonzero(keep != np.diff(offsets))
    if not len(changed):
        return flat
    parts, prev = [], 0
    for i in changed:
        parts.append(flat[prev:offsets[i] + keep[i]])
        prev = offsets[i + 1]
    parts.append(flat[prev:])
    return np.concatenate(parts)
