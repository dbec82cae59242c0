"""How well a classifier does on a labeled set: the one set of numbers transfer, fine-tuning and
the benchmarks report, for every label kind.

``classification_metrics`` takes the true labels and what the classifier said (its decisions
and its per-label probabilities, ``Classifier.predict`` and ``Classifier.label_proba``): it never
turns a score into a label itself. For every kind: ``accuracy`` (multi-label: every label of a
text right), ``macro_f1``, ``balanced_accuracy`` (multi-label: the mean over labels), and per
label precision, recall, F1, ROC AUC (one label against the rest; None where a split lacks
either side) and support; for binary and multi-class also the confusion matrix (rows: true,
columns: predicted, in label order).
"""
from __future__ import annotations

import warnings

import numpy as np

SELECTION = {"binary": "accuracy", "multiclass": "macro_f1", "multilabel": "macro_f1"}


def indicator(kind: str, y: np.ndarray, n_labels: int) -> np.ndarray:
    """Labels as a 0/1 matrix [N, K]: one-hot for binary and multi-class."""
    if kind == "multilabel":
        return np.asarray(y, dtype=np.int64)
    return np.eye(n_labels, dtype=np.int64)[np.asarray(y, dtype=np.int64)]


def classification_metrics(kind: str, labels, y: np.ndarray, predicted: np.ndarray,
                           proba: np.ndarray) -> dict:
    """Metrics of one split. ``y`` and ``predicted``: indices [N] (binary, multiclass) or 0/1
    [N, K] (multilabel); ``proba``: [N, len(labels)]."""
    from sklearn.metrics import (
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    labels = [str(v) for v in labels]
    K = len(labels)
    y, predicted = np.asarray(y), np.asarray(predicted)
    truth, said = indicator(kind, y, K), indicator(kind, predicted, K)
    with warnings.catch_warnings():  # a label never predicted has precision 0, said below
        warnings.simplefilter("ignore")
        precision, recall, f1, support = precision_recall_fscore_support(
            truth, said, average=None, labels=list(range(K)), zero_division=0)
        macro_f1 = f1_score(truth, said, average="macro", zero_division=0)
    per_label = {}
    for k, name in enumerate(labels):
        column = truth[:, k]
        auc = None
        if 0 < column.sum() < len(column):
            auc = float(roc_auc_score(column, proba[:, k]))
        per_label[name] = {"precision": float(precision[k]), "recall": float(recall[k]),
                           "f1": float(f1[k]), "roc_auc": auc, "support": int(support[k])}
    out = {"n": int(len(y)), "macro_f1": float(macro_f1), "per_label": per_label}
    if kind == "multilabel":
        out["accuracy"] = float((truth == said).all(axis=1).mean())
        out["label_accuracy"] = float((truth == said).mean())
        each = [balanced_accuracy_score(truth[:, k], said[:, k]) for k in range(K)
                if 0 < truth[:, k].sum() < len(truth)]
        out["balanced_accuracy"] = float(np.mean(each)) if each else None
    else:
        out["accuracy"] = float((y == predicted).mean())
        with warnings.catch_warnings():  # a class absent from a split: sklearn warns
            warnings.simplefilter("ignore")
            out["balanced_accuracy"] = float(balanced_accuracy_score(y, predicted))
        out["confusion"] = confusion_matrix(y, predicted, labels=list(range(K))).tolist()
    return out


def selection_score(kind: str, metrics: dict) -> float:
    """What a sweep or early stopping maximizes: accuracy for binary, macro-F1 otherwise."""
    return metrics[SELECTION[kind]]
