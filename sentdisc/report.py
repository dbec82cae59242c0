"""Run outputs a person reads: CSVs, PNG plots, progress lines and the transfer report.

Pretraining: the metrics history as CSV, the loss curve, one progress line per report.
Transfer: featurize progress, the report of NVIDIA's transfer.py, the sweep as CSV, the neuron
weight and histogram plots, per-sample results. Pure functions of rows, dicts and arrays (no
torch), so the driver of any job can reuse them. Files are written through ``sentdisc.storage``
(any local path or URI, atomically).
"""
from __future__ import annotations

import csv
import io
import math
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from sentdisc import storage


def merge_rows(rows: list[dict], new: Iterable[dict], key: str = "iteration") -> list[dict]:
    """Append ``new`` rows; a row whose ``key`` does not advance replaces the rows it repeats.

    After a restart from a checkpoint the run reports iterations it had already reported before
    it died; the rows of the attempt that died after that checkpoint are dropped.
    """
    out = list(rows)
    for row in new:
        it = row.get(key)
        if it is not None:
            while (out and out[-1].get(key) is not None and out[-1][key] >= it
                   and not row.get("final")):
                out.pop()
        out.append(row)
    return out


def write_history(rows: list[dict], path: str | Path) -> str | Path:
    """Rows -> CSV with the union of their columns (first-seen order); missing cells empty."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    return write_csv(path, columns, [{k: _cell(v) for k, v in row.items()} for row in rows])


def read_history(path: str | Path) -> list[dict]:
    """CSV written by write_history -> rows with numbers parsed back. write_history writes every
    cell of every row, so a row short of cells is one read while it was being written (a live
    run's file): it is left out, and the next read has it whole."""
    text = storage.read_text(str(path))
    return [{k: parse_cell(v) for k, v in row.items() if v != ""}
            for row in csv.DictReader(io.StringIO(text, newline=""))
            if None not in row.values() and None not in row]


def write_csv(path: str | Path, columns: Sequence[str], rows: Iterable[dict | Sequence]
              ) -> str | Path:
    """Rows (dicts by column, or sequences in column order) -> a CSV file on any storage."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([row.get(c, "") for c in columns] if isinstance(row, dict) else row)
    storage.write_text(str(path), buf.getvalue())
    return path


def save_figure(fig, path: str | Path, **kw) -> str | Path:
    """A matplotlib figure -> PNG on any storage; the figure is closed."""
    data = storage.savefig_bytes(fig, **kw)
    _pyplot().close(fig)
    storage.write_bytes(str(path), data)
    return path


def plot_loss(rows: list[dict], path: str | Path, title: str = "pretraining") -> Path | None:
    """Training bits per byte (or, for a classifier, its loss) against bytes seen; val/test
    bits per byte as horizontal marks, and validation scores (``val_score``, fine-tuning) on a
    second axis, when present."""
    plt = _pyplot()
    key = "bpb" if any(_finite(r.get("bpb")) for r in rows) else "loss"
    train = [r for r in rows if _finite(r.get(key)) and r.get("bytes_seen") is not None]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    x = [r["bytes_seen"] / 1e6 for r in train]
    ax.plot(x, [r[key] for r in train], lw=1.5, label="train")
    for name, style in (("val_bpb", "--"), ("test_bpb", ":")):
        vals = [r[name] for r in rows if _finite(r.get(name))]
        if vals:
            ax.axhline(vals[-1], ls=style, color="k" if name == "val_bpb" else "grey",
                       label=f"{name.split('_')[0]} {vals[-1]:.3f}")
    ax.set_xlabel("training bytes seen (MB, all workers)")
    ax.set_ylabel("bits per byte" if key == "bpb" else "training loss")
    scored = [r for r in rows if _finite(r.get("val_score")) and r.get("bytes_seen") is not None]
    if scored:
        ax2 = ax.twinx()
        ax2.plot([r["bytes_seen"] / 1e6 for r in scored], [r["val_score"] for r in scored],
                 "o-", color="darkorange", ms=4, label="validation score")
        ax2.set_ylabel(f"validation {scored[-1].get('val_metric', 'score')}")
        ax2.legend(loc="upper right")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left" if scored else "best")
    fig.tight_layout()
    return save_figure(fig, path)


def progress_line(row: dict) -> str:
    """One line per report: iteration, loss, bits per byte, lr, throughput, ETA, skips."""
    total = row.get("total_iters") or 0
    it = row.get("iteration", 0)
    where = f"iter {it}/{total} ({100 * it / total:.0f}%)" if total else f"iter {it}"
    parts = [f"epoch {row.get('epoch', 0)}", where]
    if _finite(row.get("loss")):
        bpb = f" ({row['bpb']:.3f} bpb)" if _finite(row.get("bpb")) else ""
        parts.append(f"loss {row['loss']:.3f}{bpb}")
    if row.get("lr") is not None:
        parts.append(f"lr {row['lr']:.2e}")
    if row.get("bytes_per_s"):
        parts.append(f"{human_bytes(row['bytes_per_s'])}/s")
    if row.get("eta_s") is not None:
        parts.append(f"ETA {human_time(row['eta_s'])}")
    skipped = row.get("skipped_total")
    if skipped:
        parts.append(f"skipped {skipped}")
    return " | ".join(parts)


class ProgressLine:
    """Prints 'name: done/total texts | texts/s | bytes/s | ETA' at most every ``every`` s."""

    def __init__(self, name: str, total: int, total_bytes: int, every: float = 2.0, out=None):
        self.name, self.total, self.total_bytes, self.every = name, total, total_bytes, every
        self.out = out or sys.stdout
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done: int, total: int | None = None) -> None:
        now = time.perf_counter()
        if done < self.total and now - self.last < self.every:
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        rate = done / dt
        bps = self.total_bytes * done / max(self.total, 1) / dt
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        print(f"featurize {self.name}: {done}/{self.total} texts | {rate:.1f} texts/s | "
              f"{bps / 1e3:.1f} KB/s | ETA {eta:.0f}s", file=self.out, flush=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n:.1f} GB"


def human_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# --- transfer ---------------------------------------------------------------------------------

def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def format_report(results: dict) -> str:
    """The report of NVIDIA's transfer.py, from ``sentdisc.sweep.train_classifier``'s results;
    for the multi kinds also macro-F1 and the top neurons of each label."""
    a, t = results["all_neurons"], results["top_neurons"]
    multi = "by_label" in t
    k = len(t["neurons"])
    lines = [f"all neuron regression took {a['seconds']} seconds",
             f"{_pct(a['train_acc'])}, {_pct(a['val_acc'])}, {_pct(a['test_acc'])} "
             f"train, val, test accuracy for all neuron regression"]
    if multi:
        lines.append(f"{_pct(a['train_macro_f1'])}, {_pct(a['val_macro_f1'])}, "
                     f"{_pct(a['test_macro_f1'])} train, val, test macro-F1 for all neuron "
                     f"regression (C chosen by it)")
    lines += [f"{a['C']:g} regularization coefficient used",
              f"{a['nnz']} features used in all neuron regression", "",
              f"using neuron(s) {', '.join(str(n) for n in t['neurons'])} as features for "
              f"regression"]
    if multi:
        for label, picked in t["by_label"].items():
            shown = ", ".join(f"{p['neuron']} ({p['weight']:+.4f})" for p in picked)
            lines.append(f"  label {label}: {shown}")
    else:
        neg, pos = results.get("labels") or ("negative", "positive")
        for n, w in zip(t["neurons"], t["weights"], strict=True):
            toward = pos if w >= 0 else neg
            lines.append(f"  neuron {n}: weight {w:+.4f} " + (
                f"({toward} sentiment)" if (neg, pos) == ("negative", "positive")
                else f"(toward {toward})"))
    lines += [f"{k} neuron regression took {t['seconds']} seconds",
              f"{_pct(t['train_acc'])}, {_pct(t['val_acc'])}, {_pct(t['test_acc'])} "
              f"train, val, test accuracy for {k} neuron regression"]
    if multi:
        lines.append(f"{_pct(t['train_macro_f1'])}, {_pct(t['val_macro_f1'])}, "
                     f"{_pct(t['test_macro_f1'])} train, val, test macro-F1 for {k} neuron "
                     f"regression")
    lines.append(f"{t['C']:g} regularization coefficient used")
    solver, max_iter = results.get("solver"), results.get("max_iter")
    fix = "raise --max_iter" + (", or use --solver fista" if solver == "saga"
                                and results.get("label_kind") == "multiclass" else "")
    for name, r in (("all neuron", a), (f"{k} neuron", t)):
        if not r["converged"]:
            lines.append(f"note: the {name} regression ({solver}) stopped at max_iter "
                         f"{max_iter} before converging ({fix})")
    return "\n".join(lines)


def metrics_lines(metrics: dict) -> str:
    """Per split: accuracy, macro-F1, balanced accuracy; per label F1 and ROC AUC."""
    lines = []
    for split, m in metrics.items():
        bal = m.get("balanced_accuracy")
        lines.append(f"{split}: accuracy {_pct(m['accuracy'])}, macro-F1 {_pct(m['macro_f1'])}"
                     f", balanced accuracy {_pct(bal)} ({m['n']} texts)")
        for label, v in m["per_label"].items():
            auc = "n/a" if v["roc_auc"] is None else f"{v['roc_auc']:.3f}"
            lines.append(f"  {label:<14} precision {_pct(v['precision'])}  recall "
                         f"{_pct(v['recall'])}  F1 {_pct(v['f1'])}  ROC AUC {auc}  "
                         f"(support {v['support']})")
    return "\n".join(lines)


def write_tune_csv(path: str | Path, rows: Sequence[dict], chosen_C: float) -> None:
    cols = ["C", "val_acc", "train_acc", "val_macro_f1", "train_macro_f1", "nnz", "converged",
            "fit_s", "trial_id", "chosen"]
    write_csv(path, cols, [{**r, "chosen": int(r["C"] == chosen_C)} for r in rows])


def plot_neuron_weights(path: str | Path, coef: np.ndarray, neurons: Sequence[int],
                        C: float | None, labels: Sequence[str] | None = None) -> None:
    """The all-neuron model's weights, top neurons marked: one panel (binary), or one per label
    (coef [K, H]). ``C`` None: a fine-tuned head, not an L1 fit."""
    plt = _pyplot()
    rows = np.atleast_2d(np.asarray(coef))
    names = list(labels) if rows.shape[0] > 1 and labels is not None else [None]
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 2.2 + 1.8 * len(names)), squeeze=False,
                             sharex=True)
    for ax, row, name in zip(axes[:, 0], rows, names):
        ax.vlines(np.arange(len(row)), 0, row, color="0.6", linewidth=0.8)
        ax.axhline(0, color="0.3", linewidth=0.5)
        for n in neurons:
            ax.plot([n], [row[n]], "o", color="crimson" if row[n] >= 0 else "navy")
            ax.annotate(f"{n}", (n, row[n]), textcoords="offset points",
                        xytext=(4, 4 if row[n] >= 0 else -12), fontsize=8)
        ax.set_ylabel("weight" if name is None else f"{name}")
    axes[-1, 0].set_xlabel("neuron (feature) index")
    nnz = int(np.sum(np.any(rows != 0, axis=0)))
    what = f"L1 logistic regression weights (C={C:g}, " if C is not None else \
        "fine-tuned classifier head weights ("
    axes[0, 0].set_title(f"{what}{nnz} non-zero neurons); top {len(neurons)} highlighted")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def plot_neuron_histogram(path: str | Path, values: np.ndarray, groups: dict, neuron: int,
                          boundary: float | None, split: str) -> None:
    """The neuron's feature values on ``split``, one histogram per group ({name: row mask}:
    negative / positive, or one per class)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.histogram_bin_edges(values, bins=30)
    two = {"negative": "navy", "positive": "crimson"}
    for i, (name, mask) in enumerate(groups.items()):
        ax.hist(values[mask], bins=bins, alpha=0.55, label=name,
                color=two.get(name) if len(groups) == 2 else f"C{i}")
    if boundary is not None and np.isfinite(boundary):
        ax.axvline(boundary, color="black", linestyle="--",
                   label=f"decision boundary {boundary:.3g}")
    ax.set_xlabel(f"neuron {neuron} value")
    ax.set_ylabel("texts per bin")
    ax.set_title(f"Neuron {neuron} on {split}, by label")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def plot_confusion(path: str | Path, confusion, labels: Sequence[str], split: str) -> None:
    """Counts of true (rows) against predicted (columns) labels, with row-normalised shading."""
    plt = _pyplot()
    m = np.asarray(confusion, dtype=np.float64)
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    size = 2.5 + 0.6 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center",
                    color="white" if share[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = np.trace(m) / max(m.sum(), 1)
    ax.set_title(f"Confusion on {split} (accuracy {100 * acc:.1f}%)")
    fig.colorbar(image, ax=ax, label="share of the true label's texts")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def plot_label_auc(path: str | Path, metrics: dict, split: str) -> None:
    """ROC AUC and F1 of each label on ``split`` (multi-label)."""
    plt = _pyplot()
    names = list(metrics["per_label"])
    auc = [metrics["per_label"][n]["roc_auc"] or 0.0 for n in names]
    f1 = [metrics["per_label"][n]["f1"] for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(2 + 1.1 * len(names), 4))
    ax.bar(x - 0.2, auc, width=0.4, label="ROC AUC", color="teal")
    ax.bar(x + 0.2, f1, width=0.4, label="F1", color="orange")
    for i, v in enumerate(auc):
        ax.text(i - 0.2, v + 0.01, f"{v:.2f}", ha="center", fontsize=8)
    ax.axhline(0.5, color="0.4", linestyle=":", linewidth=0.8)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1.08)
    ax.set_title(f"Per-label ROC AUC and F1 on {split} (macro-F1 "
                 f"{100 * metrics['macro_f1']:.1f}%)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def write_results_csv(path: str | Path, texts, labels, feats: np.ndarray, clf,
                      neurons: Sequence[int]) -> None:
    """Per sample: the probabilities with all neurons (``clf``, a
    ``sentdisc.classifier.Classifier``) and with its top neurons, and the values of ``neurons``.
    Binary: ``prob_all`` and ``prob_top<k>`` (P(positive)); the other kinds: ``pred`` and one
    ``prob_<label>`` column per label."""
    neuron_cols = [f"neuron_{n}" for n in neurons]
    has_label = labels is not None
    if clf.label_kind == "binary":
        p_all = clf.predict_proba(feats)
        p_top = clf.predict_proba_top(feats) if clf.has_top else None
        columns = (["text"] + (["label"] if has_label else []) + ["prob_all"] +
                   ([f"prob_top{len(clf.neurons)}"] if p_top is not None else []) + neuron_cols)
        rows = ([text] + ([int(labels[i])] if has_label else []) + [f"{p_all[i]:.6f}"] +
                ([f"{p_top[i]:.6f}"] if p_top is not None else []) +
                [f"{feats[i, n]:.6f}" for n in neurons] for i, text in enumerate(texts))
        write_csv(path, columns, rows)
        return
    proba, said = clf.label_proba(feats), clf.names(clf.predict(feats))
    truth = clf.names(labels) if has_label else None
    join = (lambda v: ";".join(v)) if clf.label_kind == "multilabel" else (lambda v: v)
    columns = (["text"] + (["label"] if has_label else []) + ["pred"] +
               [f"prob_{lab}" for lab in clf.labels] + neuron_cols)
    write_csv(path, columns, (
        [text] + ([join(truth[i])] if has_label else []) + [join(said[i])] +
        [f"{p:.6f}" for p in proba[i]] + [f"{feats[i, n]:.6f}" for n in neurons]
        for i, text in enumerate(texts)))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, on a head node or a worker
    # labels are the data's: "$" (a price class) would start TeX math and fail the plot
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt

    return plt


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _cell(v):
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return ";".join(str(x) for x in v)
    return v


def parse_cell(v: str):
    """A CSV cell as the number (or bool) it holds, else the string: rows read back from a
    history, and CSV labels that must concatenate with JSON / Parquet labels."""
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(v, v)
