"""Does Ray Data keep one training worker fed from the dump as it ships, on disk or on S3, and
does memory stay flat as the corpus grows?

    python benchmarks/bench_pipeline.py             # 100 gzipped shards, >= 1 GB of text; 1x, 10x
    python benchmarks/bench_pipeline.py --quick     # 8 small shards: a smoke run of every row

The corpus is ``sentdisc data synth``'s (Amazon-shaped loose JSON, word-salad reviews of
realistic length, 1% bad lines of every kind), generated into a temporary folder and uploaded
to a local S3 server (moto's ThreadedMotoServer, started here on a free port). The 10x corpus
is the same shards listed 10 times: hard links in 10 folders on disk, 10 prefixes of
server-side copies on S3, so 10x costs no generation.

Rows:
* consumed: bytes/s one training step eats (``sentdisc.train.train_step``, mLSTM-512, embed 64,
  batch 64 x seq 128, Adam, the reset mask, 2 threads): the rate the pipeline has to beat;
* delivered: good record bytes/s that Ray Data (list on the driver, read + gunzip + split
  lines, then JSON parse + encode in a separate stage) hands one worker's BytePacker
  (batch 64 x seq 128) over a full pass, Ray start excluded; first window: seconds from
  building the dataset to the packer's first window;
* peak memory, sampled every 0.5 s: private RSS (RssAnon) of the consumer (driver) process
  and of its largest Ray worker, and of the whole process tree with the object store's
  shared pages counted once (plain RSS counts them again in every process that read a block).
Each pass runs in its own subprocess with its own local Ray (address="local", num_cpus=2), so
peaks do not mix; the packer's counts are checked against the generator's injected numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt_rate, load_note, print_table, set_threads

REPO = Path(__file__).resolve().parents[1]
B, T = 64, 128
FACTOR = 10


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, name) for every process, from /proc (no psutil needed)."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    head, tail = f.read().rsplit(")", 1)
                out[int(entry)] = (int(tail.split()[1]), head.split("(", 1)[1])
            except (OSError, ValueError, IndexError):
                continue
    return out


def _memory(pid: int) -> tuple[int, int]:
    """(private resident bytes, resident shared-memory bytes) of a process, from /proc.

    Ray's object store is shared memory: every process that reads a block maps its pages, so
    plain RSS counts the same store pages in the driver and in each worker. The private part
    (RssAnon) is each process's own; the store is counted once, as the largest RssShmem.
    """
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssShmem:")):
                    key, value = line.split(":")
                    fields[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return fields.get("RssAnon", 0), fields.get("RssShmem", 0)


def _sample_peaks(peak: dict, done: threading.Event) -> None:
    """Peak private memory of this process (the driver), of its largest Ray worker ("ray::..."
    processes) and of the whole tree with the object store's pages counted once."""
    me = os.getpid()
    while not done.is_set():
        procs = _processes()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in procs.items():
            children.setdefault(ppid, []).append(pid)
        tree, todo = [], [me]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo += children.get(pid, [])
        mem = {pid: _memory(pid) for pid in tree}
        peak["driver"] = max(peak["driver"], mem[me][0])
        workers = [mem[p][0] for p in tree if procs.get(p, (0, ""))[1].startswith("ray::")]
        peak["worker"] = max([peak["worker"], *workers])
        peak["tree"] = max(peak["tree"], sum(m[0] for m in mem.values())
                           + max(m[1] for m in mem.values()))
        time.sleep(0.5)


def measure(corpus: str) -> dict:
    """One full pass of corpus -> read_dataset -> iter_batches -> BytePacker, in this process."""
    import ray

    from sentdisc.data import BytePacker, DataConfig, read_dataset

    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), **aws}})
    from ray.data import DataContext
    DataContext.get_current().enable_progress_bars = False
    peak, done = {"driver": 0, "tree": 0, "worker": 0}, threading.Event()
    sampler = threading.Thread(target=_sample_peaks, args=(peak, done), daemon=True)
    sampler.start()
    packer = BytePacker(B, T, persist_state=0)
    start = time.perf_counter()
    ds = read_dataset(corpus, DataConfig())
    trained, first = 0, None
    for window in packer.windows(ds.iter_batches(batch_size=256, batch_format="numpy")):
        if first is None:  # listing, Ray Data's start-up, the first blocks read and parsed
            first = time.perf_counter() - start
        trained += window.n_bytes
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    ray.shutdown()
    return {"seconds": seconds, "first": first, "counts": packer.counts,
            "rate": packer.counts["bytes"] / seconds,
            "driver_rss": peak["driver"], "worker_rss": peak["worker"], "tree_rss": peak["tree"]}


def consume_rate(steps: int = 2) -> float:
    """Bytes/s of one training step of mLSTM-512 at batch 64 x seq 128 (best of ``steps``)."""
    import torch

    from sentdisc.model import ByteLM, ModelConfig
    from sentdisc.train import train_step

    set_threads(2)
    torch.manual_seed(0)
    model = ByteLM(ModelConfig(embed_size=64, rnn_size=512))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (B, T + 1))
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[:, 0] = True
    best = float("inf")
    for i in range(steps + 1):
        t0 = time.perf_counter()
        train_step(model, opt, x, reset)
        if i:  # the first step warms up allocators and kernels
            best = min(best, time.perf_counter() - t0)
    return B * T / best


# ----------------------------------------------------------------------------- the corpora

def start_s3():
    """A local S3 API (moto) on a free port; the AWS_* environment the children inherit."""
    import logging

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], scheme="http",
                      allow_bucket_creation=True).create_dir("bench")
    return server


def listed_copies(src: str, dst: str, factor: int) -> str:
    """``factor`` prefixes of the same shards: hard links on disk, server-side copies on S3."""
    from sentdisc import storage

    fs, _ = storage.filesystem(dst)
    for k in range(factor):
        for uri, _ in storage.list_files(src):
            copy = storage.join(dst, f"copy{k:02d}", uri.rsplit("/", 1)[1])
            if storage.is_uri(dst):
                fs.copy_file(storage.filesystem(uri)[1], storage.filesystem(copy)[1])
            else:
                os.makedirs(os.path.dirname(copy), exist_ok=True)
                os.link(uri, copy)
    return dst


def run_child(corpus: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--_measure", corpus], capture_output=True,
                         text=True, timeout=4 * 3600, env={**os.environ, "PYTHONPATH": str(REPO)})
    for line in out.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"measurement of {corpus} failed:\n{out.stderr[-3000:]}")


def counts_match(counts: dict, expected: dict, factor: int) -> str:
    """Whether the packer counted what the generator injected (times the copies)."""
    keys = ["records", "capped_records", "capped_bytes"] + [k for k in expected if k.startswith("skipped_")]
    wrong = [k for k in keys if counts.get(k, 0) != expected[k] * factor]
    return "yes" if not wrong else "NO: " + ", ".join(
        f"{k} {counts.get(k, 0)} != {expected[k] * factor}" for k in wrong)


# ----------------------------------------------------------------------------- report

def report(consumed: float, results: dict, corpus_mb: float) -> None:
    mb = lambda n: f"{n / 2**20:.0f} MiB"
    rows = [{"what": "consumed: mLSTM-512 train step", "rate": fmt_rate(consumed)}]
    for name, r in results.items():
        rows.append({"what": f"delivered: {name} ({r['counts']['bytes'] / 1e6:.0f} MB of records)",
                     "rate": fmt_rate(r["rate"]), "x": f"{r['rate'] / consumed:.0f}x consumed",
                     "first": f"{r['first']:.1f}", "driver": mb(r["driver_rss"]),
                     "worker": mb(r["worker_rss"]), "tree": mb(r["tree_rss"]),
                     "s": f"{r['seconds']:.0f}", "ok": r["check"]})
    print_table(rows, [("what", "pipeline"), ("rate", "bytes/s"), ("x", "vs training"),
                       ("first", "s to 1st window"), ("driver", "peak driver"),
                       ("worker", "peak worker"), ("tree", "peak tree"), ("s", "seconds"),
                       ("ok", "counts = injected")])
    print(f"(corpus 1x: {corpus_mb:.0f} MB of loose JSON uncompressed)")
    for where in ("disk", "S3"):
        small, big = results[f"{where} 1x"], results[f"{where} {FACTOR}x"]
        ratios = {k: big[f"{k}_rss"] / small[f"{k}_rss"] for k in ("driver", "worker", "tree")}
        flat = "flat" if max(ratios.values()) <= 1.2 else "NOT flat"
        print(f"{where}: peak memory {FACTOR}x / 1x: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items())
              + f" ({flat} within 1.2x; the corpus grew "
              f"{big['counts']['bytes'] / small['counts']['bytes']:.1f}x)")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="8 small shards: a smoke run")
    p.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._measure:
        print(json.dumps(measure(args._measure)))
        return
    from sentdisc import storage
    from sentdisc.data.synth import synthesize

    shards, records = (8, 1500) if args.quick else (100, 12000)
    print(f"bench_pipeline: {shards} gzipped dump shards x {records} lines, 1x and {FACTOR}x, disk "
          f"and S3 (moto), packer batch {B} x seq {T}, {load_note()}")
    consumed = consume_rate()
    tmp = tempfile.mkdtemp(prefix="sentdisc-bench-")
    server = start_s3()
    try:
        t0 = time.time()
        manifest = synthesize(os.path.join(tmp, "x1"), shards, records, bad_fraction=0.01, seed=0)
        print(f"generated {manifest['uncompressed_bytes'] / 1e9:.2f} GB in {time.time() - t0:.0f} s")
        local = os.path.join(tmp, "x1")
        storage.upload(local, "s3://bench/x1")
        corpora = {"disk 1x": local,
                   f"disk {FACTOR}x": listed_copies(local, os.path.join(tmp, "x10"), FACTOR),
                   "S3 1x": "s3://bench/x1",
                   f"S3 {FACTOR}x": listed_copies("s3://bench/x1", "s3://bench/x10", FACTOR)}
        results = {}
        for name, corpus in corpora.items():
            results[name] = run_child(corpus)
            factor = FACTOR if name.endswith(f"{FACTOR}x") else 1
            results[name]["check"] = counts_match(results[name]["counts"], manifest["expected"], factor)
            print(f"  {name}: {results[name]['seconds']:.0f} s, {load_note()}", flush=True)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    report(consumed, results, manifest["uncompressed_bytes"] / 1e6)


if __name__ == "__main__":
    main()
