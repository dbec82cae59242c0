"""What a fitted classifier says about reading its model: the one place these rules live.

A transfer run fits an L1 logistic regression on one layer's features of one kind and ranks
the neurons by |weight|. Heatmaps, generation and serving all need the same facts from it:
which neuron is the sentiment neuron, which layer and state to read, whether to flip a neuron's
sign so that positive values (green, ``--overwrite +1``) always mean positive sentiment, and
which checkpoint the classifier was fitted on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

TRACE_KINDS = ("cell", "hidden")


@dataclass(frozen=True)
class Probe:
    neurons: tuple = ()          # top neurons, largest |weight| first
    signs: tuple = ()            # +1 / -1: the sign of each one's weight
    layer: int = -1
    feature_kind: str = "cell"   # cell | hidden | mean | max
    checkpoint: str = ""         # the checkpoint the classifier was fitted on ("" if unknown)

    @classmethod
    def from_classifier(cls, clf) -> Probe:
        return cls(tuple(clf.neurons), tuple(clf.signs), int(clf.layer), clf.feature_kind,
                   clf.checkpoint)

    @classmethod
    def load(cls, path: str) -> Probe:
        from sentdisc.classifier import Classifier

        return cls.from_classifier(Classifier.load(path))

    @property
    def neuron(self) -> Optional[int]:
        """The sentiment neuron (the top one), None without a classifier."""
        return self.neurons[0] if self.neurons else None

    @property
    def trace_kind(self) -> str:
        """The per-character state the features are pooled from: cell for cell features,
        hidden for hidden / mean / max."""
        return "cell" if self.feature_kind == "cell" else "hidden"

    def negate(self, neuron: int) -> bool:
        """Show (and steer) ``neuron`` sign-flipped: it is a top neuron with a negative weight,
        so its large values mean negative sentiment."""
        return neuron in self.neurons and self.signs[self.neurons.index(neuron)] < 0
