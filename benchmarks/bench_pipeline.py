"""Does Ray Data keep one training worker fed, and does its memory stay flat as the corpus grows?

    python benchmarks/bench_pipeline.py                       # the shared Amazon corpus, 10x copy
    python benchmarks/bench_pipeline.py --corpus DIR --factor 10

Rows:
* delivered: record bytes/s that Ray Data (read_dataset: loose JSON parse + encode_batch on Ray tasks)
  hands one worker's BytePacker (batch 64 x seq 128), timed over a full pass, Ray start
  excluded; once for the corpus and once for a copy ``factor`` times larger;
* consumed: bytes/s one training step eats (sentdisc ByteLM mLSTM-512, embed 64, batch 64,
  seq 128, Adam, the reset mask passed, 2 threads): the rate the pipeline has to beat;
* peak RSS of the consumer process and of its whole process tree (driver + this run's Ray
  processes, object store pages included where they are touched), sampled every 0.2 s.
Each corpus runs in its own subprocess with its own local Ray (address="local", num_cpus=2),
so the peaks do not mix. The larger copy is written to a temp dir and deleted afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
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


def _tree_rss(pid: int) -> int:
    """RSS in bytes of pid and its descendants, from /proc (no psutil needed)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total


def measure(corpus: str) -> dict:
    """One full pass of corpus -> read_dataset -> iter_batches -> BytePacker, in this process."""
    import ray

    from sentdisc.data import BytePacker, DataConfig, read_dataset

    peak = {"tree": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak["tree"] = max(peak["tree"], _tree_rss(os.getpid()))
            time.sleep(0.2)

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    from ray.data import DataContext
    DataContext.get_current().enable_progress_bars = False
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    packer = BytePacker(B, T, persist_state=0)
    start = time.perf_counter()
    ds = read_dataset(corpus, DataConfig())
    trained, first = 0, None
    for window in packer.windows(ds.iter_batches(batch_size=256, batch_format="numpy")):
        if first is None:  # Ray Data's start-up (tasks launched, first blocks parsed)
            first = time.perf_counter() - start
        trained += window.n_bytes
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    ray.shutdown()
    return {"seconds": seconds, "first": first, "bytes": packer.counts["bytes"], "trained": trained,
            "steady": (trained - B * T) / max(seconds - first, 1e-9),
            "records": packer.counts["records"],
            "rate": packer.counts["bytes"] / seconds,
            "driver_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "tree_rss": peak["tree"]}


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


def make_copies(src: str, dst: str, factor: int) -> int:
    """``factor`` copies of every shard of src (review ids changed), as separate shards."""
    total = 0
    for name in sorted(os.listdir(src)):
        if not name.endswith(".json"):
            continue
        data = Path(src, name).read_bytes()
        for k in range(factor):
            out = Path(dst, f"{Path(name).stem}-copy{k:02d}.json")
            out.write_bytes(data.replace(b'"reviewerID": "', f'"reviewerID": "c{k}-'.encode()))
            total += out.stat().st_size
    return total


def run_child(corpus: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--_measure", corpus], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    for line in out.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"measurement of {corpus} failed:\n{out.stderr[-3000:]}")


def main():
    default = os.environ.get("SENTDISC_DATA", str(REPO.parent / "shared" / "data"))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=os.path.join(default, "amazon_blitzer", "reviews"))
    p.add_argument("--factor", type=int, default=10)
    p.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._measure:
        print(json.dumps(measure(args._measure)))
        return
    if not os.path.isdir(args.corpus):
        sys.exit(f"corpus {args.corpus} not found: pass --corpus or set SENTDISC_DATA")
    print(f"bench_pipeline: {args.corpus}, packer batch {B} x seq {T}, {load_note()}")
    consumed = consume_rate()
    small = run_child(args.corpus)
    tmp = tempfile.mkdtemp(prefix="sentdisc-bench-")
    try:
        size = make_copies(args.corpus, tmp, args.factor)
        big = run_child(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mb = lambda n: f"{n / 2**20:.0f} MiB"
    rows = [
        {"what": "consumed: mLSTM-512 train step", "rate": fmt_rate(consumed)},
        {"what": f"delivered: corpus ({small['bytes'] / 1e6:.1f} MB, {small['records']} records)",
         "rate": fmt_rate(small["rate"]), "x": f"{small['rate'] / consumed:.0f}x consumed",
         "driver": mb(small["driver_rss"]), "tree": mb(small["tree_rss"]), "s": f"{small['seconds']:.1f}",
         "first": f"{small['first']:.1f}", "steady": fmt_rate(small["steady"])},
        {"what": f"delivered: {args.factor}x corpus ({big['bytes'] / 1e6:.1f} MB, {size / 1e6:.0f} MB json)",
         "rate": fmt_rate(big["rate"]), "x": f"{big['rate'] / consumed:.0f}x consumed",
         "driver": mb(big["driver_rss"]), "tree": mb(big["tree_rss"]), "s": f"{big['seconds']:.1f}",
         "first": f"{big['first']:.1f}", "steady": fmt_rate(big["steady"])},
    ]
    print_table(rows, [("what", "pipeline"), ("rate", "bytes/s"), ("x", "vs training"),
                       ("first", "s to 1st window"), ("steady", "after 1st window"),
                       ("driver", "peak RSS driver"), ("tree", "peak RSS tree"), ("s", "seconds")])
    print(f"peak RSS {args.factor}x / 1x: driver {big['driver_rss'] / small['driver_rss']:.2f}, "
          f"process tree {big['tree_rss'] / small['tree_rss']:.2f} "
          f"(corpus grew {big['bytes'] / small['bytes']:.1f}x)")


if __name__ == "__main__":
    main()
