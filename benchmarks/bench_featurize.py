"""Featurization speed for transfer: batched ``sentdisc.features.featurize`` vs one text at a time.

    python benchmarks/bench_featurize.py                  # SST-2 test, mLSTM-512, 2 threads
    python benchmarks/bench_featurize.py --quick          # 300 texts, 30 one-at-a-time
    python benchmarks/bench_featurize.py --ray_replicas 2 # also the Ray Data actor pool
    python benchmarks/bench_featurize.py --texts imdb     # 1,000 IMDB reviews (long, uneven)

Texts: SST-2 test (../shared/data/sst2/test.csv, or SENTDISC_DATA), or IMDB test reviews. Model:
mLSTM-512, embed 64, random weights (speed does not depend on the weights). Baselines, measured
in the same run: fixed length-sorted batches (each runs until its longest text ends, so rows
idle as shorter texts finish; ``featurize`` refills them instead), and the same ``featurize``
called on one text at a time (what a naive transfer loop does), timed on
a subset and reported per text / per byte; the two are timed in alternating rounds (best
round of each kept) because the machine is shared. The two paths are checked to give the same
features on that subset, so the ratio compares like with like. The batched path is also
timed with bf16 products (what precision auto runs where the CPU multiplies bf16 natively;
--bf16 auto times it only there), and both against the GEMM bound of their own dtype
(2 x recurrent weights per byte at the matmul rate of featurize's step shapes, measured here).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    bf16_plan,
    fmt_rate,
    gemm_rate,
    inference_shapes,
    load_note,
    mlstm_weight_count,
    print_table,
    set_threads,
)

from sentdisc.features import featurize
from sentdisc.model import ByteLM, ModelConfig
from sentdisc.text import encode_batch

REPO = Path(__file__).resolve().parents[1]


def test_texts(which: str, seed: int = 0) -> list[str]:
    """SST-2 test sentences (~100 bytes), or 1,000 seeded IMDB test reviews (~1.3 KB, tenfold
    spread in length)."""
    root = Path(os.environ.get("SENTDISC_DATA", REPO.parent / "shared" / "data"))
    path = root / {"sst2": "sst2", "imdb": "imdb"}[which] / "test.csv"
    if not path.exists():
        sys.exit(f"bench_featurize: {path} not found (set SENTDISC_DATA)")
    df = pd.read_csv(path)
    if which == "sst2":
        return df["sentence"].astype(str).tolist()
    return df.sample(n=min(1000, len(df)), random_state=seed)["text"].astype(str).tolist()


def fixed_batches(model, texts, batch_size, kind):
    """The pool's baseline: length-sorted batches, each run until its longest text ends (one
    ``featurize`` call per batch, so no row is refilled)."""
    order = np.argsort([-len(t) for t in texts], kind="stable")
    out = None
    for start in range(0, len(texts), batch_size):
        idx = order[start:start + batch_size]
        f = featurize(model, [texts[i] for i in idx], batch_size=len(idx), kind=kind,
                      precision="fp32")
        if out is None:
            out = np.zeros((len(texts), f.shape[1]), np.float32)
        out[idx] = f
    return out


def n_bytes(texts) -> int:
    return int(encode_batch(texts)[1][-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rnn_size", type=int, default=512)
    p.add_argument("--embed_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--kind", default="cell")
    p.add_argument("--texts", default="sst2", choices=["sst2", "imdb"])
    p.add_argument("--max_texts", type=int, default=0, help="0: the whole test set")
    p.add_argument("--single_texts", type=int, default=100,
                   help="texts featurized one at a time for the baseline")
    p.add_argument("--ray_replicas", type=int, default=0, help="also time the Ray Data pool")
    p.add_argument("--reps", type=int, default=3, help="alternating rounds; best of each kept")
    p.add_argument("--bf16", default="auto", choices=["auto", "on", "off"],
                   help="time bf16 products too: auto where the CPU multiplies bf16 natively")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.max_texts, args.single_texts = args.max_texts or 300, min(args.single_texts, 30)
        args.reps = 1

    set_threads(args.threads)
    torch.manual_seed(0)
    texts = test_texts(args.texts)
    if args.max_texts:
        texts = texts[:args.max_texts]
    model = ByteLM(ModelConfig(embed_size=args.embed_size, rnn_size=args.rnn_size)).eval()
    total_bytes = n_bytes(texts)
    print(f"featurize: {len(texts)} {args.texts} test texts, {total_bytes / 1e3:.1f} KB, mLSTM-"
          f"{args.rnn_size} (embed {args.embed_size}), kind {args.kind}, "
          f"{args.threads} threads, {load_note()}")

    # warm-up (allocator, threads)
    featurize(model, texts[:16], batch_size=16, kind=args.kind, precision="fp32")
    # Baseline on an evenly spaced subset (so its length mix matches the whole set).
    idx = np.linspace(0, len(texts) - 1, min(args.single_texts, len(texts))).astype(int)
    subset = [texts[i] for i in idx]
    sub_bytes = n_bytes(subset)
    # The machine is shared: alternate the two paths and keep each one's best round, so a
    # burst of someone else's load does not land on one side only.
    t_batched = t_single = t_fixed = float("inf")
    for r in range(args.reps):
        t0 = time.perf_counter()
        batched = featurize(model, texts, batch_size=args.batch_size, kind=args.kind,
                            precision="fp32")
        t_batched = min(t_batched, time.perf_counter() - t0)
        t0 = time.perf_counter()
        fixed = fixed_batches(model, texts, args.batch_size, args.kind)
        t_fixed = min(t_fixed, time.perf_counter() - t0)
        t0 = time.perf_counter()
        single = np.stack([featurize(model, [t], batch_size=1, kind=args.kind,
                                     precision="fp32")[0]
                           for t in subset])
        t_single = min(t_single, time.perf_counter() - t0)
        print(f"  round {r + 1}: batched {t_batched:.2f}s, fixed batches {t_fixed:.2f}s, "
              f"one-at-a-time {t_single:.2f}s "
              f"(best so far), {load_note()}", flush=True)
    err = float(np.abs(single - batched[idx]).max())
    assert err < 1e-4, f"batched and one-at-a-time features differ by {err}"
    assert np.abs(fixed - batched).max() < 1e-4, "pool and fixed batches differ"

    rows = [
        {"path": f"batched (batch {args.batch_size})", "texts": len(texts),
         "seconds": f"{t_batched:.2f}", "texts/s": f"{len(texts) / t_batched:.1f}",
         "bytes/s": fmt_rate(total_bytes / t_batched)},
        {"path": f"fixed length-sorted batches of {args.batch_size} (baseline)",
         "texts": len(texts), "seconds": f"{t_fixed:.2f}",
         "texts/s": f"{len(texts) / t_fixed:.1f}", "bytes/s": fmt_rate(total_bytes / t_fixed)},
        {"path": "one text at a time (baseline)", "texts": len(subset),
         "seconds": f"{t_single:.2f}", "texts/s": f"{len(subset) / t_single:.1f}",
         "bytes/s": fmt_rate(sub_bytes / t_single)},
    ]
    if args.ray_replicas:
        import ray

        from sentdisc.checkpoint import save
        from sentdisc.features_ray import featurize_ray

        ckpt = save(model, Path(os.environ.get("TMPDIR", "/tmp")) / "bench_featurize_ckpt")
        ray.init(num_cpus=args.ray_replicas, include_dashboard=False, log_to_driver=False)
        t0 = time.perf_counter()
        pooled = featurize_ray(texts, str(ckpt), kind=args.kind, batch_size=args.batch_size,
                               replicas=args.ray_replicas, cpus_per_replica=1)
        t_ray = time.perf_counter() - t0  # includes actor start-up and model loading
        assert np.abs(pooled - batched).max() < 1e-4
        rows.append({"path": f"Ray Data pool ({args.ray_replicas} x 1 thread, incl. start-up)",
                     "texts": len(texts), "seconds": f"{t_ray:.2f}",
                     "texts/s": f"{len(texts) / t_ray:.1f}",
                     "bytes/s": fmt_rate(total_bytes / t_ray)})
        ray.shutdown()
    use_bf16, why = bf16_plan(args.bf16)
    print(why)
    flops = 2 * mlstm_weight_count(args.embed_size, args.rnn_size)
    shapes = inference_shapes(args.batch_size, 256, args.embed_size, args.rnn_size)
    bound32 = gemm_rate(shapes) / flops
    rows[0]["bound"] = f"{total_bytes / t_batched / bound32:.0%} of fp32's"
    if use_bf16:
        t16 = float("inf")
        for _ in range(args.reps):
            t0 = time.perf_counter()
            half = featurize(model, texts, batch_size=args.batch_size, kind=args.kind,
                             precision="bf16")
            t16 = min(t16, time.perf_counter() - t0)
        bound16 = gemm_rate(shapes, torch.bfloat16) / flops
        rows.insert(1, {"path": f"batched, bf16 products (batch {args.batch_size})",
                        "texts": len(texts), "seconds": f"{t16:.2f}",
                        "texts/s": f"{len(texts) / t16:.1f}",
                        "bytes/s": fmt_rate(total_bytes / t16),
                        "bound": f"{total_bytes / t16 / bound16:.0%} of bf16's"})
        print(f"bf16 / fp32: {t_batched / t16:.2f}x; max |difference| "
              f"{float(np.abs(half - batched).max()):.1e}")
    print_table(rows, [("path", "path"), ("texts", "texts"), ("seconds", "seconds"),
                       ("texts/s", "texts/s"), ("bytes/s", "bytes/s"), ("bound", "GEMM bound")])
    speedup = (total_bytes / t_batched) / (sub_bytes / t_single)
    print(f"batched / one-at-a-time: {speedup:.1f}x bytes/s "
          f"({(len(texts) / t_batched) / (len(subset) / t_single):.1f}x texts/s); "
          f"max |difference| {err:.1e}; {load_note()}")
    print(f"refilled pool / fixed batches: {t_fixed / t_batched:.2f}x")


if __name__ == "__main__":
    main()
