"""The classifier that transfer and fine-tuning write and serving and scoring load: plain JSON,
numpy maths. It owns its labels, and it alone turns features into scores and scores into
labels (as sklearn's estimators own ``classes_``): every job and endpoint asks it.

Three kinds, one logistic model each over a checkpoint's features x [N, H]:

    binary      p = sigmoid(x . w + b): P(labels[1]) (labels[0] is the other); label p > 0.5
    multiclass  p = softmax(x W^T + b) over labels [K]; label argmax p
    multilabel  p_k = sigmoid(x . w_k + b_k), independent; labels with p_k > 0.5

``classifier.json`` holds the all-neuron model (``coef``: [H] for binary, [K, H] otherwise;
``intercept``; ``C``), the top neurons (``neurons``, ``signs``, and for multi-class and
multi-label ``neuron_labels``: which label each was picked for), an optional model on the top
neurons only (``top``), and what is needed to featurize the same way (``feature_kind``,
``layer``, ``rnn_size``, ``checkpoint``; ``"."`` means the checkpoint folder the file sits in,
as in a fine-tuned checkpoint, and stays ``"."`` when the file is saved there again), and
optionally ``feature_scale`` ([H]: the train features' per-neuron spread when the fit saw
standardized features; absent: 1), by which the neurons were ranked: |weight x scale| is the
|weight| the fit compared, so ``top_neuron_of`` names the neuron the fit put first. No sklearn
object and no pickle is stored, so loading a classifier someone sent you runs no code. Version
1 files (binary, before label kinds) load as binary classifiers of negative/positive.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sentdisc import storage
from sentdisc.errors import InputError

FORMAT, VERSION = "sentdisc-classifier", 2
KINDS = ("binary", "multiclass", "multilabel")
SENTIMENT = ("negative", "positive")  # a binary classifier's labels unless it names others
FEATURE_KINDS = ("cell", "hidden", "mean", "max")  # sentdisc.features.KINDS (no torch import)
HERE = "."       # ``checkpoint``: the folder classifier.json sits in


class ClassifierError(InputError):
    """A classifier.json that is missing, malformed, or features of the wrong shape."""


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # Split by sign so exp never overflows for large |z|.
    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class Classifier:
    coef: np.ndarray                 # binary [H]; multiclass / multilabel [K, H]
    intercept: float | np.ndarray    # binary a number; otherwise [K]
    C: float | None = None           # its L1 strength (None: a fine-tuned head)
    neurons: list[int] = field(default_factory=list)   # top neurons, strongest first
    signs: list[int] = field(default_factory=list)     # +1 / -1: each one's weight's sign
    top_coef: np.ndarray | None = None   # the top-neuron model (None: there is none)
    top_intercept: float | np.ndarray | None = None
    top_C: float | None = None
    feature_kind: str = "cell"
    layer: int = -1
    rnn_size: int = 0
    checkpoint: str = ""
    meta: dict = field(default_factory=dict)  # dataset, accuracies: informative only
    label_kind: str = "binary"
    labels: list[str] = field(default_factory=lambda: list(SENTIMENT))
    neuron_labels: list[str] = field(default_factory=list)  # the label each top neuron serves
    # the train features' per-neuron std when the fit was standardized (None: raw features);
    # the fit ranked neurons by |coef * feature_scale|
    feature_scale: np.ndarray | None = None
    # ``load`` of a file whose checkpoint is "." : the folder that meant (``save`` back into
    # it writes "." again)
    here: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self):
        # Copies throughout: a caller's array or list changed later changes no classifier.
        binary = self.label_kind == "binary"
        self.coef = np.array(self.coef, dtype=np.float64)
        self.coef = self.coef.reshape(-1) if binary else np.atleast_2d(self.coef)
        self.intercept = float(np.asarray(self.intercept).reshape(-1)[0]) if binary else \
            np.array(self.intercept, dtype=np.float64).reshape(-1)
        if self.top_coef is not None:
            top = np.array(self.top_coef, dtype=np.float64)
            self.top_coef = top.reshape(-1) if binary else np.atleast_2d(top)
            self.top_intercept = float(np.asarray(self.top_intercept).reshape(-1)[0]) \
                if binary else np.array(self.top_intercept, dtype=np.float64).reshape(-1)
        if self.feature_scale is not None:
            self.feature_scale = np.array(self.feature_scale, dtype=np.float64).reshape(-1)
        self.neurons = [int(n) for n in self.neurons]
        self.signs = [int(s) for s in self.signs]
        self.labels = [str(v) for v in self.labels]
        self.neuron_labels = [str(v) for v in self.neuron_labels]
        self.meta = copy.deepcopy(dict(self.meta))
        if not self.rnn_size:
            self.rnn_size = int(self.coef.shape[-1])

    # -- the top neuron -------------------------------------------------------------------------
    @property
    def neuron(self) -> int:
        """The top neuron (binary: the sentiment neuron); heatmaps show it by default."""
        return self.neurons[0]

    @property
    def sign(self) -> int:
        return self.signs[0]

    @property
    def has_top(self) -> bool:
        return self.top_coef is not None

    def neuron_boundary(self) -> float | None:
        """The top neuron's raw value where the top-neuron model flips class: binary, with a
        one-neuron top model and a nonzero weight (the histogram's line); None otherwise."""
        if self.label_kind != "binary" or not self.has_top or self.top_coef.size != 1 \
                or self.top_coef[0] == 0:
            return None
        return -self.top_intercept / float(self.top_coef[0])

    def neurons_of(self, label: str) -> list[tuple[int, int]]:
        """(neuron, sign) of the top neurons picked for ``label`` (binary: all of them)."""
        if self.label_kind == "binary" or not self.neuron_labels:
            return list(zip(self.neurons, self.signs, strict=True))
        return [(n, s) for n, s, lab in zip(self.neurons, self.signs, self.neuron_labels,
                                            strict=True) if lab == label]

    def top_neuron_of(self, label: str) -> tuple[int, int]:
        """(neuron, sign) that stands for ``label`` of a multi-class or multi-label classifier:
        the one the fit ranked first for it (``rank_neurons``: largest |weight| on the features
        the fit saw, |coef x feature_scale|), even where the top-neuron list gave that neuron to
        another label first (the sign is this label's weight: one neuron can mean one label,
        not another). A file without ``feature_scale`` whose top neurons the raw weights do not
        reproduce was ranked on other features: its first listed neuron for ``label``."""
        if self.label_kind == "binary":
            raise ClassifierError(f"label {label!r}: a binary classifier has no per-label "
                                  f"neuron (its sentiment neuron, {self.neuron}, serves both "
                                  f"{self.labels[0]!r} and {self.labels[1]!r})")
        if label not in self.labels:
            raise ClassifierError(f"label {label!r} is not one of the classifier's labels "
                                  f"({', '.join(self.labels)})")
        k = self.labels.index(label)
        row = self.coef[k]
        if self.feature_scale is None and self.neuron_labels and \
                not self._raw_ranking_matches():
            listed = self.neurons_of(label)
            if listed:
                return listed[0]
        ranked = np.abs(row) if self.feature_scale is None else np.abs(row * self.feature_scale)
        n = int(np.argsort(-ranked, kind="stable")[0])  # rank_neurons' tie rule
        return n, 1 if row[n] >= 0 else -1

    def _raw_ranking_matches(self) -> bool:
        """The raw weights rank the neurons as the file lists them (a fit on raw features)."""
        k = max(sum(1 for lab in self.neuron_labels if lab == v) for v in self.labels)
        got = rank_neurons(self.coef, min(k, self.coef.shape[-1]), self.labels)
        n = len(self.neurons)
        return (got[0][:n], got[1][:n], got[2][:n]) == (self.neurons, self.signs,
                                                      self.neuron_labels)

    # -- scores and labels: the one place they are computed -----------------------------------
    def _check(self, features) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.rnn_size:
            raise ClassifierError(f"features must be [N, {self.rnn_size}] ({self.feature_kind} "
                                  f"features of layer {self.layer}), got shape {list(x.shape)}")
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():  # NaN scores would turn into the first label, silently
            raise ValueError(f"the features of {int(bad.sum())} of {len(x)} text(s) are not "
                             f"finite (rows {np.flatnonzero(bad)[:5].tolist()}...): the model "
                             "that made them has diverged or overflowed")
        return x

    def _proba(self, z: np.ndarray) -> np.ndarray:
        return _softmax(z) if self.label_kind == "multiclass" else _sigmoid(z)

    def decision_function(self, features) -> np.ndarray:
        """Logits: [N] for binary, [N, K] otherwise."""
        return self._check(features) @ self.coef.T + self.intercept

    def predict_proba(self, features) -> np.ndarray:
        """From all neurons: binary P(labels[1]) [N]; multiclass [N, K] (rows sum to 1);
        multilabel [N, K] (each label on its own)."""
        return self._proba(self.decision_function(features))

    def predict_proba_top(self, features) -> np.ndarray:
        """As ``predict_proba``, from the top-neuron model (features are still the full
        [N, H])."""
        if not self.has_top:
            raise ClassifierError("this classifier has no top-neuron model (a fine-tuned head)")
        x = self._check(features)[:, self.neurons]
        return self._proba(x @ self.top_coef.T + self.top_intercept)

    def label_proba(self, features, top: bool = False) -> np.ndarray:
        """[N, len(labels)]: each label's probability, columns in ``labels`` order (binary:
        1 - p and p)."""
        p = self.predict_proba_top(features) if top else self.predict_proba(features)
        return np.stack([1.0 - p, p], axis=1) if self.label_kind == "binary" else p

    def predict(self, features) -> np.ndarray:
        """Label indices [N] (binary: 0/1), or a 0/1 indicator [N, K] for multilabel. Decided
        on the logits (p > 0.5 is z > 0, without the rounding of p near 0.5)."""
        z = self.decision_function(features)
        if self.label_kind == "multiclass":
            return np.argmax(z, axis=1).astype(np.int64)
        return (z > 0).astype(np.int64)

    def names(self, predicted: np.ndarray) -> list:
        """``predict``'s output -> label names: one per text, or a list per text
        (multilabel)."""
        if self.label_kind == "multilabel":
            return [[self.labels[k] for k in np.flatnonzero(row)] for row in predicted]
        return [self.labels[int(i)] for i in predicted]

    def predict_labels(self, features) -> list:
        """A label name per text (binary, multiclass), or the list of labels over 0.5
        (multilabel)."""
        return self.names(self.predict(features))

    # -- JSON I/O -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The JSON object, sharing nothing with this classifier (changing it changes nothing
        here)."""
        top = None
        if self.has_top:
            top = {"neurons": list(self.neurons), "coef": np.asarray(self.top_coef).tolist(),
                   "intercept": _plain(self.top_intercept), "C": _plain(self.top_C)}
        d = {
            "format": FORMAT, "version": VERSION,
            "label_kind": self.label_kind, "labels": list(self.labels),
            "coef": self.coef.tolist(), "intercept": _plain(self.intercept), "C": _plain(self.C),
            "neurons": list(self.neurons), "signs": list(self.signs),
            "neuron_labels": list(self.neuron_labels),
            "top": top, "feature_kind": self.feature_kind, "layer": int(self.layer),
            "rnn_size": int(self.rnn_size), "checkpoint": self.checkpoint,
            "meta": copy.deepcopy(self.meta),
        }
        if self.feature_scale is not None:
            d["feature_scale"] = self.feature_scale.tolist()
        return d

    def save(self, path: str | os.PathLike) -> Path | str:
        """Write classifier.json to a local path or URI, atomically (a server reading it never
        sees half a file). A classifier loaded from a file saying ``"checkpoint": "."`` and
        saved into that same folder says "." again."""
        d = self.to_dict()
        if self.here and self.checkpoint == self.here and _same_location(_folder_of(str(path)),
                                                                         self.here):
            d["checkpoint"] = HERE
        storage.write_json(str(path), d, indent=1)
        return path if storage.is_uri(path) else Path(path)

    @classmethod
    def from_dict(cls, d: dict, source: str = "classifier") -> Classifier:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ClassifierError(f"{source}: not a sentdisc classifier (expected \"format\": "
                                  f"\"{FORMAT}\")")
        return _parse(d, source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Classifier:
        """classifier.json from a local path or URI (or the folder holding it: a transfer
        run's folder, or a fine-tuned checkpoint)."""
        p = str(path)
        if storage.is_dir(p):
            p = storage.join(p, "classifier.json")
        clf = cls.from_dict(storage.read_json(p, error=ClassifierError, what="classifier file"), p)
        if clf.checkpoint == HERE:  # a fine-tuned checkpoint's own head
            clf.checkpoint = clf.here = storage.absolute(_folder_of(p))
        return clf


def _folder_of(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0] if "/" in path else "."


def _same_location(a: str, b: str) -> bool:
    if storage.is_uri(a) or storage.is_uri(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(storage.absolute(a)) == os.path.realpath(storage.absolute(b))


def _plain(v):
    if v is None:
        return None
    a = np.asarray(v, dtype=np.float64)
    return float(a) if a.ndim == 0 else a.tolist()


def _parse(d: dict, source: str) -> Classifier:
    def get(obj, key, where=""):
        if key not in obj:
            raise ClassifierError(f"{source}: missing field {where}{key!r}")
        return obj[key]

    try:
        kind = str(d.get("label_kind", "binary"))  # version 1: binary
        version = int(d.get("version", 1))
    except (TypeError, ValueError) as e:
        raise ClassifierError(f"{source}: bad value: {e}") from None
    if kind not in KINDS:
        raise ClassifierError(f"{source}: label_kind must be one of {KINDS}, got {kind!r}")
    labels = d.get("labels", None if kind != "binary" else list(SENTIMENT))
    if not isinstance(labels, list) or not labels:
        raise ClassifierError(f"{source}: 'labels' must be a non-empty list of the "
                              f"{kind} classifier's labels")
    labels = [str(v) for v in labels]
    top = d.get("top")
    if top is not None and not isinstance(top, dict):
        raise ClassifierError(f"{source}: field 'top' must be an object or null")
    if version < 2 and top is None:
        top = get(d, "top")  # version 1 always had one
    if not isinstance(d.get("meta") or {}, dict):
        raise ClassifierError(f"{source}: field 'meta' must be an object")
    feature_kind = d.get("feature_kind", "cell")
    if feature_kind not in FEATURE_KINDS:
        raise ClassifierError(f"{source}: field 'feature_kind' must be one of "
                              f"{', '.join(FEATURE_KINDS)}, got {feature_kind!r}")
    checkpoint = d.get("checkpoint", "")
    if not isinstance(checkpoint, str):
        raise ClassifierError(f"{source}: field 'checkpoint' must be a string (a checkpoint "
                              f"folder or URI, \".\" for the file's own folder, \"\" if "
                              f"unknown), got {checkpoint!r}")
    layer = d.get("layer", -1)
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ClassifierError(f"{source}: field 'layer' must be an integer (-1: the last "
                              f"layer), got {layer!r}")
    signs = d.get("signs")
    if isinstance(signs, list) and any(isinstance(s, bool) or s not in (1, -1) for s in signs):
        raise ClassifierError(f"{source}: field 'signs' must hold +1 or -1 per top neuron, "
                              f"got {signs}")
    K = 1 if kind == "binary" else len(labels)
    try:
        coef = np.asarray(get(d, "coef"), dtype=np.float64)
        intercept = np.asarray(get(d, "intercept"), dtype=np.float64)
        neurons = [int(n) for n in get(d, "neurons")]
        signs = [int(s) for s in get(d, "signs")]
        C = None if d.get("C") is None else float(d["C"])
        H = int(d.get("rnn_size") or (coef.shape[-1] if coef.ndim else 0))
        top_values = {}
        if top is not None:
            top_values = dict(top_coef=np.asarray(get(top, "coef", "top."), dtype=np.float64),
                              top_intercept=np.asarray(get(top, "intercept", "top."),
                                                       dtype=np.float64),
                              top_C=None if top.get("C") is None else float(top["C"]))
        rnn_size = H
        scale = d.get("feature_scale")
        scale = None if scale is None else np.asarray(scale, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ClassifierError(f"{source}: bad value: {e}") from None
    want = [H] if kind == "binary" else [K, H]
    if list(coef.shape) != want or intercept.size != K:
        raise ClassifierError(f"{source}: a {kind} classifier of {len(labels)} labels over "
                              f"rnn_size={H} features has 'coef' of shape {want} and {K} "
                              f"intercept(s), got {list(coef.shape)} and {intercept.size}")
    if kind == "binary" and len(labels) != 2 or kind == "multiclass" and len(labels) < 2 \
            or len(set(labels)) != len(labels):
        raise ClassifierError(f"{source}: {kind} labels must be distinct (binary: 2, "
                              f"multiclass: 2 or more), got {labels}")
    if not neurons or len(signs) != len(neurons):
        raise ClassifierError(f"{source}: 'neurons' and 'signs' must be non-empty and of equal "
                              f"length, got {len(neurons)}, {len(signs)}")
    if top_values:
        shape = [len(neurons)] if kind == "binary" else [K, len(neurons)]
        if list(top_values["top_coef"].shape) != shape or top_values["top_intercept"].size != K:
            raise ClassifierError(
                f"{source}: 'top.coef' must be of shape {shape} (one weight per top neuron"
                f"{'' if kind == 'binary' else ' and label'}) with {K} intercept(s), got "
                f"{list(top_values['top_coef'].shape)} and {top_values['top_intercept'].size}")
    if scale is not None and (list(scale.shape) != [H] or not np.isfinite(scale).all()
                              or (scale <= 0).any()):
        raise ClassifierError(f"{source}: field 'feature_scale' must hold {H} positive numbers "
                              f"(each neuron's train std), got shape {list(scale.shape)}")
    bad = [n for n in neurons if not 0 <= n < H]
    if bad:
        raise ClassifierError(f"{source}: neuron indices {bad} out of range [0, {H})")
    numbers = [coef, intercept, *(v for v in top_values.values() if isinstance(v, np.ndarray))]
    scalars = [v for v in (C, top_values.get("top_C")) if v is not None]
    if not all(np.isfinite(a).all() for a in numbers) or not all(map(math.isfinite, scalars)):
        raise ClassifierError(f"{source}: non-finite weights")
    neuron_labels = [str(v) for v in d.get("neuron_labels") or []]
    if neuron_labels and (len(neuron_labels) != len(neurons) or set(neuron_labels) - set(labels)):
        raise ClassifierError(f"{source}: 'neuron_labels' must name one of the labels for each "
                              f"top neuron")
    return Classifier(coef=coef, intercept=intercept, C=C, neurons=neurons, signs=signs,
                      feature_kind=feature_kind, layer=layer, rnn_size=rnn_size,
                      checkpoint=checkpoint, meta=dict(d.get("meta") or {}), label_kind=kind,
                      labels=labels, neuron_labels=neuron_labels, feature_scale=scale,
                      **top_values)


def rank_neurons(coef: np.ndarray, k: int, labels=None) -> tuple[list[int], list[int], list[str]]:
    """The top ``k`` neurons by |weight| (binary [H]), or for each label its own top ``k``
    (coef [K, H]), interleaved by rank and without repeats: (neurons, signs, the label each
    serves; [] for binary)."""
    coef = np.asarray(coef, dtype=np.float64)
    if coef.ndim == 1:
        order = np.argsort(-np.abs(coef), kind="stable")[:k]
        return [int(n) for n in order], [1 if coef[n] >= 0 else -1 for n in order], []
    ranked = [np.argsort(-np.abs(row), kind="stable")[:k] for row in coef]
    neurons, signs, serves = [], [], []
    for r in range(min(k, coef.shape[1])):
        for lab, order in enumerate(ranked):
            n = int(order[r])
            if n not in neurons:
                neurons.append(n)
                signs.append(1 if coef[lab, n] >= 0 else -1)
                serves.append(str(labels[lab]) if labels is not None else str(lab))
    return neurons, signs, serves


def fit_result_to_classifier(coef, intercept, C, neurons, top_coef, top_intercept, top_C,
                             feature_kind="cell", layer=-1, checkpoint="", *,
                             label_kind="binary", labels=SENTIMENT,
                             neuron_labels=(), feature_scale=None) -> Classifier:
    """A Classifier from fitted weights; each top neuron's sign is its weight's (for the label
    it serves). ``feature_scale``: the per-neuron std the fit divided the features by (the
    neurons were ranked on ``coef * feature_scale``), None for raw features."""
    coef = np.asarray(coef, dtype=np.float64)
    neurons = [int(n) for n in neurons]
    if label_kind == "binary":
        coef = coef.reshape(-1)
        signs = [1 if coef[n] >= 0 else -1 for n in neurons]
    else:
        row = {str(v): i for i, v in enumerate(labels)}
        signs = [1 if coef[row[lab], n] >= 0 else -1 for n, lab in zip(
            neurons, neuron_labels, strict=True)]
    return Classifier(coef=coef, intercept=intercept, C=C, neurons=neurons, signs=signs,
                      top_coef=top_coef, top_intercept=top_intercept, top_C=top_C,
                      feature_kind=feature_kind, layer=layer, rnn_size=coef.shape[-1],
                      checkpoint=str(checkpoint), label_kind=label_kind, labels=list(labels),
                      neuron_labels=list(neuron_labels), feature_scale=feature_scale)
