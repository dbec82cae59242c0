"""What losing a node costs an elastic run: a node removed mid-epoch and a new one added, against
the same run undisturbed, measured in the same process on Ray's multi-node harness.

    python benchmarks/bench_elastic.py            # mLSTM-128, 2 x 1-CPU worker nodes, ~3 min
    python benchmarks/bench_elastic.py --quick

Prints: iterations lost to the failure (trained again after the restore: those since the last
checkpoint), records repeated and records skipped over the whole epoch (from the workers'
record traces, against every record of the corpus), the wall-clock cost of the restart (node
removed -> first report of the shrunk run) and of the growth back (node added -> first report
at the full size), and the run's wall time against the undisturbed baseline.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))
from _common import load_note, print_table  # noqa: E402

from sentdisc.config import OutputConfig  # noqa: E402
from sentdisc.data.readers import DataConfig  # noqa: E402
from sentdisc.model import ModelConfig  # noqa: E402
from sentdisc.report import read_history  # noqa: E402
from sentdisc.train import TrainConfig, pretrain  # noqa: E402
from sentdisc.train.faults import trained_lineage  # noqa: E402

WORDS = "good bad great awful movie plot acting boring fun love hate the was and not".split()


def write_corpus(folder: Path, shards: int, records: int) -> set:
    rng = random.Random(0)
    folder.mkdir(parents=True)
    names = set()
    for s in range(shards):
        path = folder / f"part-{s}.json"
        with open(path, "w") as f:
            for i in range(records):
                words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30)))
                f.write(json.dumps({"reviewText": words}) + "\n")
                names.add((str(path), i + 1))
    return names


def run(cluster, nodes, corpus: Path, out: Path, name: str, args, disturb: bool) -> dict:
    cfgs = (ModelConfig(embed_size=16, rnn_size=args.rnn_size),
            DataConfig(train=str(corpus), split="1,0,0"),
            TrainConfig(batch_size=8, seq_length=64, lr=3e-3, epochs=1, lr_scheduler="none",
                        log_interval=5, save_iters=args.save_iters, num_workers="1-2",
                        worker_resources="trainer=1", max_failures=4, resize_interval_s=2,
                        trace_records=True),
            OutputConfig(str(out), name))
    history = out / name / "history.csv"
    marks, result = {}, {}
    driver = threading.Thread(target=lambda: result.update(s=pretrain(*cfgs, progress=False)))
    t0 = time.time()
    driver.start()

    def wait_for(pred):
        while driver.is_alive():
            rows = read_history(history) if history.exists() else []
            hit = next((r for r in rows if pred(r)), None)
            if hit:
                return hit
            time.sleep(0.2)
        return None

    if disturb:
        before = wait_for(lambda r: r.get("iteration", 0) >= args.fail_at and
                          r.get("world_size") == 2)
        marks["removed"] = time.time()
        cluster.remove_node(nodes[1])
        shrunk = wait_for(lambda r: r.get("world_size") == 1)
        marks["shrunk"] = time.time()
        marks["lost_iters"] = before["iteration"] - shrunk["resumed_from"] if shrunk else None
        marks["added"] = time.time()
        nodes[1] = cluster.add_node(num_cpus=1, resources={"trainer": 1})
        wait_for(lambda r: r.get("world_size") == 2 and r.get("resumed_from", 0) > 0)
        marks["grown"] = time.time()
    driver.join()
    marks["wall"] = time.time() - t0
    return {**marks, "summary": result["s"], "run": str(out / name)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rnn_size", type=int, default=128)
    p.add_argument("--records", type=int, default=1500, help="records per shard (2 shards)")
    p.add_argument("--save_iters", type=int, default=20)
    p.add_argument("--fail_at", type=int, default=40, help="iteration after which a node goes")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.records, args.fail_at = 600, 20
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "15")
    import ray
    from ray.cluster_utils import Cluster

    tmp = Path(tempfile.mkdtemp(prefix="sentdisc-elastic-"))
    records = write_corpus(tmp / "corpus", 2, args.records)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    ray.init(address=cluster.address, log_to_driver=False)
    print(f"mLSTM-{args.rnn_size}, 2 nodes x 1 CPU worker + a 2-CPU head, {len(records)} "
          f"records, checkpoint every {args.save_iters} iterations; {load_note()}")
    out = {}
    for name, disturb in (("baseline", False), ("disturbed", True)):
        nodes = [cluster.add_node(num_cpus=1, resources={"trainer": 1}) for _ in range(2)]
        cluster.wait_for_nodes()
        out[name] = run(cluster, nodes, tmp / "corpus", tmp / "exp", name, args, disturb)
        for node in list(cluster.worker_nodes):
            cluster.remove_node(node)
    ray.shutdown()
    cluster.shutdown()
    rows = []
    for name, r in out.items():
        lineage, attempts = trained_lineage(r["run"])
        seen = collections.Counter(lineage)
        rows.append(dict(
            run=name, attempts=" -> ".join(f"{w}w@{it}" for it, w in attempts),
            lost=r.get("lost_iters", 0), repeated=sum(1 for n in seen.values() if n > 1),
            skipped=sum(1 for k in records if k not in seen),
            restart=f"{r['shrunk'] - r['removed']:.1f} s" if "shrunk" in r else "-",
            regrow=f"{r['grown'] - r['added']:.1f} s" if "grown" in r else "-",
            wall=f"{r['wall']:.1f} s"))
    print_table(rows, [("run", "run"), ("attempts", "attempts (workers@resumed from)"),
                       ("lost", "iterations lost"), ("repeated", "records repeated"),
                       ("skipped", "records skipped"), ("restart", "restart (loss -> 1 worker)"),
                       ("regrow", "regrow (node -> 2 workers)"), ("wall", "wall")])
    base, hit = out["baseline"]["wall"], out["disturbed"]["wall"]
    print(f"the failure cost {hit - base:.1f} s of wall time: {hit / base:.2f}x the undisturbed "
          f"run; bound on repeated/skipped records: batch_size (8) per restore; {load_note()}")


if __name__ == "__main__":
    main()
