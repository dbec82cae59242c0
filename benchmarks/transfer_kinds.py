"""Every label kind on the real data, end to end: transfer, Serve's /classify, batch scoring.

    multiclass   Amazon-Blitzer's four product categories (--label_key category)
    multiclass   IMDB's 1-10 ratings, eight values (--label_key rating), a seeded subset
    multilabel   Amazon-Blitzer's category one-hot plus its positive label, five 0/1 columns
                 built here from the CSVs (--label_key books,dvd,electronics,kitchen,positive)

For the four-category classifier it also serves the checkpoint with it (Ray Serve, real HTTP:
/classify's four probabilities per text must sum to 1, /sentiment must point to /classify) and
scores the Amazon review corpus with it (one probability column per label).

    python benchmarks/transfer_kinds.py --load_model experiments/local/checkpoint_final
    python benchmarks/transfer_kinds.py --quick

Writes <out>/transfer_kinds.{md,json}; the jobs' outputs (results.json, confusion.png,
label_auc.png, extremes.html) under <out>/runs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import load_note, wait_healthy  # noqa: E402
from sentdisc.config import default_data_dir  # noqa: E402

CATEGORIES = ["books", "dvd", "electronics", "kitchen"]


def multilabel_tables(out: Path) -> dict:
    """The Amazon-Blitzer CSVs with 0/1 columns: one per category, and positive."""
    import pandas as pd

    d = default_data_dir() / "amazon_blitzer"
    paths = {}
    for split in ("train", "val", "test"):
        df = pd.read_csv(d / f"{split}.csv", keep_default_na=False)
        table = pd.DataFrame({"text": df["text"]})
        for c in CATEGORIES:
            table[c] = (df["category"] == c).astype(int)
        table["positive"] = df["label"].astype(int)
        paths[split] = out / "amazon_multilabel" / f"{split}.csv"
        paths[split].parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(paths[split], index=False)
    return paths


def transfer(argv: list, run_dir: Path) -> tuple[dict, float]:
    from sentdisc.recipes.transfer import main

    t0 = time.perf_counter()
    if main(argv) != 0:
        raise SystemExit(f"transfer {' '.join(argv)} failed")
    return json.loads((run_dir / "results.json").read_text()), time.perf_counter() - t0


def summary(name: str, res: dict, seconds: float) -> dict:
    test = res["metrics"].get("test") or res["metrics"]["val"]
    return {"task": name, "label_kind": res["label_kind"], "labels": res["labels"],
            "test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"],
            "test_balanced_accuracy": test["balanced_accuracy"],
            "per_label": {k: {m: v[m] for m in ("f1", "roc_auc")}
                          for k, v in test["per_label"].items()},
            "files": {k: v for k, v in res["files"].items()
                      if k in ("results", "confusion", "label_auc", "extremes", "classifier")},
            "seconds": round(seconds, 1)}


def serve_check(checkpoint: str, classifier: str, texts: list) -> dict:
    """Serve the checkpoint with the classifier; /classify and /sentiment over real HTTP."""
    import requests
    from ray import serve

    from sentdisc.serving import make_app

    serve.run(make_app({"checkpoint": checkpoint, "classifier": classifier}), name="kinds",
              route_prefix="/")
    try:
        base = "http://127.0.0.1:8000"
        wait_healthy(base)
        got = requests.post(base + "/classify", json={"texts": texts}, timeout=120).json()
        sums = [sum(r["probabilities"].values()) for r in got["results"]]
        sent = requests.post(base + "/sentiment", json={"texts": texts[:1]}, timeout=60)
        return {"labels": got["labels"], "n_probabilities": len(got["results"][0]["probabilities"]),
                "max_abs_sum_error": max(abs(s - 1) for s in sums),
                "first": got["results"][0], "sentiment_status": sent.status_code,
                "sentiment_message": sent.json()["detail"][0]["msg"]}
    finally:
        serve.delete("kinds")


def score_check(checkpoint: str, classifier: str, out: Path, quick: bool) -> dict:
    import pyarrow.parquet as pq

    from sentdisc.recipes.score import main

    data = default_data_dir() / "amazon_blitzer" / "reviews"
    data = data / "books.json" if quick else data
    if main(["--load_model", checkpoint, "--classifier", classifier, "--data", str(data),
             "--output", str(out), "--overwrite", "--replicas", "1"]) != 0:
        raise SystemExit("score failed")
    table = pq.read_table(out)
    return {"rows": table.num_rows, "columns": table.column_names,
            "summary": {k: v for k, v in json.loads((out / "_summary.json").read_text()).items()
                        if k in ("texts_per_s", "rows_written", "label_kind", "labels")}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load_model", default=str(REPO / "experiments/local/checkpoint_final"))
    p.add_argument("--out", default=str(REPO / "benchmarks/results/transfer_kinds"))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    exp = out / "runs"
    d = default_data_dir()
    small = ["--max_train", "300", "--max_eval", "200"] if args.quick else []
    common = ["--load_model", args.load_model, "--experiment_dir", str(exp), "--tracking",
              "none", "--feature_kind", "mean", "--num_neurons", "2"]
    amz = d / "amazon_blitzer"
    results, t0 = {}, time.perf_counter()
    res, s = transfer(common + small + [
        "--train", str(amz / "train.csv"), "--valid", str(amz / "val.csv"), "--test",
        str(amz / "test.csv"), "--text_key", "text", "--label_key", "category", "--dataset",
        "amazon_categories"], exp / "default" / "transfer" / "amazon_categories")
    results["amazon_categories"] = summary("amazon_categories", res, s)
    clf = res["files"]["classifier"]
    import pandas as pd

    texts = pd.read_csv(amz / "test.csv")["text"].head(8).tolist()
    results["serve"] = serve_check(args.load_model, clf, texts)
    results["score"] = score_check(args.load_model, clf, out / "scored", args.quick)

    imdb = d / "imdb"
    res, s = transfer(common + (small or ["--max_train", "4000", "--max_eval", "2000"]) + [
        "--train", str(imdb / "train.csv"), "--test", str(imdb / "test.csv"), "--text_key",
        "text", "--label_key", "rating", "--dataset", "imdb_ratings"],
        exp / "default" / "transfer" / "imdb_ratings")
    results["imdb_ratings"] = summary("imdb_ratings", res, s)

    ml = multilabel_tables(out)
    res, s = transfer(common + small + [
        "--train", str(ml["train"]), "--valid", str(ml["val"]), "--test", str(ml["test"]),
        "--text_key", "text", "--label_key", ",".join(CATEGORIES + ["positive"]),
        "--dataset", "amazon_multilabel"], exp / "default" / "transfer" / "amazon_multilabel")
    results["amazon_multilabel"] = summary("amazon_multilabel", res, s)

    meta = {"date": time.strftime("%Y-%m-%d"), "checkpoint": args.load_model,
            "minutes": round((time.perf_counter() - t0) / 60, 1), "load": load_note(),
            "quick": args.quick}
    out.mkdir(parents=True, exist_ok=True)
    (out / "transfer_kinds.json").write_text(json.dumps({"meta": meta, **results}, indent=1))
    (out / "transfer_kinds.md").write_text(report(results, meta))
    print(report(results, meta))
    return 0


def report(results: dict, meta: dict) -> str:
    lines = [f"Label kinds on the real data, {meta['date']}, checkpoint {meta['checkpoint']} "
             f"(mean features), {meta['minutes']} min ({meta['load']})", "",
             "| task | kind | labels | test accuracy | macro-F1 | balanced acc. | per-label "
             "ROC AUC | seconds |", "|---|---|---|---|---|---|---|---|"]
    for key in ("amazon_categories", "imdb_ratings", "amazon_multilabel"):
        r = results[key]
        aucs = ", ".join(f"{k} {v['roc_auc']:.2f}" for k, v in r["per_label"].items()
                         if v["roc_auc"] is not None)
        lines.append(f"| {key} | {r['label_kind']} | {len(r['labels'])} | "
                     f"{100 * r['test_accuracy']:.1f} | {100 * r['test_macro_f1']:.1f} | "
                     f"{100 * r['test_balanced_accuracy']:.1f} | {aucs} | {r['seconds']:.0f} |")
    sv, sc = results["serve"], results["score"]
    lines += ["", f"Serve, the four-category classifier: /classify gives {sv['n_probabilities']} "
                  f"probabilities per text, |sum - 1| <= {sv['max_abs_sum_error']:.1e}; "
                  f"/sentiment answers {sv['sentiment_status']}: {sv['sentiment_message']}",
              f"Scoring the Amazon reviews: {sc['rows']} rows, columns {', '.join(sc['columns'])}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
