"""Run outputs a person reads: the metrics history as CSV, the loss curve as a PNG, progress lines.

Pure functions of the reported rows (dicts), so the driver of any job can reuse them.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Iterable, Optional


def merge_rows(rows: list[dict], new: Iterable[dict], key: str = "iteration") -> list[dict]:
    """Append ``new`` rows; a row whose ``key`` does not advance replaces the rows it repeats.

    After a restart from a checkpoint the run reports iterations it had already reported before
    it died; the rows of the attempt that died after that checkpoint are dropped.
    """
    out = list(rows)
    for row in new:
        it = row.get(key)
        if it is not None:
            while out and out[-1].get(key) is not None and out[-1][key] >= it and not row.get("final"):
                out.pop()
        out.append(row)
    return out


def write_history(rows: list[dict], path: str | Path) -> Path:
    """Rows -> CSV with the union of their columns (first-seen order); missing cells empty."""
    path = Path(path)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})
    tmp.replace(path)
    return path


def read_history(path: str | Path) -> list[dict]:
    """CSV written by write_history -> rows with numbers parsed back."""
    with Path(path).open(newline="") as f:
        return [{k: _parse(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def plot_loss(rows: list[dict], path: str | Path, title: str = "pretraining") -> Optional[Path]:
    """Training bits per byte against bytes seen (val/test as horizontal marks when present)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


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


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _cell(v):
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return ";".join(str(x) for x in v)
    return v


def _parse(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(v, v)
