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
    """Training bits per byte against bytes seen (val/test as horizontal marks when present)."""
    plt = _pyplot()
    train = [r for r in rows if _finite(r.get("bpb")) and r.get("bytes_seen") is not None]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    x = [r["bytes_seen"] / 1e6 for r in train]
    ax.plot(x, [r["bpb"] for r in train], lw=1.5, label="train")
    for name, style in (("val_bpb", "--"), ("test_bpb", ":")):
        vals = [r[name] for r in rows if _finite(r.get(name))]
        if vals:
            ax.axhline(vals[-1], ls=style, color="k" if name == "val_bpb" else "grey",
                       label=f"{name.split('_')[0]} {vals[-1]:.3f}")
    ax.set_xlabel("training bytes seen (MB, all workers)")
    ax.set_ylabel("bits per byte")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def progress_line(row: dict) -> str:
    """One line per report: iteration, loss, bits per byte, lr, throughput, ETA, skips."""
    total = row.get("total_iters") or 0
    it = row.get("iteration", 0)
    where = f"iter {it}/{total} ({100 * it / total:.0f}%)" if total else f"iter {it}"
    parts = [f"epoch {row.get('epoch', 0)}", where]
    if _finite(row.get("loss")):
        parts.append(f"loss {row['loss']:.3f} ({row['bpb']:.3f} bpb)")
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
    """The report of NVIDIA's transfer.py, from ``sentdisc.sweep.train_classifier``'s results."""
    a, t = results["all_neurons"], results["top_neurons"]
    k = len(t["neurons"])
    lines = [f"all neuron regression took {a['seconds']} seconds",
             f"{_pct(a['train_acc'])}, {_pct(a['val_acc'])}, {_pct(a['test_acc'])} "
             f"train, val, test accuracy for all neuron regression",
             f"{a['C']:g} regularization coefficient used",
             f"{a['nnz']} features used in all neuron regression", "",
             f"using neuron(s) {', '.join(str(n) for n in t['neurons'])} as features for "
             f"regression"]
    for n, w in zip(t["neurons"], t["weights"], strict=True):
        lines.append(f"  neuron {n}: weight {w:+.4f} "
                     f"({'positive' if w >= 0 else 'negative'} sentiment)")
    lines += [f"{k} neuron regression took {t['seconds']} seconds",
              f"{_pct(t['train_acc'])}, {_pct(t['val_acc'])}, {_pct(t['test_acc'])} "
              f"train, val, test accuracy for {k} neuron regression",
              f"{t['C']:g} regularization coefficient used"]
    for name, r in (("all neuron", a), (f"{k} neuron", t)):
        if not r["converged"]:
            lines.append(f"note: the {name} regression stopped at max_iter before converging "
                         f"(raise --max_iter, or try --solver saga)")
    return "\n".join(lines)


def write_tune_csv(path: str | Path, rows: Sequence[dict], chosen_C: float) -> None:
    cols = ["C", "val_acc", "train_acc", "nnz", "converged", "fit_s", "trial_id", "chosen"]
    write_csv(path, cols, [{**r, "chosen": int(r["C"] == chosen_C)} for r in rows])


def plot_neuron_weights(path: str | Path, coef: np.ndarray, neurons: Sequence[int], C: float) -> None:
    plt = _pyplot()
    coef = np.asarray(coef).reshape(-1)
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.vlines(np.arange(len(coef)), 0, coef, color="0.6", linewidth=0.8)
    ax.axhline(0, color="0.3", linewidth=0.5)
    for n in neurons:
        ax.plot([n], [coef[n]], "o", color="crimson" if coef[n] >= 0 else "navy")
        ax.annotate(f"{n}", (n, coef[n]), textcoords="offset points", xytext=(4, 4 if
                    coef[n] >= 0 else -12), fontsize=8)
    ax.set_xlabel("neuron (feature) index")
    ax.set_ylabel("L1 logistic regression weight")
    ax.set_title(f"Neuron weights (C={C:g}, {int(np.sum(coef != 0))} non-zero); "
                 f"top {len(neurons)} highlighted")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def plot_neuron_histogram(path: str | Path, values: np.ndarray, labels: np.ndarray, neuron: int,
                          boundary: float | None, split: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.histogram_bin_edges(values, bins=30)
    ax.hist(values[labels == 0], bins=bins, alpha=0.55, color="navy", label="negative")
    ax.hist(values[labels == 1], bins=bins, alpha=0.55, color="crimson", label="positive")
    if boundary is not None and np.isfinite(boundary):
        ax.axvline(boundary, color="black", linestyle="--",
                   label=f"decision boundary {boundary:.3g}")
    ax.set_xlabel(f"neuron {neuron} value")
    ax.set_ylabel("texts per bin")
    ax.set_title(f"Neuron {neuron} on {split}, by label")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def write_results_csv(path: str | Path, texts, labels, feats: np.ndarray, clf,
                      neurons: Sequence[int]) -> None:
    """Per sample: P(positive) with all neurons (``clf``, a ``sentdisc.classifier.Classifier``),
    with its top neurons, and the values of ``neurons``."""
    p_all, p_top = clf.predict_proba(feats), clf.predict_proba_top(feats)
    columns = (["text"] + (["label"] if labels is not None else []) +
               ["prob_all", f"prob_top{len(clf.neurons)}"] + [f"neuron_{n}" for n in neurons])
    write_csv(path, columns, (
        [text] + ([int(labels[i])] if labels is not None else []) +
        [f"{p_all[i]:.6f}", f"{p_top[i]:.6f}"] + [f"{feats[i, n]:.6f}" for n in neurons]
        for i, text in enumerate(texts)))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, on a head node or a worker
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
