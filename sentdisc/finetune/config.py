"""``FinetuneConfig``: the ``finetune:`` section. The labeled data are transfer's flags
(``LabeledDataConfig``), the training run is pretraining's ``TrainConfig`` (``train:``, with
fine-tuning's own defaults: ``DEFAULTS``), and this adds what only fine-tuning has."""
from __future__ import annotations

from dataclasses import dataclass, field

from sentdisc.features_ray import PoolConfig
from sentdisc.finetune.model import FEATURE_KINDS
from sentdisc.labeled import LabeledDataConfig

# TrainConfig as fine-tuning starts it (flags and YAML override): the recipe of Radford et al.'s
# successors for a small labeled set, measured on SST-2 (README, Results): Adam at a constant
# 2e-3 for body and head, batches of 32 texts, gradients clipped at 1, 6 epochs.
DEFAULTS = {"batch_size": 32, "lr": 2e-3, "lr_scheduler": "none", "epochs": 6,
            "log_interval": 20, "keep_checkpoints": 2, "ingest_cpus": 0.0}


@dataclass
class FinetuneConfig(PoolConfig, LabeledDataConfig):
    load_model: str = field(default="", metadata={
        "help": "pretrained checkpoint to start from (a folder, a URI, or 'openai')",
        "path": True})
    feature_kind: str = field(default="mean", metadata={
        "help": "what the head reads: mean (of the last layer's hidden states over the text) "
                "| cell (its final cell state)"})
    head_lr: float = field(default=0.0, metadata={
        "help": "the classifier head's learning rate (0: --lr, the body's)"})
    lm_weight: float = field(default=0.0, metadata={
        "help": "weight of the next-byte LM loss over the labeled texts, added to the "
                "classification loss (0: none; the LM head is then frozen)"})
    eval_every: int = field(default=0, metadata={
        "help": "iterations between validations, each one a checkpoint (fine-tuning takes no "
                "--save_iters); 0: at each epoch's end"})
    patience: int = field(default=2, metadata={
        "help": "stop after this many validations without a better score (0: never); the "
                "best validation's weights are the output either way"})
    num_neurons: int = field(default=1, metadata={
        "help": "top neurons (by |head weight|, per label) recorded for heatmaps"})
    extremes: int = field(default=5, metadata={
        "help": "texts listed at each end of each top neuron's values (extremes.html; 0: none)"})
    dataset: str = field(default="", metadata={
        "help": "name of the output folder; empty: the train file's parent folder"})

    def __post_init__(self):
        LabeledDataConfig.__post_init__(self)
        PoolConfig.__post_init__(self)
        if self.feature_kind not in FEATURE_KINDS:
            raise ValueError(f"feature_kind must be one of {FEATURE_KINDS} for fine-tuning, got "
                             f"{self.feature_kind!r}")
        for name in ("head_lr", "lm_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("eval_every", "patience", "extremes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_neurons < 1:
            raise ValueError(f"num_neurons must be >= 1, got {self.num_neurons}")
