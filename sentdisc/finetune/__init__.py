"""Fine-tuning: a pretrained byte LM plus a classifier head, trained end to end on labeled text
as DDP workers on Ray Train, for every label kind transfer knows.

    config.py  FinetuneConfig (the ``finetune:`` section) and fine-tuning's TrainConfig defaults
    model.py   ClassifierLM, the objective, the head as a ``Classifier``
    data.py    labeled sets in the object store; each epoch's global batches
    loop.py    the Ray Train worker (pretraining's phases: restore, step, report, checkpoint)
    driver.py  finetune(): check, fit, evaluate as serving will, write the outputs
"""
from sentdisc.finetune.config import DEFAULTS, FinetuneConfig

__all__ = ["DEFAULTS", "FinetuneConfig", "finetune"]


def __getattr__(name: str):
    if name == "finetune":  # the driver imports Ray Train: on first use
        from sentdisc.finetune.driver import finetune

        return finetune
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
