"""/sentiment over real HTTP: throughput and latency, request batching on versus off.

    python benchmarks/bench_serve.py                 # mLSTM-256 (random weights), 1/8/32 clients
    python benchmarks/bench_serve.py --quick         # fewer requests

One local Ray + Serve; the same app (sentdisc.serving) is deployed twice in the same run, with
its batch settings as the deployment's user_config:
* batched:   @serve.batch with max_batch_size (default 32): concurrent requests share one
             length-sorted, masked featurize call;
* unbatched: max_batch_size=1, every request is its own featurize call (the baseline).
Each client thread sends one review per request (Amazon test reviews when the shared data is
present, else generated reviews of similar lengths; --texts sst2 for short sentences) and waits
for the answer. Rows: texts/s,
p50/p99 latency, the mean batch size the server reported (X-Batch-Size); the ratio is
batched over unbatched throughput at the same concurrency. The model replica has 1 CPU.
"""
from __future__ import annotations

import argparse
import os
import random
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_note, print_table  # noqa: E402


def reviews(n: int, source: str = "amazon", seed: int = 0) -> tuple[list[str], str]:
    """``n`` reviews: Amazon (Blitzer) test reviews, the corpus this model is for, or SST-2
    sentences, when the shared data is present; else generated reviews of Amazon-like lengths."""
    root = Path(os.environ.get("SENTDISC_DATA", REPO.parent / "shared" / "data"))
    path, column = {"amazon": ("amazon_blitzer/test.csv", "text"),
                    "sst2": ("sst2/test.csv", "sentence")}.get(source, ("", ""))
    if path and (root / path).is_file():
        import pandas as pd

        texts = [t for t in pd.read_csv(root / path)[column].astype(str) if t.strip()]
        if len(texts) >= n:
            return random.Random(seed).sample(texts, n), f"{source} test reviews"
    rng = random.Random(seed)
    words = ("the movie was great awful boring brilliant plot acting story I loved hated it and "
             "but not very really quite a fun mess of with an ending characters").split()
    # log-normal word counts: median ~90 words (~500 bytes), a long tail, like Amazon reviews
    counts = [min(1500, max(3, int(rng.lognormvariate(4.5, 0.8)))) for _ in range(n)]
    return [" ".join(rng.choice(words) for _ in range(k)) for k in counts], "generated reviews"


def make_model(tmp: Path, embed: int, rnn: int) -> tuple[Path, Path]:
    """A random-weight checkpoint and a synthetic classifier (random weights) for it."""
    import torch

    from sentdisc import ByteLM, ModelConfig, save
    from sentdisc.classifier import fit_result_to_classifier

    torch.manual_seed(0)
    ckpt = save(ByteLM(ModelConfig(embed_size=embed, rnn_size=rnn)), tmp / "ckpt")
    rng = np.random.default_rng(0)
    coef = rng.normal(size=rnn) * (rng.random(rnn) < 0.05)  # sparse, as L1 gives
    neurons = [int(n) for n in np.argsort(-np.abs(coef))[:4]]
    clf = fit_result_to_classifier(coef, 0.0, 1.0, neurons, coef[neurons], 0.0, 1.0)
    return ckpt, clf.save(tmp / "classifier.json")


def load_test(url: str, texts: list[str], concurrency: int, n_requests: int) -> dict:
    import requests

    local = threading.local()
    latencies = np.zeros(n_requests)
    batches = np.zeros(n_requests)

    def one(i: int):
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        t0 = time.perf_counter()
        r = session.post(url + "/sentiment", json={"texts": [texts[i % len(texts)]]}, timeout=120)
        latencies[i] = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"/sentiment answered {r.status_code}: {r.text[:300]}")
        batches[i] = int(r.headers["X-Batch-Size"])

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(2 * concurrency)))  # warm: connections, replica, allocator
        t0 = time.perf_counter()
        list(pool.map(one, range(n_requests)))
        wall = time.perf_counter() - t0
    return {"texts_s": n_requests / wall, "p50": 1e3 * np.percentile(latencies, 50),
            "p99": 1e3 * np.percentile(latencies, 99), "batch": batches.mean()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rnn_size", type=int, default=256)
    p.add_argument("--embed_size", type=int, default=64)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--max_batch_size", type=int, default=32)
    p.add_argument("--batch_wait_timeout_s", type=float, default=0.002)
    p.add_argument("--requests", type=int, default=0,
                   help="requests per row (default: max(60, 12 x concurrency))")
    p.add_argument("--texts", default="amazon", choices=["amazon", "sst2", "synthetic"],
                   help="amazon / sst2 need the shared data, else generated reviews are used")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]

    import ray
    from ray import serve

    from sentdisc.serving import make_app

    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    ckpt, clf = make_model(tmp, args.embed_size, args.rnn_size)
    texts, what = reviews(512, args.texts)
    lengths = [len(t.encode()) for t in texts]
    print(f"mLSTM-{args.rnn_size} (embed {args.embed_size}, random weights); {len(texts)} {what}, "
          f"{np.mean(lengths):.0f} bytes on average (median {np.median(lengths):.0f}); "
          f"{load_note()}")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    modes = [("batched", args.max_batch_size), ("unbatched", 1)]
    results: dict = {}
    try:
        for mode, mbs in modes:
            app = make_app({"checkpoint": str(ckpt), "classifier": str(clf)},
                           batching={"max_batch_size": mbs,
                                     "batch_wait_timeout_s": args.batch_wait_timeout_s})
            serve.run(app, name=f"bench-{mode}", route_prefix="/")
            for c in levels:
                n = args.requests or (max(24, 4 * c) if args.quick else max(60, 12 * c))
                results[mode, c] = r = load_test(url, texts, c, n)
                print(f"  {mode:9s} concurrency {c:3d}: {r['texts_s']:7.1f} texts/s  "
                      f"p50 {r['p50']:7.1f} ms  p99 {r['p99']:7.1f} ms  batch {r['batch']:.1f}",
                      flush=True)
            serve.delete(f"bench-{mode}")
    finally:
        serve.shutdown()
        ray.shutdown()

    rows = []
    for c in levels:
        on, off = results["batched", c], results["unbatched", c]
        ratio = f"{on['texts_s'] / off['texts_s']:.2f}x"
        for mode, r in (("batched", on), ("unbatched", off)):
            rows.append({"c": c, "mode": mode, "tps": f"{r['texts_s']:.1f}",
                         "p50": f"{r['p50']:.1f}", "p99": f"{r['p99']:.1f}",
                         "batch": f"{r['batch']:.1f}", "ratio": ratio if mode == "batched" else ""})
    print(f"\n/sentiment, one {what[:-1]} per request, max_batch_size {args.max_batch_size} vs 1, "
          f"batch_wait_timeout_s {args.batch_wait_timeout_s}; {load_note()}")
    print_table(rows, [("c", "concurrency"), ("mode", "mode"), ("tps", "texts/s"),
                       ("p50", "p50 ms"), ("p99", "p99 ms"), ("batch", "mean batch"),
                       ("ratio", "batched/unbatched texts/s")])


if __name__ == "__main__":
    main()
