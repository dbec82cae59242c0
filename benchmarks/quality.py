"""What the features do for sentiment, on the real data: one table, one figure.

Pretrains through the normal pretraining job (Ray Train) for a byte budget, keeping checkpoints
along the way; transfers each checkpoint, and the same architecture with random weights, to
SST-2, Amazon-Blitzer and a seeded IMDB subset with the transfer job's own pieces (featurize ->
Ray Tune sweep of the L1 C on validation -> refit -> top neuron); adds a TF-IDF word 1-2 gram
baseline. Model selection uses validation only; test accuracy is reported, never tuned on.

    python benchmarks/quality.py            # the CPU run quoted in the README (< 60 min here)
    python benchmarks/quality.py --quick    # a few minutes, for checking the script
    python benchmarks/quality.py --use_gpu --rnn_size 4096 ...   # see gpu_quality.sh

Writes <out>/quality.{md,csv,json} and <out>/quality.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sentdisc import ByteLM, ModelConfig, featurize, load  # noqa: E402
from sentdisc.config import OutputConfig  # noqa: E402
from sentdisc.data.readers import DataConfig, build_datasets  # noqa: E402
from sentdisc.labeled import read_table  # noqa: E402
from sentdisc.sweep import SweepConfig, train_classifier  # noqa: E402
from sentdisc.train import TrainConfig, evaluate_bpb, pretrain  # noqa: E402

KINDS = ("cell", "mean")
ANCHORS = {"sst2": "OpenAI 91.8 / NVIDIA 91.27 all, 86.71 one neuron",
           "imdb": "OpenAI 92.88 all, 92.30 sentiment unit"}


def data_dir() -> Path:
    d = Path(os.environ.get("SENTDISC_DATA", REPO.parent / "shared" / "data"))
    if not d.is_dir():
        sys.exit(f"quality: data folder {d} not found (set SENTDISC_DATA)")
    return d


def _sample(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    return df if not n or len(df) <= n else df.sample(n=n, random_state=seed).reset_index(drop=True)


def load_tasks(d: Path, args) -> dict:
    """{task: {split: (texts, labels)}}; subsets are seeded, val never overlaps test."""
    tasks = {}
    splits = ("train", "val", "test")
    sst = {s: read_table(str(d / "sst2" / f"{s}.csv"), "sentence", "label") for s in splits}
    tasks["sst2"] = {s: _sample(df, args.max_sst2, args.seed) for s, df in sst.items()}
    amz = {s: read_table(str(d / "amazon_blitzer" / f"{s}.csv"), "text", "label") for s in splits}
    tasks["amazon"] = {"train": _sample(amz["train"], args.max_train, args.seed),
                       "val": _sample(amz["val"], args.max_val, args.seed),
                       "test": _sample(amz["test"], args.max_test, args.seed)}
    imdb_train = _sample(read_table(str(d / "imdb" / "train.csv"), "text", "label"),
                         args.max_train + args.max_val, args.seed)
    tasks["imdb"] = {"train": imdb_train.iloc[:args.max_train].reset_index(drop=True),
                     "val": imdb_train.iloc[args.max_train:].reset_index(drop=True),
                     "test": _sample(read_table(str(d / "imdb" / "test.csv"), "text", "label"),
                                     args.max_test, args.seed)}
    return {t: {s: (df["text"].astype(str).tolist(), df["label"].to_numpy().astype(int))
                for s, df in splits.items()} for t, splits in tasks.items()}


def tfidf_baseline(splits: dict, seed: int) -> float:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    Xtr = vec.fit_transform(splits["train"][0])
    best = None
    for C in (0.25, 1.0, 4.0, 16.0):  # chosen on validation
        clf = LogisticRegression(C=C, max_iter=2000, random_state=seed).fit(Xtr, splits["train"][1])
        val = clf.score(vec.transform(splits["val"][0]), splits["val"][1])
        if best is None or val > best[0]:
            best = (val, clf)
    return float(best[1].score(vec.transform(splits["test"][0]), splits["test"][1]))


def transfer_row(model, tasks: dict, args, out: Path, tag: str) -> dict:
    row = {}
    for task, splits in tasks.items():
        t0 = time.perf_counter()
        feats = {s: featurize(model, texts, kind=list(KINDS), batch_size=args.featurize_batch)
                 for s, (texts, _) in splits.items()}
        nbytes = sum(len(t.encode()) for texts, _ in splits.values() for t in texts)
        print(f"  [{tag}] {task}: featurized {nbytes / 1e6:.1f} MB in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        for kind in KINDS:
            sweep = SweepConfig(seed=args.seed, backend=args.sweep_backend, standardize=True,
                                num_neurons=1,
                                storage=out / "tune" / tag / task / kind)
            _, res = train_classifier(
                feats["train"][kind], splits["train"][1], feats["val"][kind], splits["val"][1],
                feats["test"][kind], splits["test"][1], sweep, feature_kind=kind,
                log=lambda *a: None)
            row[f"{task}/{kind}/all"] = res["all_neurons"]["test_acc"]
            row[f"{task}/{kind}/top1"] = res["top_neurons"]["test_acc"]
            row[f"{task}/{kind}/val_all"] = res["all_neurons"]["val_acc"]
            row[f"{task}/{kind}/neuron"] = res["top_neurons"]["neurons"][0]
            print(f"  [{tag}] {task} {kind:<4}: test all {100 * row[f'{task}/{kind}/all']:.1f}  "
                  f"top-1 {100 * row[f'{task}/{kind}/top1']:.1f} (neuron "
                  f"{row[f'{task}/{kind}/neuron']}, C {res['all_neurons']['C']:.3g})", flush=True)
    return row


def checkpoints_in(run_dir: Path) -> list[Path]:
    found = []
    for d in run_dir.glob("checkpoint_*"):
        state = d / "train_state.json"
        if d.name != "checkpoint_final" and state.exists():
            found.append((json.loads(state.read_text())["bytes_seen"], d))
    return [d for _, d in sorted(found)]


def markdown(rows: list[dict], tfidf: dict, tasks) -> str:
    head = ["model", "bytes trained", "held-out bpb"]
    for t in tasks:
        for k in KINDS:
            head += [f"{t} {k} all", f"{t} {k} top-1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda v: "n/a" if v is None else f"{100 * v:.1f}"
    for r in rows:
        cells = [r["model"], f"{r['bytes'] / 1e6:.1f} MB", f"{r['bpb']:.3f}"]
        for t in tasks:
            for k in KINDS:
                cells += [fmt(r.get(f"{t}/{k}/all")), fmt(r.get(f"{t}/{k}/top1"))]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["TF-IDF 1-2 gram LR", "-", "-"]
    for t in tasks:
        cells += [fmt(tfidf[t]), "-"] + ["-", "-"] * (len(KINDS) - 1)
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], tfidf: dict, tasks, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in rows if r["model"] != "random"]
    rand = next(r for r in rows if r["model"] == "random")
    x = [r["bytes"] / 1e6 for r in trained]
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(5 * (len(tasks) + 1), 4))
    for ax, t in zip(axes, tasks, strict=False):  # the last axis is the bpb panel
        for k, color in zip(KINDS, ("tab:blue", "tab:orange"), strict=True):
            ax.plot(x, [100 * r[f"{t}/{k}/all"] for r in trained], "o-", color=color,
                    label=f"{k}, all")
            ax.plot(x, [100 * r[f"{t}/{k}/top1"] for r in trained], "s--", color=color,
                    label=f"{k}, top-1")
            ax.axhline(100 * rand[f"{t}/{k}/all"], color=color, lw=0.8, ls=":",
                       label=f"random weights, {k}")
        ax.axhline(100 * tfidf[t], color="k", lw=1, ls="-.", label="TF-IDF 1-2 gram")
        ax.set(title=f"{t}: test accuracy", xlabel="MB trained", ylabel="accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    ax = axes[-1]
    ax.plot(x, [r["bpb"] for r in trained], "o-", color="tab:green")
    ax.set(title="held-out bits per byte", xlabel="MB trained", ylabel="bits/byte")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", default="imdb", choices=["imdb", "amazon"])
    p.add_argument("--corpus_path", default="", help="pretraining files (default: the corpus's "
                   "reviews/ folder under SENTDISC_DATA), e.g. a slice of imdb/reviews")
    p.add_argument("--use_gpu", action="store_true", help="train on GPU workers, featurize on cuda")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--rnn_size", type=int, default=512)
    p.add_argument("--embed_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seq_length", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max_iters", type=int, default=2200, help="the pretraining budget")
    p.add_argument("--checkpoints", type=int, default=2, help="checkpoints along the way")
    p.add_argument("--num_workers", type=int, default=1)
    p.add_argument("--threads_per_worker", type=int, default=2)
    p.add_argument("--max_sst2", type=int, default=0, help="subset of each SST-2 split (0: all)")
    p.add_argument("--max_train", type=int, default=1500)
    p.add_argument("--max_val", type=int, default=500)
    p.add_argument("--max_test", type=int, default=1000)
    p.add_argument("--featurize_batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quality"))
    p.add_argument("--experiment_dir", default=str(REPO / "experiments"))
    p.add_argument("--skip_pretrain", action="store_true",
                   help="reuse the checkpoints already there")
    p.add_argument("--tracking", default="mlflow", help="mlflow | none (sentdisc.tracking)")
    p.add_argument("--sweep_backend", default="tune",
                   help="tune: a Ray Tune trial per C | local: in process (dry runs)")
    p.add_argument("--quick", action="store_true",
                   help="tiny budget and subsets: checks the script")
    args = p.parse_args(argv)
    if args.quick:
        args.max_iters, args.rnn_size, args.checkpoints = 60, 64, 2
        args.max_sst2, args.max_train, args.max_val, args.max_test = 300, 200, 100, 200
    import torch
    torch.set_num_threads(args.threads_per_worker)

    d = data_dir()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    name = f"quality-{args.corpus}-{args.rnn_size}" + ("-quick" if args.quick else "")
    corpus = Path(args.corpus_path) if args.corpus_path else \
        {"imdb": d / "imdb" / "reviews", "amazon": d / "amazon_blitzer" / "reviews"}[args.corpus]
    model_cfg = ModelConfig(embed_size=args.embed_size, rnn_size=args.rnn_size, layers=1,
                            rnn_type="mlstm", weight_norm="recurrent")
    data_cfg = DataConfig(train=str(corpus), split="0.98,0.02,0", text_key="reviewText",
                          persist_state=0, seed=args.seed)
    train_cfg = TrainConfig(
        batch_size=args.batch_size, seq_length=args.seq_length, lr=args.lr,
        lr_scheduler="linear", max_iters=args.max_iters, log_interval=max(10, args.max_iters // 60),
        save_iters=args.max_iters // args.checkpoints, eval_iters=16, num_workers=args.num_workers,
        use_gpu=args.use_gpu, precision=args.precision,
        cpus_per_worker=1, threads_per_worker=args.threads_per_worker,
        keep_checkpoints=args.checkpoints + 2, max_failures=1)
    output_cfg = OutputConfig(experiment_dir=args.experiment_dir, experiment_name=name)
    run_dir = Path(args.experiment_dir) / name
    print(f"== pretraining mLSTM-{args.rnn_size} on {args.corpus} for {args.max_iters} iterations "
          f"of {args.batch_size}x{args.seq_length} bytes "
          f"({args.max_iters * args.batch_size * args.seq_length / 1e6:.1f} MB)", flush=True)
    if not args.skip_pretrain:
        from sentdisc.tracking import TrackingConfig
        summary = pretrain(model_cfg, data_cfg, train_cfg, output_cfg,
                           tracking=TrackingConfig(tracking=args.tracking))
        print(f"   done in {summary['wall_s'] / 60:.1f} min", flush=True)
    t_pretrain = time.perf_counter() - t_start
    ckpts = checkpoints_in(run_dir)
    print(f"== {len(ckpts)} checkpoints: {[c.name for c in ckpts]}", flush=True)

    heldout = build_datasets(data_cfg)["val"]
    tasks = load_tasks(d, args)
    tfidf = {t: tfidf_baseline(s, args.seed) for t, s in tasks.items()}
    print("== TF-IDF baselines: " + ", ".join(f"{t} {100 * v:.1f}" for t, v in tfidf.items()),
          flush=True)

    torch.manual_seed(args.seed)
    device = "cuda" if args.use_gpu else "cpu"
    models = [("random", 0, ByteLM(model_cfg).eval().to(device))]
    for c in ckpts:
        models.append((c.name, json.loads((c / "train_state.json").read_text())["bytes_seen"],
                       load(c, map_location=device)))
    rows = []
    for tag, nbytes, model in models:
        t_model = time.perf_counter()
        bpb = evaluate_bpb(model, heldout, batch_size=32, seq_length=256, max_windows=64)
        print(f"== {tag}: {nbytes / 1e6:.1f} MB trained, held-out {bpb:.3f} bits/byte", flush=True)
        row = {"model": tag, "bytes": nbytes, "bpb": bpb}
        row.update(transfer_row(model, tasks, args, out, tag))
        row["transfer_s"] = time.perf_counter() - t_model
        print(f"== {tag}: transferred in {row['transfer_s'] / 60:.1f} min", flush=True)
        rows.append(row)

    table = markdown(rows, tfidf, list(tasks))
    wall = time.perf_counter() - t_start
    header = (f"mLSTM-{args.rnn_size} (embed {args.embed_size}) pretrained on {args.corpus} "
              f"reviews, {args.batch_size}x{args.seq_length} windows, Adam lr {args.lr} linear "
              f"decay; test accuracy (%) of an L1 logistic regression on standardized features, "
              f"C chosen on validation by a "
              f"{'Ray Tune' if args.sweep_backend == 'tune' else 'local'} sweep; "
              f"subsets: SST-2 {'all' if not args.max_sst2 else args.max_sst2}, "
              f"Amazon/IMDB train {args.max_train} val {args.max_val} test {args.max_test}. "
              f"Pretraining {t_pretrain / 60:.1f} min, whole run {wall / 60:.1f} min.")
    (out / "quality.md").write_text(header + "\n\n" + table + "\n")
    pd.DataFrame(rows).to_csv(out / "quality.csv", index=False)
    (out / "quality.json").write_text(json.dumps(
        {"rows": rows, "tfidf": tfidf, "args": vars(args), "wall_s": wall,
         "anchors": ANCHORS}, indent=2, default=float))
    plot(rows, tfidf, list(tasks), out / "quality.png")
    print("\n" + header + "\n\n" + table)
    print(f"\nwrote {out}/quality.md, quality.csv, quality.json, quality.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
