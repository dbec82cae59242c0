"""``sentdisc finetune`` / ``python jobs/finetune.py``: a pretrained checkpoint + labeled data ->
a fine-tuned checkpoint that classifies.

    sentdisc finetune --load_model CKPT --train sst2/train.csv --valid sst2/val.csv \
        --test sst2/test.csv --text_key sentence --label_key label --epochs 6

The data flags are transfer's (binary, multi-class and multi-label labels, read off the data);
the training flags are pretraining's (``--batch_size``, ``--lr``, ``--epochs``, ``--max_iters``,
``--num_workers N`` or ``MIN-MAX``, ``--precision``, ``--resume``, ...) with fine-tuning's
defaults (``sentdisc.finetune.DEFAULTS``); and ``--head_lr``, ``--lm_weight``,
``--feature_kind cell|mean``, ``--eval_every``, ``--patience``; ``--batch_size`` counts texts.
Pretraining's ``--seq_length``, ``--save_iters`` and ``--eval_iters`` are refused (``REFUSED``
says what fine-tuning does instead) rather than ignored. The best validation's weights
and their classifier.json go to <experiment_dir>/<experiment_name>/finetune/<dataset>/
checkpoint_final, with results.json (the test set's accuracy, macro-F1, per-label numbers),
history.csv, loss.png and the plots; the run is tracked in MLflow (``finetune-<dataset>``).
Rerunning the command continues a killed run. Submit to a cluster with ``ray job submit --
python jobs/finetune.py ...``; every path must then be readable by every node.
"""
from __future__ import annotations

import sys

from sentdisc.config import OutputConfig, parse
from sentdisc.recipes import run

# pretraining's TrainConfig flags that mean something else here, or nothing
HELPS = {"batch_size": "texts per batch in total, split evenly over the workers (texts of "
                       "similar lengths batched together, each read whole)"}
REFUSED = {
    "seq_length": "each text is read whole, not in --seq_length windows",
    "save_iters": "each validation is a checkpoint (--eval_every N iterations, else each "
                  "epoch's end)",
    "eval_iters": "validation and test are scored whole (--max_eval caps their texts)",
}


def main(argv=None) -> int:
    from sentdisc.finetune import DEFAULTS, FinetuneConfig, finetune
    from sentdisc.tracking import TrackingConfig
    from sentdisc.train import TrainConfig

    cfg, tc, out, tracking = parse(
        [FinetuneConfig, TrainConfig, OutputConfig, TrackingConfig], argv,
        "Fine-tune a pretrained byte LM with a classifier head on Ray Train", defaults=DEFAULTS,
        helps=HELPS, refused=REFUSED, prog="sentdisc finetune")
    return run("finetune", lambda: report(finetune(cfg, tc, out, tracking)))


def report(results: dict) -> None:
    best = results["best"]
    print(f"\n[finetune] done in {results['seconds']:.0f} s: {results['iterations']} iterations; "
          f"best validation {best['metric']} {best['val_score']:.4f} at iteration "
          f"{best['iteration']}{' (stopped early)' if results['stopped_early'] else ''}")
    for split, m in results["metrics"].items():
        print(f"[finetune] {split}: accuracy {100 * m['accuracy']:.2f}, macro-F1 "
              f"{100 * m['macro_f1']:.2f} ({m['n']} texts)")
    print(f"[finetune] checkpoint  {results['checkpoint']}")
    print(f"[finetune] results     {results['files']['results']}")


if __name__ == "__main__":
    sys.exit(main())
