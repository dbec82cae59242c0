"""Does bf16 cost accuracy? One checkpoint's SST-2 transfer with fp32 and with bf16 features.

    python benchmarks/precision_quality.py --load_model experiments/local/checkpoint_final
    python benchmarks/precision_quality.py --quick        # 500 train / 200 val and test texts

The transfer job runs twice on the same checkpoint, data and seed, ``--precision fp32`` and
``--precision bf16`` (bf16 products in featurize, gates and state in float32); the features'
largest difference and both test accuracies are reported (target: within 0.5 points). On a CPU
without native bf16 the bf16 run is emulated: slow, but the numbers are the same.

Writes <out>/precision_quality.{md,json}.
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load_model", default=str(REPO / "experiments/local/checkpoint_final"))
    p.add_argument("--out", default=str(REPO / "benchmarks/results/precision_quality"))
    p.add_argument("--feature_kind", default="mean")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    from sentdisc.recipes.transfer import main as transfer

    out, sst = Path(args.out), default_data_dir() / "sst2"
    rows = {}
    for precision in ("fp32", "bf16"):
        t0 = time.perf_counter()
        code = transfer(["--load_model", args.load_model, "--train", str(sst / "train.csv"),
                         "--valid", str(sst / "val.csv"), "--test", str(sst / "test.csv"),
                         "--text_key", "sentence", "--feature_kind", args.feature_kind,
                         "--precision", precision, "--experiment_dir", str(out / "runs"),
                         "--experiment_name", precision, "--tracking", "none", "--extremes", "0",
                         "--ray_featurize_threshold", "-1", "--write_results",
                         str(out / "runs" / f"{precision}.csv"),
                         *(["--max_train", "500", "--max_eval", "200"] if args.quick else [])])
        if code != 0:
            raise SystemExit(f"transfer --precision {precision} failed")
        res = json.loads((out / "runs" / precision / "transfer" / "sst2" / "results.json")
                         .read_text())
        rows[precision] = {"test_acc": res["metrics"]["test"]["accuracy"],
                           "val_acc": res["metrics"]["val"]["accuracy"],
                           "C": res["all_neurons"]["C"],
                           "featurize_s": sum(s["seconds"] for s in res["featurize"].values()),
                           "seconds": round(time.perf_counter() - t0, 1)}
    diff = 100 * (rows["bf16"]["test_acc"] - rows["fp32"]["test_acc"])
    meta = {"date": time.strftime("%Y-%m-%d"), "checkpoint": args.load_model,
            "feature_kind": args.feature_kind, "quick": args.quick, "load": load_note()}
    summary = {"meta": meta, **rows, "test_points_bf16_minus_fp32": round(diff, 2),
               "within_half_a_point": abs(diff) <= 0.5}
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision_quality.json").write_text(json.dumps(summary, indent=1))
    text = (f"SST-2 transfer, {meta['date']}, {args.load_model} ({args.feature_kind} features), "
            f"{load_note()}\n\n| products | test accuracy | val accuracy | C | featurize s |\n"
            f"|---|---|---|---|---|\n" + "".join(
                f"| {k} | {100 * r['test_acc']:.2f} | {100 * r['val_acc']:.2f} | {r['C']:g} | "
                f"{r['featurize_s']:.0f} |\n" for k, r in rows.items())
            + f"\nbf16 - fp32: {diff:+.2f} points (target: within 0.5)\n")
    (out / "precision_quality.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
