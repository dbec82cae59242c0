"""Fine-tuning against frozen features, on the real data: one table, one figure.

For each task (SST-2, Amazon-Blitzer positive/negative, a seeded IMDB subset) and each of two
models of one size, the pretrained checkpoint and the same architecture with random weights:

    frozen     the transfer job (featurize -> Ray Tune sweep of the L1 C on validation)
    fine-tuned the finetune job (Ray Train, the LM + a head on the mean hidden state, early
               stopping on validation), scored on test as serving scores it

Every number is test accuracy from the job's own results.json; selection used validation only.

    python benchmarks/finetune_quality.py --load_model experiments/local/checkpoint_final
    python benchmarks/finetune_quality.py --quick      # minutes: checks the script

Writes <out>/finetune_quality.{md,json,png}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import load_note  # noqa: E402
from sentdisc.config import default_data_dir  # noqa: E402

# task -> (folder, text key, train/valid/test files, subset flags, fine-tuning epochs)
TASKS = {
    "sst2": ("sst2", "sentence", ("train.csv", "val.csv", "test.csv"), [], 6),
    "amazon": ("amazon_blitzer", "text", ("train.csv", "val.csv", "test.csv"),
               ["--max_train", "1500", "--max_eval", "1000"], 4),
    "imdb": ("imdb", "text", ("train.csv", None, "test.csv"),
             ["--max_train", "2000", "--max_eval", "1000"], 3),
}


def random_twin(checkpoint: str, out: Path) -> str:
    """The checkpoint's architecture with random weights (seeded)."""
    import torch

    from sentdisc import ByteLM, save
    from sentdisc.checkpoint import load_config

    torch.manual_seed(0)
    return str(save(ByteLM(load_config(checkpoint)), out / "random_weights"))


def data_flags(task: str, quick: bool) -> list:
    folder, text_key, (train, valid, test), subset, _ = TASKS[task]
    d = default_data_dir() / folder
    flags = ["--train", str(d / train), "--test", str(d / test), "--text_key", text_key,
             "--label_key", "label", "--dataset", task]
    if valid:
        flags += ["--valid", str(d / valid)]
    if quick:
        subset = ["--max_train", "256", "--max_eval", "128"]
    return flags + subset


def run(recipe: str, argv: list) -> dict:
    """A job through its recipe (as `sentdisc <recipe>` runs it); its results.json."""
    import importlib

    main = importlib.import_module(f"sentdisc.recipes.{recipe}").main
    t0 = time.perf_counter()
    if main(argv) != 0:
        raise SystemExit(f"{recipe} {' '.join(argv)} failed")
    return {"seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load_model", default=str(REPO / "experiments/local/checkpoint_final"))
    p.add_argument("--out", default=str(REPO / "benchmarks/results/finetune_quality"))
    p.add_argument("--tasks", default="sst2,amazon,imdb")
    p.add_argument("--num_workers", default="2")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    exp = out / "runs"
    models = {"pretrained": args.load_model, "random": random_twin(args.load_model, out)}
    rows, t_all = [], time.perf_counter()
    for task in args.tasks.split(","):
        flags = data_flags(task, args.quick)
        epochs = "1" if args.quick else str(TASKS[task][4])
        for name, ckpt in models.items():
            common = ["--load_model", ckpt, *flags, "--experiment_dir", str(exp),
                      "--experiment_name", name, "--tracking", "none", "--extremes", "0"]
            t = run("transfer", common + ["--feature_kind", "mean"])
            res = json.loads((exp / name / "transfer" / task / "results.json").read_text())
            rows.append({"task": task, "model": name, "method": "frozen features + L1",
                         "test_acc": res["metrics"]["test"]["accuracy"],
                         "val_acc": res["metrics"]["val"]["accuracy"],
                         "seconds": round(t["seconds"], 1)})
            t = run("finetune", common + ["--epochs", epochs, "--num_workers", args.num_workers])
            res = json.loads((exp / name / "finetune" / task / "results.json").read_text())
            rows.append({"task": task, "model": name, "method": "fine-tuned",
                         "test_acc": res["metrics"]["test"]["accuracy"],
                         "val_acc": res["metrics"]["val"]["accuracy"],
                         "seconds": round(t["seconds"], 1), "iterations": res["iterations"],
                         "best_iteration": res["best"]["iteration"],
                         "stopped_early": res["stopped_early"]})
            print(f"[finetune_quality] {rows[-2]}\n[finetune_quality] {rows[-1]}", flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "checkpoint": args.load_model,
            "minutes": round((time.perf_counter() - t_all) / 60, 1), "load": load_note(),
            "quick": args.quick, "num_workers": args.num_workers}
    (out / "finetune_quality.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "finetune_quality.md").write_text(table(rows, meta))
    plot(rows, out / "finetune_quality.png")
    print(table(rows, meta))
    return 0


def table(rows: list, meta: dict) -> str:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    cols = [("random", "frozen features + L1"), ("pretrained", "frozen features + L1"),
            ("random", "fine-tuned"), ("pretrained", "fine-tuned")]
    lines = [f"Test accuracy (%), {meta['date']}, checkpoint {meta['checkpoint']}, "
             f"{meta['minutes']} min in all ({meta['load']})", "",
             "| task | " + " | ".join(f"{m}: {how}" for m, how in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for task in tasks:
        cells = []
        for m, how in cols:
            r = next((r for r in rows if (r["task"], r["model"], r["method"]) == (task, m, how)),
                     None)
            cells.append("-" if r is None else f"{100 * r['test_acc']:.1f} ({r['seconds']:.0f} s)")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    series = [("random", "frozen features + L1"), ("pretrained", "frozen features + L1"),
              ("random", "fine-tuned"), ("pretrained", "fine-tuned")]
    x = np.arange(len(tasks))
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (m, how) in enumerate(series):
        vals = [next((100 * r["test_acc"] for r in rows if (r["task"], r["model"], r["method"])
                      == (t, m, how)), 0) for t in tasks]
        ax.bar(x + (i - 1.5) * 0.2, vals, width=0.2, label=f"{m}: {how}")
    ax.set_xticks(x, tasks)
    ax.set_ylim(40, 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Fine-tuning vs frozen features, same architecture, pretrained or random")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
