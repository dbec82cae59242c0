"""A pretrained byte LM with a classifier head: what fine-tuning trains, and how its head
becomes a ``Classifier`` that serving and scoring load.

    outputs = lm.run_layers(x, reset)        # the pretrained mLSTM, trained end to end
    f       = c_T  (cell)  |  mean_t h_t (mean, over the text's own bytes)
    logits  = f W^T + b                      # W [K', H]: K' = 1 for binary, K otherwise
    loss    = CE(logits, y) + lm_weight * next-byte CE over the text's bytes (optional)

A batch is left-padded, and each row's state is reset at its text's first byte: every text
then ends at the last step, the fused mLSTM trains with a reset mask (it takes no padding mask
with gradients), and a text's features are exactly ``featurize``'s, which reads each text from
a zero state. So the exported classifier, applied to ``featurize``'s features, is the model
that was trained.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sentdisc.classifier import HERE, Classifier, rank_neurons
from sentdisc.model import ByteLM

FEATURE_KINDS = ("cell", "mean")


class ClassifierLM(nn.Module):
    """``lm`` (a ByteLM) and a linear head on its last layer's ``feature_kind`` feature."""

    def __init__(self, lm: ByteLM, n_outputs: int, feature_kind: str = "mean"):
        super().__init__()
        if feature_kind not in FEATURE_KINDS:
            raise ValueError(f"feature_kind must be one of {FEATURE_KINDS}, got {feature_kind!r}")
        self.lm, self.feature_kind = lm, feature_kind
        self.head = nn.Linear(lm.config.rnn_size, n_outputs)

    def features(self, x: torch.Tensor, reset: torch.Tensor, starts: torch.Tensor,
                 with_lm: bool = False):
        """Features [B, H] of left-padded texts (x [B, T] bytes, reset [B, T] at each text's
        first byte, starts [B] that byte's index), and the LM's next-byte loss over the texts'
        own bytes when ``with_lm`` (else None)."""
        outputs, state = self.lm.run_layers(x, reset=reset)
        hs = outputs[-1][0]
        T = x.shape[1]
        own = torch.arange(T, device=x.device)[None, :] >= starts[:, None]  # [B, T]
        if self.feature_kind == "cell":
            feats = state[-1][1]
        else:
            n = (T - starts).to(hs.dtype)
            feats = torch.bmm(own.unsqueeze(1).to(hs.dtype), hs).squeeze(1) / n[:, None]
        lm_loss = None
        if with_lm:
            logits = self.lm.head(self.lm.drop(hs[:, :-1]))
            targets = x[:, 1:].long()
            scored = own[:, :-1]  # position t predicts byte t + 1, both of the text
            lm_loss = F.cross_entropy(logits[scored].float(), targets[scored])
        return feats.float(), lm_loss

    def forward(self, x, reset, starts, with_lm: bool = False):
        feats, lm_loss = self.features(x, reset, starts, with_lm)
        return self.head(feats), lm_loss


class Objective:
    """Fine-tuning's objective for ``sentdisc.train.step.train_step``: the label kind's loss
    on the head's logits, plus ``lm_weight`` x the next-byte loss."""

    def __init__(self, label_kind: str, lm_weight: float = 0.0):
        self.label_kind, self.lm_weight = label_kind, lm_weight

    def __call__(self, model, x, reset, starts, y, autocast=None):
        import contextlib

        with autocast or contextlib.nullcontext():
            logits, lm_loss = model(x, reset, starts, with_lm=self.lm_weight > 0)
        logits = logits.float()
        if self.label_kind == "multiclass":
            class_loss = F.cross_entropy(logits, y)
        elif self.label_kind == "binary":
            class_loss = F.binary_cross_entropy_with_logits(logits[:, 0], y.float())
        else:
            class_loss = F.binary_cross_entropy_with_logits(logits, y.float())
        loss = class_loss if lm_loss is None else class_loss + self.lm_weight * lm_loss
        return loss, {"class_loss": class_loss, "lm_loss": lm_loss}


def outputs_of(label_kind: str, n_labels: int) -> int:
    """The head's width: one logit for binary, one per label otherwise."""
    return 1 if label_kind == "binary" else n_labels


def head_classifier(head: nn.Linear, label_kind: str, labels, feature_kind: str,
                    num_neurons: int = 1, meta: dict | None = None) -> Classifier:
    """The head as a Classifier over the checkpoint's own features (``checkpoint`` ".": the
    folder it is saved in), its top neurons ranked by |weight| (per label)."""
    coef = head.weight.detach().double().cpu().numpy()
    bias = head.bias.detach().double().cpu().numpy()
    if label_kind == "binary":
        coef, bias = coef[0], bias[:1]
    neurons, signs, serves = rank_neurons(coef, min(num_neurons, coef.shape[-1]), labels)
    return Classifier(coef=coef, intercept=bias, neurons=neurons, signs=signs,
                      feature_kind=feature_kind, layer=-1, checkpoint=HERE,
                      label_kind=label_kind, labels=list(labels), neuron_labels=serves,
                      meta=meta or {})


@torch.no_grad()
def load_head(head: nn.Linear, clf: Classifier) -> None:
    """Put a saved classifier's weights back into the head (a resumed run)."""
    coef = np.atleast_2d(clf.coef)
    head.weight.copy_(torch.as_tensor(coef, dtype=head.weight.dtype))
    head.bias.copy_(torch.as_tensor(np.atleast_1d(clf.intercept), dtype=head.bias.dtype))
