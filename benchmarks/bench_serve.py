"""/sentiment over real HTTP, one text per request: Ray Serve against what a user would run
instead, and against the model in process, all measured in the same run.

    python benchmarks/bench_serve.py                 # mLSTM-256 (random weights), 1/8/32 clients
    python benchmarks/bench_serve.py --quick         # fewer requests

Rows, on the same CPU budget (the model gets one thread everywhere):
* in-process: ``featurize`` + the classifier on the texts in batches of 128, no HTTP (the
  ceiling), in batches of 32 (the most that 32 one-text clients can put in one call), and in
  calls of 32 texts drawn at random (what a server's calls hold: featurize sorts by length,
  arrivals are not sorted, and a call costs a step per byte of its longest text);
* plain:      the same API and batching (sentdisc.serving.plain) in one uvicorn process (its
              model in a process of its own, as in a replica: serving.model_process);
* serve:      the README's command as a user types it into a fresh shell, ``sentdisc serve
              checkpoint=... classifier=...`` (no RAY_* in its environment; it sets the
              ingress environment: HAProxy, throughput-optimized mode), one 1-CPU replica;
* serve-proxy: the same app behind Serve's Python proxy (RAY_SERVE_ENABLE_HA_PROXY=0,
              RAY_SERVE_THROUGHPUT_OPTIMIZED=0): what ``serve run`` gives without that
              environment, to show what the ingress is worth.
Clients are threads (one keep-alive connection each) that send one SST-2 test sentence per
request (Amazon reviews with --texts amazon; generated sentences without the shared data) and
wait for the answer. Printed: texts/s, p50/p99 latency, the mean number of texts in the model's
running batch as a request's ended (X-Batch-Size), and the ratios serve / plain and serve /
in-process. At concurrency 1 the latency difference between rows is the cost of the path:
plain - in-process = HTTP + JSON + the hop to the model's process, serve - plain = Serve's
ingress hop.
"""
from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
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
from _common import load_note, print_table, wait_healthy  # noqa: E402


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
    """``concurrency`` client threads, each with one keep-alive connection (http.client: the
    clients share the machine's 2 cores with the server, so they should cost little), sending
    ``n_requests`` one-text /sentiment requests in all."""
    import http.client
    import json
    from urllib.parse import urlparse

    host, port = urlparse(url).hostname, urlparse(url).port
    local = threading.local()
    latencies = np.zeros(n_requests)
    batches = np.zeros(n_requests)
    bodies = [json.dumps({"texts": [t]}).encode() for t in texts]
    headers = {"Content-Type": "application/json"}

    def one(i: int):
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection(host, port, timeout=120)
        t0 = time.perf_counter()
        conn.request("POST", "/sentiment", body=bodies[i % len(bodies)], headers=headers)
        r = conn.getresponse()
        body = r.read()
        latencies[i] = time.perf_counter() - t0
        if r.status != 200:
            raise RuntimeError(f"/sentiment answered {r.status}: {body[:300]!r}")
        batches[i] = int(r.getheader("X-Batch-Size"))

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(2 * concurrency)))  # warm: connections, replica, allocator
        t0 = time.perf_counter()
        list(pool.map(one, range(n_requests)))
        wall = time.perf_counter() - t0
    return {"texts_s": n_requests / wall, "p50": 1e3 * np.percentile(latencies, 50),
            "p99": 1e3 * np.percentile(latencies, 99), "batch": batches.mean()}


def in_process(ckpt: Path, clf: Path, texts: list[str], reps: int = 3, batch: int = 128,
               arrival: bool = False) -> dict:
    """featurize + classify in this process, one thread, batches of ``batch``: the ceiling.
    featurize sorts its input by length, so its batches hold texts of about one length; with
    ``arrival`` each call is ``batch`` texts drawn at random instead, as a server's batches
    of single-text requests are (a call costs a step per byte of its longest text)."""
    import torch

    from sentdisc import featurize, load
    from sentdisc.serving.args import load_classifier

    torch.set_num_threads(1)
    model, classifier = load(str(ckpt)), load_classifier(str(clf))
    rng = random.Random(0)
    calls = [rng.sample(texts, batch) for _ in range(len(texts) // batch)] if arrival \
        else [texts]
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for call in calls:
            classifier.predict_proba(featurize(model, call, batch_size=batch, kind="cell"))
        best = min(best, time.perf_counter() - t0)
    texts = [t for call in calls for t in call]
    one = min(_timed(lambda: classifier.predict_proba(featurize(model, texts[:1], kind="cell")))
              for _ in range(20))
    return {"texts_s": len(texts) / best, "p50": 1e3 * one, "p99": float("nan"), "batch": 0}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_plain(ckpt, clf, texts, levels, n_for, batching) -> dict:
    port = free_port()
    args = [f"checkpoint={ckpt}", f"classifier={clf}", f"port={port}", "threads=1",
            *(f"{k}={v}" for k, v in batching.items())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "sentdisc.serving.plain", *args], env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        return {c: load_test(url, texts, c, n_for(c)) for c in levels}
    finally:
        proc.terminate()
        proc.wait(30)


def run_readme_command(ckpt, clf, texts, levels, n_for, batching) -> dict:
    """``sentdisc serve checkpoint=... classifier=...`` in a fresh environment, as the README
    says to run it (a config file only to put it on a free port with this run's batching)."""
    import yaml

    port = free_port()
    config = Path(tempfile.mkdtemp(prefix="bench_serve_cfg_")) / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{"name": "bench", "route_prefix": "/",
                          "import_path": "sentdisc.serving:build_app",
                          "args": {"checkpoint": str(ckpt), "classifier": str(clf)},
                          "deployments": [{"name": "SentdiscServer",
                                           "user_config": batching}]}]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    sentdisc = Path(sys.executable).with_name("sentdisc")
    proc = subprocess.Popen([str(sentdisc), "serve", str(config), "--address", "local"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, timeout=240)
        import requests

        ingress = requests.get(url + "/healthz", timeout=30).json().get("ingress")
        print(f"serve (README command): /healthz says ingress {ingress}", flush=True)
        return {c: load_test(url, texts, c, n_for(c)) for c in levels}
    finally:
        import signal

        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def run_serve(ckpt, clf, texts, levels, n_for, batching, haproxy: bool) -> dict:
    """One Ray session per ingress: Serve reads its ingress settings when Ray starts."""
    import ray
    from ray import serve

    from sentdisc.serving import make_app
    from sentdisc.serving.ingress import SERVE_ENV

    saved = {k: os.environ.get(k) for k in SERVE_ENV}
    os.environ.update(SERVE_ENV if haproxy else {k: "0" for k in SERVE_ENV
                                                 if k != "RAY_SERVE_HAPROXY_RETRY_ON"})
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(make_app({"checkpoint": str(ckpt), "classifier": str(clf)}, batching=batching),
                  name="bench", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        return {c: load_test(url, texts, c, n_for(c)) for c in levels}
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rnn_size", type=int, default=256)
    p.add_argument("--embed_size", type=int, default=64)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--max_batch_size", type=int, default=32)
    p.add_argument("--requests", type=int, default=0,
                   help="requests per row (default: max(60, 16 x concurrency))")
    p.add_argument("--texts", default="sst2", choices=["amazon", "sst2", "synthetic"],
                   help="amazon / sst2 need the shared data, else generated reviews are used")
    p.add_argument("--no_proxy_row", action="store_true", help="skip the serve-proxy rows")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    n_for = lambda c: args.requests or (max(30, 6 * c) if args.quick else max(60, 16 * c))
    batching = {"max_batch_size": args.max_batch_size}

    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    ckpt, clf = make_model(tmp, args.embed_size, args.rnn_size)
    texts, what = reviews(512, args.texts)
    lengths = [len(t.encode()) for t in texts]
    print(f"mLSTM-{args.rnn_size} (embed {args.embed_size}, random weights); {len(texts)} {what}, "
          f"{np.mean(lengths):.0f} bytes on average (median {np.median(lengths):.0f}); "
          f"{load_note()}", flush=True)
    results = {"in-process": {c: in_process(ckpt, clf, texts) for c in levels[:1]},
               # what a server can reach at best: 32 clients make batches of 32 at most
               "in-process-32": {c: in_process(ckpt, clf, texts, batch=32) for c in levels[:1]},
               "in-process-arrival": {c: in_process(ckpt, clf, texts, batch=32, arrival=True)
                                      for c in levels[:1]}}
    results["plain"] = run_plain(ckpt, clf, texts, levels, n_for, batching)
    results["serve"] = run_readme_command(ckpt, clf, texts, levels, n_for, batching)
    if not args.no_proxy_row:
        results["serve-proxy"] = run_serve(ckpt, clf, texts, levels, n_for, batching,
                                           haproxy=False)
    report(results, levels, what, args)


def report(results: dict, levels: list, what: str, args) -> None:
    ceiling = next(iter(results["in-process"].values()))
    rows = [{"c": "-", "mode": "in-process", "tps": f"{ceiling['texts_s']:.1f}",
             "p50": f"{ceiling['p50']:.1f}", "p99": "", "batch": "", "vs_plain": "",
             "vs_inproc": "1.00"}]
    small = next(iter(results["in-process-32"].values()))
    rows.append({"c": "-", "mode": "in-process, batches of 32", "tps": f"{small['texts_s']:.1f}",
                 "p50": "", "p99": "", "batch": "", "vs_plain": "",
                 "vs_inproc": f"{small['texts_s'] / ceiling['texts_s']:.2f}"})
    arrival = next(iter(results["in-process-arrival"].values()))
    rows.append({"c": "-", "mode": "in-process, 32 random texts a call", "p50": "", "p99": "",
                 "tps": f"{arrival['texts_s']:.1f}", "batch": "", "vs_plain": "",
                 "vs_inproc": f"{arrival['texts_s'] / ceiling['texts_s']:.2f}"})
    for c in levels:
        plain = results["plain"][c]
        for mode in [m for m in ("plain", "serve", "serve-proxy") if m in results]:
            r = results[mode][c]
            rows.append({"c": c, "mode": mode, "tps": f"{r['texts_s']:.1f}",
                         "p50": f"{r['p50']:.1f}", "p99": f"{r['p99']:.1f}",
                         "batch": f"{r['batch']:.1f}",
                         "vs_plain": f"{r['texts_s'] / plain['texts_s']:.2f}",
                         "vs_inproc": f"{r['texts_s'] / ceiling['texts_s']:.2f}"})
    print(f"\n/sentiment, one {what[:-1]} per request, mLSTM-{args.rnn_size}, one model thread "
          f"everywhere, max_batch_size {args.max_batch_size}; {load_note()}")
    print_table(rows, [("c", "clients"), ("mode", "path"), ("tps", "texts/s"),
                       ("p50", "p50 ms"), ("p99", "p99 ms"), ("batch", "mean batch"),
                       ("vs_plain", "/ plain"), ("vs_inproc", "/ in-process")])


if __name__ == "__main__":
    main()
