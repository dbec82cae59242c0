"""The extreme samples: for each top neuron, the texts that drive it highest and lowest.

The original tool's "samples from the tails of the feature distribution": the neuron's pooled
feature (the one the classifier reads) is ranked over a labeled split, and the ``n`` texts at
each end are listed with their values and true labels (``extreme_samples``, which transfer
writes into results.json), then drawn as a page of per-character heatmaps of that neuron
(``write_page``). A neuron is shown so that green is evidence for the label it serves (its sign
from the classifier, as every heatmap here: ``sentdisc.probe``).
"""
from __future__ import annotations

import html

import numpy as np

from sentdisc import storage
from sentdisc.viz import MAX_CHARS

DEFAULT_N = 5


def extreme_samples(clf, feats: np.ndarray, texts: list, y: np.ndarray | None,
                    n: int = DEFAULT_N, split: str = "test",
                    rows: np.ndarray | None = None) -> list[dict]:
    """Per top neuron of ``clf`` (per label for the multi kinds): the ``n`` texts of ``feats``
    with the highest and the lowest values, each with its row in its file (``rows``, 1-based;
    else its place in the split), its value, its text and its true label(s) (None for an
    unlabeled split)."""
    out = []
    serves = clf.neuron_labels or [clf.labels[-1]] * len(clf.neurons)
    for neuron, sign, label in zip(clf.neurons, clf.signs, serves, strict=True):
        values = feats[:, neuron]
        order = np.argsort(values, kind="stable")
        k = min(n, len(values))
        out.append({"neuron": int(neuron), "sign": int(sign), "label": label, "split": split,
                    "highest": [_sample(i, values, texts, y, clf, rows) for i in order[::-1][:k]],
                    "lowest": [_sample(i, values, texts, y, clf, rows) for i in order[:k]]})
    return out


def _sample(i: int, values, texts, y, clf, rows) -> dict:
    truth = None
    if y is not None:
        truth = clf.names(y[i:i + 1])[0]
    row = int(rows[i]) if rows is not None else int(i) + 1
    return {"row": row, "value": float(values[i]), "text": texts[i], "label": truth}


def write_page(path: str, model, samples: list[dict], layer: int, trace_kind: str,
               title: str = "extreme samples") -> str:
    """An HTML page: for each neuron, its highest and lowest texts, each drawn as a heatmap of
    that neuron (the state ``trace_kind``, 'cell' or 'hidden', after each character)."""
    from sentdisc.viz import neuron_values, render_html

    parts = [f"<h1>{html.escape(title)}</h1>",
             "<p>For each top neuron, the texts whose feature value is highest and lowest. "
             "Each character is coloured by the neuron's value after it; the neuron is shown "
             "sign-flipped where its weight is negative, so green is evidence for the label it "
             "serves.</p>"]
    for entry in samples:
        neuron, negate = entry["neuron"], entry["sign"] < 0
        parts.append(f"<h2>neuron {neuron} (label {html.escape(str(entry['label']))}, weight "
                     f"{'negative: shown negated' if negate else 'positive'})</h2>")
        for end in ("highest", "lowest"):
            parts.append(f"<h3>{end} values on {html.escape(entry['split'])}</h3>")
            for s in entry[end]:
                text = s["text"][:MAX_CHARS]
                chars, values = neuron_values(model, text, neuron, layer=layer, kind=trace_kind,
                                              negate=negate)
                caption = (f"row {s['row']}: feature {s['value']:.4g}"
                           + (f", true label {s['label']}" if s["label"] is not None else ""))
                parts.append(render_html(chars, values, title=caption,
                                         label=f"neuron {neuron} ({trace_kind})",
                                         full_page=False))
    page = ('<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>'
            + html.escape(title) + "</title></head><body style=\"font-family:sans-serif;"
            "max-width:1100px\">" + "\n".join(parts) + "</body></html>\n")
    storage.write_text(str(path), page)
    return path
