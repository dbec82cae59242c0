"""Unsupervised byte-LM pretraining on Ray Train: the paper's Amazon run, or minutes on a laptop.

    python jobs/pretrain.py --config jobs/configs/local.yaml
    sentdisc pretrain --config jobs/configs/paper.yaml --train /data/amazon/reviews
    ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/local.yaml

Flags as in NVIDIA's sentiment-discovery (rnn_size, batch_size, seq_length, lr, ...), see
``--help``; ``--config FILE.yaml`` gives defaults (sections model:, data:, train:, output:,
tracking:) that flags override. Path values may use environment variables (``$VAR``,
``${VAR:-default}``); ``$SENTDISC_DATA`` defaults to ``../shared/data`` beside the checkout. Outputs go to
<experiment_dir>/<experiment_name>/: Ray Train's checkpoints, checkpoint_final, history.csv,
loss.png, summary.json. The run is tracked in MLflow (``sentdisc.tracking``): a SQLite store
<experiment_dir>/mlflow.db by default, ``--tracking_uri`` for a server, ``--tracking none`` for
none; ``--tensorboard`` adds TensorBoard event files in the run's folder.
"""
from __future__ import annotations

import sys

from sentdisc.config import OutputConfig, parse
from sentdisc.data.readers import DataConfig
from sentdisc.model import ModelConfig
from sentdisc.recipes import run
from sentdisc.tracking import TrackingConfig
from sentdisc.train import TrainConfig, pretrain


def main(argv=None) -> int:
    *configs, tracking = parse([ModelConfig, DataConfig, TrainConfig, OutputConfig,
                                TrackingConfig], argv, "Pretrain a byte-level mLSTM on Ray Train",
                                prog="sentdisc pretrain")
    return run("pretrain", lambda: report(pretrain(*configs, tracking=tracking)))


def report(summary: dict) -> None:
    print("\n[pretrain] done in {:.0f} s: {} iterations, train {} bpb, val {} bpb, test {} bpb".format(
        summary["wall_s"], summary["iterations"], _fmt(summary["train_bpb"]),
        _fmt(summary["val_bpb"]), _fmt(summary["test_bpb"])))
    if summary.get("skipped_total"):
        print(f"[pretrain] skipped {summary['skipped_total']} malformed records "
              f"(see skipped_* in history.csv)")
    for key in ("checkpoint", "history", "loss_plot"):
        print(f"[pretrain] {key:<10} {summary[key]}")


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    sys.exit(main())
