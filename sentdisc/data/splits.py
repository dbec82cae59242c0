"""Deterministic train / val / test splits of a corpus, by record name rather than read order.

A record's split follows from a hash of (its file relative to the corpus root, its line), so
every run, every worker and every copy of the corpus (moved, preprocessed) put a record in the
same split, whatever the block layout or read order. The name is the corpus's own: relative to
its root whether that is a local folder or a URI (``s3://bucket/reviews``), with a compression
suffix dropped, so ``x.json.gz`` on S3 splits exactly like ``x.json`` on disk.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pyarrow as pa

from sentdisc.data.config import strip_compression
from sentdisc.errors import InputError


def parse_split(split: str) -> list[float]:
    try:
        parts = [float(p) for p in str(split).split(",") if p.strip()]
    except ValueError:
        raise InputError(f"split {split!r}: expected proportions like 1000,1,1") from None
    if not parts or len(parts) > 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise InputError(f"split {split!r}: expected 1-3 non-negative proportions like 1000,1,1")
    parts += [0.0] * (3 - len(parts))
    if parts[0] == 0:  # --train is the corpus to train on: a split must leave it something
        raise InputError(f"split {split!r}: the first proportion, training's, must be above 0")
    return [p / sum(parts) for p in parts]


def _file_hash(name: str, seed: int) -> np.uint64:
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-spread deterministic hash of uint64s, vectorised."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def split_key(name: str, root: str) -> str:
    """A file's name in the corpus: relative to ``root``, '/'-separated, compression dropped."""
    base = root.rstrip("/")
    if name.startswith(base + "/"):
        rel = name[len(base) + 1:]
    elif os.path.isabs(name) and "://" not in name:
        rel = os.path.relpath(name, root).replace(os.sep, "/")
    else:
        rel = name  # already relative (the file column of preprocessed shards)
    return strip_compression(rel)


def split_fraction(files: np.ndarray, lines: np.ndarray, root: str, seed: int) -> np.ndarray:
    """A deterministic uniform number in [0, 1) per record from (file relative to root, line).

    Depends only on the names, never on read order or block layout, so every run and every
    worker puts a record in the same split.
    """
    out = np.empty(len(lines), np.float64)
    files = np.asarray(files, dtype=object)
    for name in set(files.tolist()):
        sel = files == name
        h = _mix64(_file_hash(split_key(name, root), seed)
                   ^ _mix64(np.asarray(lines[sel], dtype=np.uint64)))
        out[sel] = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return out


def split_filter(lo: float, hi: float, root: str, seed: int):
    def keep(batch: pa.Table) -> pa.Table:
        u = split_fraction(batch.column("file").to_numpy(zero_copy_only=False),
                           batch.column("line").to_numpy(), root, seed)
        return batch.filter(pa.array((u >= lo) & (u < hi)))

    return keep

