"""What a fitted classifier says about reading its model: the one place these rules live.

A transfer run fits an L1 logistic regression on one layer's features of one kind and ranks
the neurons by |weight|. Heatmaps, generation and serving all need the same facts from it:
which neuron is the sentiment neuron, which layer and state to read, whether to flip a neuron's
sign so that positive values (green, ``--overwrite +1``) always mean positive sentiment, and
which checkpoint the classifier was fitted on.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from sentdisc.errors import InputError

TRACE_KINDS = ("cell", "hidden")


@dataclass(frozen=True)
class Probe:
    neurons: tuple = ()          # top neurons, largest |weight| first
    signs: tuple = ()            # +1 / -1: the sign of each one's weight
    layer: int = -1
    feature_kind: str = "cell"   # cell | hidden | mean | max
    checkpoint: str = ""         # the checkpoint the classifier was fitted on ("" if unknown)
    label_kind: str = ""         # binary | multiclass | multilabel ("" without a classifier)
    label_neurons: tuple = ()    # multi-class / multi-label: (label, neuron, sign) per label

    @classmethod
    def from_classifier(cls, clf) -> Probe:
        per_label = () if clf.label_kind == "binary" else tuple(
            (lab, *clf.top_neuron_of(lab)) for lab in clf.labels)
        return cls(tuple(clf.neurons), tuple(clf.signs), int(clf.layer), clf.feature_kind,
                   clf.checkpoint, clf.label_kind, per_label)

    def for_label(self, label: str) -> Probe:
        """This probe narrowed to the neuron that stands for ``label`` (a multi-class or
        multi-label classifier's), signed by its weight for that label: heatmaps and
        generation then show it, green (and +1) toward the label."""
        if not self.neurons:
            raise InputError(f"label {label!r}: no classifier, so no label has a neuron")
        if not self.label_neurons:
            raise InputError(f"label {label!r}: a {self.label_kind or 'binary'} classifier's "
                             f"neurons are not per label (its sentiment neuron, "
                             f"{self.neuron}, is the default)")
        for lab, neuron, sign in self.label_neurons:
            if lab == label:
                return replace(self, neurons=(neuron,), signs=(sign,))
        known = ", ".join(lab for lab, _, _ in self.label_neurons)
        raise InputError(f"label {label!r} is not one of the classifier's labels ({known})")

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
