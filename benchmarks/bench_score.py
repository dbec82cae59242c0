"""Batch scoring (``sentdisc score``): texts/s on 1 and 2 replicas against featurize + classify
in process, and the driver's memory at 1x and 10x the corpus.

    python benchmarks/bench_score.py --quick              # the SST-2 test set, mLSTM-64: ~2 min
    python benchmarks/bench_score.py                      # 1,821 SST-2 test texts, mLSTM-128
    python benchmarks/bench_score.py --texts amazon       # Amazon (Blitzer) test reviews

Texts: SST-2 test sentences or Amazon test reviews from $SENTDISC_DATA (../shared/data), else
seeded word salad. They are written as a gzipped loose-JSON corpus ({"id", "text"} per line,
``--shards`` files); the 10x corpus is the same shards written ten times. Model: mLSTM-H with
random weights and a classifier with random weights over mean features (speed depends on
neither). Rows, measured in one run:

* in process: ``featurize`` + ``Classifier.predict_proba`` on the same texts, one process
  with ``--threads`` torch threads (one replica's share), best of ``--reps`` before the
  scoring runs and ``--reps`` after (the machine is shared: the baseline gets its best);
* ``score_corpus`` with 1 and 2 replicas of ``--threads`` CPUs each: wall (listing, the tally
  pass, actor start-up, writing included) and the replicas' rate once started (first batch
  to last), each against the in-process rate;
* ``score_corpus`` with 2 replicas on the 10x corpus: its driver's peak RSS (sampled every
  0.1 s over the whole call) and the replicas' peak, against the 1x run's.

The scored probabilities are checked against the in-process ones, matched by line.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_note, print_table, set_threads

from sentdisc.checkpoint import save
from sentdisc.classifier import fit_result_to_classifier
from sentdisc.data.config import DataConfig
from sentdisc.features import featurize
from sentdisc.model import ByteLM, ModelConfig
from sentdisc.score import rss_mib, score_corpus

REPO = Path(__file__).resolve().parents[1]


def load_texts(which: str, n: int, seed: int = 0) -> tuple[list[str], str]:
    root = Path(os.environ.get("SENTDISC_DATA", REPO.parent / "shared" / "data"))
    path = root / {"sst2": "sst2", "amazon": "amazon_blitzer"}[which] / "test.csv"
    if path.exists():
        df = pd.read_csv(path)
        col = "sentence" if which == "sst2" else "text"
        texts = df[col].astype(str).tolist()
        return texts[:n] if n else texts, f"{which} test ({path})"
    rng = np.random.default_rng(seed)
    words = np.array(["good", "bad", "movie", "plot", "the", "a", "was", "not", "great", "boring",
                      "acting", "fun", "caf\u00e9", "really", "and", "it"])
    texts = [" ".join(rng.choice(words, int(rng.integers(5, 40)))) for _ in range(n or 1000)]
    return texts, "generated word salad (no shared data)"


def write_corpus(texts: list[str], folder: Path, shards: int, copies: int = 1) -> str:
    """Texts as gzipped loose JSON, ``shards`` files, written ``copies`` times."""
    folder.mkdir(parents=True, exist_ok=True)
    for s, part in enumerate(np.array_split(np.arange(len(texts)), shards)):
        data = "".join(json.dumps({"id": int(i), "text": texts[i]}) + "\n" for i in part).encode()
        for c in range(copies):
            (folder / f"part-{c:02d}-{s:03d}.json.gz").write_bytes(gzip.compress(data, mtime=0))
    return str(folder)


def make_model(rnn_size: int, embed_size: int, tmp: Path):
    torch.manual_seed(0)
    model = ByteLM(ModelConfig(embed_size=embed_size, rnn_size=rnn_size)).eval()
    coef = np.random.default_rng(0).normal(size=rnn_size) / np.sqrt(rnn_size) * 4
    neurons = [int(n) for n in np.argsort(-np.abs(coef))[:3]]
    clf = fit_result_to_classifier(coef, 0.1, 1.0, neurons, coef[neurons], 0.0, 1.0,
                                   feature_kind="mean", layer=-1)
    ckpt = save(model, tmp / "ckpt")
    return model, clf, str(ckpt), str(clf.save(tmp / "classifier.json"))


def in_process(model, clf, texts, reps: int) -> tuple[float, np.ndarray]:
    best, probs = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        feats = featurize(model, texts, batch_size=128, kind=clf.feature_kind, layer=clf.layer)
        probs = clf.predict_proba(feats)
        best = min(best, time.perf_counter() - t0)
    return best, probs


class PeakRSS:
    """The driver's RSS sampled every 0.1 s on a thread: the peak while inside ``with``."""

    def __enter__(self):
        self.peak, self._stop = rss_mib(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, rss_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def score_run(data: str, ckpt: str, clf_path: str, out: Path, replicas: int, threads: int):
    with PeakRSS() as rss:
        summary = score_corpus(data, ckpt, clf_path, str(out), DataConfig(text_key="text",
                               label_key="id"), replicas=replicas, cpus_per_replica=threads,
                               overwrite=True, log=lambda line: None)
    return summary, rss.peak


def check_probs(out: Path, probs: np.ndarray) -> float:
    """Max |scored - in-process| probability, matched by id (1x corpus)."""
    import pyarrow.parquet as pq

    table = pq.read_table(out, columns=["id", "prob"]).to_pandas()
    ids = table["id"].astype(int).to_numpy()
    assert len(ids) == len(probs) and len(set(ids)) == len(ids), "rows lost or repeated"
    return float(np.abs(table["prob"].to_numpy() - probs[ids]).max())


def row(name, texts, seconds, steady, base_rate, driver="", replica=""):
    """A table row: wall rate, the replicas' rate once started, each over in process."""
    rate = texts / seconds
    return {"path": name, "texts": texts, "seconds": f"{seconds:.2f}",
            "texts/s": f"{rate:.1f}", "ratio": f"{rate / base_rate:.2f}x",
            "started texts/s": f"{steady:.1f}" if steady else "",
            "started ratio": f"{steady / base_rate:.2f}x" if steady else "",
            "driver MiB": driver, "replica MiB": replica}


def _steady(r: dict):
    return float(r["started texts/s"]) if r["started texts/s"] else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--texts", default="sst2", choices=["sst2", "amazon"])
    p.add_argument("--max_texts", type=int, default=0, help="0: the whole test set")
    p.add_argument("--rnn_size", type=int, default=128)
    p.add_argument("--embed_size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads in process = CPUs "
                   "per replica")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="mLSTM-64")
    args = p.parse_args(argv)
    if args.quick:
        args.rnn_size = 64
    set_threads(args.threads)
    texts, source = load_texts(args.texts, args.max_texts)
    tmp = Path(tempfile.mkdtemp(prefix="bench_score_"))
    model, clf, ckpt, clf_path = make_model(args.rnn_size, args.embed_size, tmp)
    one = write_corpus(texts, tmp / "x1", args.shards)
    ten = write_corpus(texts, tmp / "x10", args.shards, copies=10)
    print(f"score: {len(texts)} texts of {source}, mLSTM-{args.rnn_size} (embed "
          f"{args.embed_size}), mean features, {args.threads} thread(s) per replica, "
          f"{load_note()}", flush=True)
    t_base, probs = in_process(model, clf, texts, args.reps)
    base_rate = len(texts) / t_base
    rows = [row(f"in process ({args.threads} thread)", len(texts), t_base, None, base_rate)]
    import ray

    ray.init(num_cpus=2 * args.threads + 1, include_dashboard=False, log_to_driver=False)
    runs, err = {}, float("nan")
    for name, data, replicas in (("1x, 1 replica", one, 1), ("1x, 2 replicas", one, 2),
                                 ("10x, 2 replicas", ten, 2)):
        summary, peak = score_run(data, ckpt, clf_path, tmp / "out", replicas, args.threads)
        if data == one:
            err = check_probs(tmp / "out", probs)
            assert err < 1e-5, f"scored probabilities differ from in process by {err}"
        runs[name] = (summary, peak)
        rows.append(row(f"score {name} (wall, incl. tally {summary['seconds']['tally']:.1f} s)",
                        summary["rows_written"], summary["seconds"]["wall"],
                        summary["steady_texts_per_s"], base_rate, f"{peak:.0f}",
                        f"{summary['peak_rss_mib']['replica_max']:.0f}"))
        print(f"  {name}: {summary['seconds']['wall']:.1f} s, {load_note()}", flush=True)
    ray.shutdown()
    # The machine is shared: time in process again after the runs and keep the best, so a
    # burst of someone else's load favours neither side (the ratios are then conservative).
    t_again, _ = in_process(model, clf, texts, args.reps)
    if t_again < t_base:
        t_base, base_rate = t_again, len(texts) / t_again
        rows = [row(r["path"], r["texts"], float(r["seconds"]), _steady(r), base_rate,
                    r["driver MiB"], r["replica MiB"]) for r in rows]
        rows[0] = row(f"in process ({args.threads} thread)", len(texts), t_base, None, base_rate)
    print_table(rows, [(k, k) for k in rows[0]])
    (s1, d1), (s10, d10) = runs["1x, 2 replicas"], runs["10x, 2 replicas"]
    r1, r10 = (s["peak_rss_mib"]["replica_max"] for s in (s1, s10))
    print(f"10x / 1x corpus: driver peak RSS {d10 / d1:.2f}x ({d1:.0f} -> {d10:.0f} MiB), "
          f"replica peak RSS {r10 / r1:.2f}x ({r1:.0f} -> {r10:.0f} MiB); "
          f"max |prob - in process| {err:.1e}; {load_note()}")


if __name__ == "__main__":
    main()
