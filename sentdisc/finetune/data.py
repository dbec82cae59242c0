"""Labeled sets as the fine-tuning workers read them, and the order they read them in.

A labeled set is small (SST-2: 0.7 MB of text), so it is encoded once on the driver exactly as
``featurize`` encodes text (``sentdisc.text.encode_batch``), put in Ray's object store, and
read by every worker zero-copy; no streaming is needed. What each worker trains on is a pure
function of (epoch, step): ``epoch_plan`` cuts a seeded permutation into global batches of
exactly ``batch_size`` texts (similar lengths together, so little padding; the batches in a
seeded order), and ``rank_rows`` gives each rank its share. A checkpoint records (epoch, step),
so a run resumes exactly where it stopped, on any number of workers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sentdisc.text import encode_batch
from sentdisc.train.config import per_worker_batch

SORT_WINDOW = 50  # batches whose texts are sorted by length together


@dataclass
class EncodedSet:
    """Texts as one byte buffer (text i is ``data[offsets[i]:offsets[i + 1]]``) and labels:
    class indices [N] (binary, multiclass) or 0/1 [N, K] (multilabel)."""
    data: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray

    @classmethod
    def of(cls, texts, labels) -> EncodedSet:
        data, offsets = encode_batch(list(texts))
        return cls(np.ascontiguousarray(data), np.ascontiguousarray(offsets),
                   np.ascontiguousarray(labels))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def batch(self, rows: np.ndarray, device="cpu"):
        """(x [B, T] uint8, left-padded; reset [B, T] at each text's first byte; starts [B];
        labels) of ``rows``, on ``device``."""
        lengths = self.lengths[rows]
        T = int(lengths.max())
        x = np.zeros((len(rows), T), dtype=np.uint8)
        starts = T - lengths
        for r, (i, s) in enumerate(zip(rows, starts)):
            x[r, s:] = self.data[self.offsets[i]:self.offsets[i + 1]]
        reset = np.zeros((len(rows), T), dtype=bool)
        reset[np.arange(len(rows)), starts] = True
        as_tensor = lambda a: torch.from_numpy(a).to(device, non_blocking=True)
        return (as_tensor(x), as_tensor(reset), as_tensor(starts.astype(np.int64)),
                as_tensor(self.labels[rows]))


def epoch_plan(lengths: np.ndarray, batch_size: int, epoch: int, seed: int,
               window: int = SORT_WINDOW) -> list[np.ndarray]:
    """The global batches of one epoch: ``len(lengths) // batch_size`` batches of exactly
    ``batch_size`` text indices (the remainder, different texts each epoch, waits for the
    next). Texts are drawn in a permutation seeded by (seed, epoch), sorted by length within
    windows of ``window`` batches, and the batches visited in a seeded order."""
    rng = np.random.default_rng([seed, epoch])
    n = len(lengths) - len(lengths) % batch_size
    order = rng.permutation(len(lengths))[:n]
    batches = []
    for start in range(0, n, batch_size * window):
        chunk = order[start:start + batch_size * window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def rank_rows(batch: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's share of a global batch (``per_worker_batch``'s split, as pretraining)."""
    start = sum(per_worker_batch(len(batch), world, r) for r in range(rank))
    return batch[start:start + per_worker_batch(len(batch), world, rank)]


def eval_batches(lengths: np.ndarray, rank: int, world: int, batch_size: int) -> list:
    """This rank's validation rows (every ``world``-th), in length-sorted batches."""
    mine = np.arange(rank, len(lengths), world)
    mine = mine[np.argsort(-lengths[mine], kind="stable")]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
