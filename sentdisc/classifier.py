"""The sentiment classifier that transfer writes and serving loads: plain JSON, numpy maths.

``classifier.json`` holds two logistic regressions over a checkpoint's features:
the one on all neurons (``coef``, ``intercept``, ``C``) and the one on the top neurons only
(``top.coef`` over ``neurons``, ``top.intercept``, ``top.C``), plus what is needed to featurize
the same way (``feature_kind``, ``layer``, ``rnn_size``, ``checkpoint``). No sklearn object and
no pickle is stored, so loading a classifier someone sent you runs no code.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sentdisc import storage
from sentdisc.errors import InputError

FORMAT, VERSION = "sentdisc-classifier", 1


class ClassifierError(InputError):
    """A classifier.json that is missing, malformed, or features of the wrong shape."""


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # Split by sign so exp never overflows for large |z|.
    out = np.empty_like(z, dtype=np.float64)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


@dataclass
class Classifier:
    coef: np.ndarray                 # [rnn_size] weights of the all-neuron regression
    intercept: float
    C: float                         # its L1 regularisation (chosen on validation)
    neurons: list[int]               # top neurons, ordered by |coef| (largest first)
    signs: list[int]                 # +1 / -1: sign of each top neuron's weight in ``coef``
    top_coef: np.ndarray             # [len(neurons)] weights of the top-neuron regression
    top_intercept: float
    top_C: float
    feature_kind: str = "cell"
    layer: int = -1
    rnn_size: int = 0
    checkpoint: str = ""
    meta: dict = field(default_factory=dict)  # dataset, accuracies: informative only

    def __post_init__(self):
        self.coef = np.asarray(self.coef, dtype=np.float64).reshape(-1)
        self.top_coef = np.asarray(self.top_coef, dtype=np.float64).reshape(-1)
        self.neurons = [int(n) for n in self.neurons]
        self.signs = [int(s) for s in self.signs]
        if not self.rnn_size:
            self.rnn_size = len(self.coef)

    # -- the top ("sentiment") neuron --------------------------------------------------------
    @property
    def neuron(self) -> int:
        return self.neurons[0]

    @property
    def sign(self) -> int:
        return self.signs[0]

    # -- prediction --------------------------------------------------------------------------
    def _check(self, features) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.rnn_size:
            raise ClassifierError(f"features must be [N, {self.rnn_size}] ({self.feature_kind} "
                                  f"features of layer {self.layer}), got shape {list(x.shape)}")
        return x

    def decision_function(self, features) -> np.ndarray:
        return self._check(features) @ self.coef + self.intercept

    def predict_proba(self, features) -> np.ndarray:
        """P(positive) [N] from all neurons."""
        return _sigmoid(self.decision_function(features))

    def predict(self, features) -> np.ndarray:
        """0/1 labels [N] from all neurons."""
        return (self.decision_function(features) > 0).astype(np.int64)

    def predict_proba_top(self, features) -> np.ndarray:
        """P(positive) [N] from the top neurons only (features are still the full [N, H])."""
        x = self._check(features)[:, self.neurons]
        return _sigmoid(x @ self.top_coef + self.top_intercept)

    # -- JSON I/O ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION,
            "coef": [float(v) for v in self.coef], "intercept": float(self.intercept),
            "C": float(self.C),
            "neurons": self.neurons, "signs": self.signs,
            "top": {"neurons": self.neurons, "coef": [float(v) for v in self.top_coef],
                    "intercept": float(self.top_intercept), "C": float(self.top_C)},
            "feature_kind": self.feature_kind, "layer": int(self.layer),
            "rnn_size": int(self.rnn_size), "checkpoint": self.checkpoint, "meta": self.meta,
        }

    def save(self, path: str | os.PathLike) -> Path | str:
        """Write classifier.json to a local path or URI, atomically (a server reading it never
        sees half a file)."""
        storage.write_json(str(path), self.to_dict(), indent=1)
        return path if storage.is_uri(path) else Path(path)

    @classmethod
    def from_dict(cls, d: dict, source: str = "classifier") -> Classifier:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ClassifierError(f"{source}: not a sentdisc classifier (expected \"format\": "
                                  f"\"{FORMAT}\")")

        def get(obj, key, where=""):
            if key not in obj:
                raise ClassifierError(f"{source}: missing field {where}{key!r}")
            return obj[key]

        top = get(d, "top")
        if not isinstance(top, dict):
            raise ClassifierError(f"{source}: field 'top' must be an object")
        try:
            coef = np.asarray(get(d, "coef"), dtype=np.float64)
            top_coef = np.asarray(get(top, "coef", "top."), dtype=np.float64)
            neurons = [int(n) for n in get(d, "neurons")]
            signs = [int(s) for s in get(d, "signs")]
            values = dict(intercept=float(get(d, "intercept")), C=float(get(d, "C")),
                          top_intercept=float(get(top, "intercept", "top.")),
                          top_C=float(get(top, "C", "top.")))
        except (TypeError, ValueError) as e:
            raise ClassifierError(f"{source}: bad value: {e}") from None
        H = int(d.get("rnn_size") or len(coef))
        if coef.ndim != 1 or len(coef) != H:
            raise ClassifierError(f"{source}: 'coef' must be a list of rnn_size={H} numbers, "
                                  f"got shape {list(coef.shape)}")
        if not neurons or len(signs) != len(neurons) or len(top_coef) != len(neurons):
            raise ClassifierError(f"{source}: 'neurons', 'signs' and 'top.coef' must be non-empty "
                                  f"and of equal length, got {len(neurons)}, {len(signs)}, "
                                  f"{len(top_coef)}")
        bad = [n for n in neurons if not 0 <= n < H]
        if bad:
            raise ClassifierError(f"{source}: neuron indices {bad} out of range [0, {H})")
        if not all(math.isfinite(v) for v in values.values()) or not np.isfinite(coef).all():
            raise ClassifierError(f"{source}: non-finite weights")
        return cls(coef=coef, top_coef=top_coef, neurons=neurons, signs=signs,
                   feature_kind=str(d.get("feature_kind", "cell")), layer=int(d.get("layer", -1)),
                   rnn_size=H, checkpoint=str(d.get("checkpoint", "")),
                   meta=dict(d.get("meta") or {}), **values)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Classifier:
        """classifier.json from a local path or URI (or the folder holding it)."""
        p = str(path)
        if storage.is_dir(p):
            p = storage.join(p, "classifier.json")
        return cls.from_dict(storage.read_json(p, error=ClassifierError, what="classifier file"), p)


def fit_result_to_classifier(coef, intercept, C, neurons, top_coef, top_intercept, top_C,
                             feature_kind="cell", layer=-1, checkpoint="") -> Classifier:
    coef = np.asarray(coef, dtype=np.float64).reshape(-1)
    signs = [1 if coef[n] >= 0 else -1 for n in neurons]
    return Classifier(coef=coef, intercept=float(intercept), C=float(C), neurons=list(neurons),
                      signs=signs, top_coef=np.asarray(top_coef).reshape(-1),
                      top_intercept=float(top_intercept), top_C=float(top_C),
                      feature_kind=feature_kind, layer=layer, rnn_size=len(coef),
                      checkpoint=str(checkpoint))
