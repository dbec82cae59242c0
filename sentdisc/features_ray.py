"""Featurization at scale: ``sentdisc.features.featurize`` on a Ray Data pool of model replicas.

Transfer featurizes its labeled sets here, and a batch scoring job can do the same: the API
takes the checkpoint and the featurize options as plain arguments. Small sets run in process
(a pool's start-up costs seconds); large ones go to a Ray Data actor pool, each actor a model
replica loaded once. Both paths give the same numbers, in input order.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from sentdisc.report import ProgressLine
from sentdisc.runtime import ensure_ray


@dataclass
class PoolConfig:
    """When a job featurizes on a Ray Data pool of model replicas instead of in process."""
    ray_featurize_threshold: int = field(default=20000, metadata={
        "help": "sets of at least this many texts featurize on a Ray Data actor pool "
                "(0: always, -1: never)"})
    featurize_replicas: int = field(default=2, metadata={"help": "model replicas (actors)"})
    cpus_per_replica: int = field(default=1, metadata={"help": "CPUs (torch threads) per replica"})

    def __post_init__(self):
        if self.featurize_replicas < 1 or self.cpus_per_replica < 1:
            raise ValueError("featurize_replicas and cpus_per_replica must be >= 1")


class _FeaturizeReplica:
    """One model replica in a Ray Data actor pool: loads the checkpoint once, then featurizes
    each batch with the same ``sentdisc.features.featurize`` the in-process path uses."""

    def __init__(self, checkpoint: str, kind: str, layer: int, batch_size: int,
                 chunk_size: int, threads: int, precision: str = "auto"):
        import torch

        from sentdisc.checkpoint import load

        torch.set_num_threads(threads)
        self.model = load(checkpoint)
        self.kw = dict(batch_size=batch_size, layer=layer, kind=kind, chunk_size=chunk_size,
                       precision=precision)

    def __call__(self, batch: dict) -> dict:
        """{"text", ...} -> {"features", ...}: the other columns (an index here, a record's
        file and line when scoring) pass through, so a row keeps what identifies it."""
        from sentdisc.features import featurize

        feats = featurize(self.model, [str(t) for t in batch["text"]], **self.kw)
        return {**{k: v for k, v in batch.items() if k != "text"}, "features": feats}


def _length_sorted_blocks(texts: Sequence[str], batch_size: int, replicas: int) -> list:
    """DataFrames of (idx, text), longest text first, each a whole number of batches.

    Similar lengths in a batch mean little padding; the index puts results back in input
    order; several blocks per replica keep the pool busy.
    """
    import pandas as pd

    from sentdisc.text import encode_batch

    n = len(texts)
    _, offsets = encode_batch(list(texts))
    order = np.argsort(-np.diff(offsets), kind="stable")
    df = pd.DataFrame({"idx": order.astype(np.int64), "text": [texts[i] for i in order]})
    rows_per_block = max(batch_size, batch_size * math.ceil(n / (batch_size * replicas * 4)))
    return [df.iloc[i:i + rows_per_block] for i in range(0, n, rows_per_block)]


def featurize_ray(texts: Sequence[str], checkpoint: str, kind: str = "cell", layer: int = -1,
                  batch_size: int = 128, chunk_size: int = 256, replicas: int = 2,
                  cpus_per_replica: int = 1,
                  progress: Callable[[int, int], None] | None = None,
                  precision: str = "auto") -> np.ndarray:
    """``featurize`` over a Ray Data actor pool; same numbers, input order kept.

    The checkpoint path must be readable by every node.
    """
    import ray

    ensure_ray(include_dashboard=False)
    n = len(texts)
    if n == 0:
        from sentdisc.checkpoint import load_config
        return np.zeros((0, load_config(checkpoint).rnn_size), dtype=np.float32)
    ds = ray.data.from_pandas(_length_sorted_blocks(texts, batch_size, replicas)).map_batches(
        _FeaturizeReplica, batch_size=batch_size, batch_format="numpy",
        fn_constructor_args=(str(checkpoint), kind, layer, batch_size, chunk_size,
                             cpus_per_replica, precision),
        compute=ray.data.ActorPoolStrategy(size=replicas), num_cpus=cpus_per_replica)
    out, done = None, 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        feats = np.asarray(batch["features"], dtype=np.float32)
        if out is None:
            out = np.zeros((n, feats.shape[1]), dtype=np.float32)
        out[batch["idx"]] = feats
        done += len(feats)
        if progress is not None:
            progress(done, n)
    if done != n:
        raise RuntimeError(f"Ray Data featurization returned {done} of {n} rows")
    return out


def featurize_texts(texts: Sequence[str], model=None, checkpoint: str = "", *, name: str = "",
                    kind: str = "cell", layer: int = -1, batch_size: int = 128,
                    chunk_size: int = 256, ray_threshold: int = 20000, replicas: int = 2,
                    cpus_per_replica: int = 1, precision: str = "auto",
                    log=print) -> tuple[np.ndarray, dict]:
    """Features of ``texts`` and how fast they came: in process with ``model``, or on a Ray
    Data pool of ``replicas`` loading ``checkpoint`` when there are at least ``ray_threshold``
    texts (0: always, -1: never)."""
    from sentdisc.text import encode_batch

    n_bytes = int(encode_batch(list(texts))[1][-1]) if len(texts) else 0
    use_ray = ray_threshold >= 0 and len(texts) >= ray_threshold
    progress = ProgressLine(name, len(texts), n_bytes)
    t0 = time.perf_counter()
    if use_ray:
        feats = featurize_ray(texts, checkpoint, kind, layer, batch_size, chunk_size, replicas,
                              cpus_per_replica, progress, precision)
    else:
        from sentdisc.features import featurize
        feats = featurize(model, list(texts), batch_size=batch_size, layer=layer, kind=kind,
                          chunk_size=chunk_size, progress=progress, precision=precision)
    dt = time.perf_counter() - t0
    stats = {"texts": len(texts), "bytes": n_bytes, "seconds": round(dt, 3),
             "texts_per_s": round(len(texts) / max(dt, 1e-9), 1),
             "bytes_per_s": round(n_bytes / max(dt, 1e-9), 1),
             "backend": "ray_data" if use_ray else "in_process"}
    log(f"{dt:.3f} seconds to transform {len(texts)} {name} examples "
        f"({stats['backend']}, {stats['bytes_per_s'] / 1e3:.1f} KB/s)")
    return feats, stats
