"""Unsupervised byte-LM pretraining on Ray Train: the paper's Amazon run, or minutes on a laptop.

    python jobs/pretrain.py --config jobs/configs/local.yaml
    sentdisc pretrain --config jobs/configs/paper.yaml --train /data/amazon/reviews
    ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/local.yaml

Flags as in NVIDIA's sentiment-discovery (rnn_size, batch_size, seq_length, lr, ...), see
``--help``; ``--config FILE.yaml`` gives defaults that flags override. Path values may use
environment variables (``$VAR``, ``${VAR}``, ``${VAR:-default}``); ``$SENTDISC_DATA`` defaults to
``../shared/data`` beside the checkout. Outputs go to <experiment_dir>/<experiment_name>/:
Ray Train's checkpoints, checkpoint_final, history.csv, loss.png, summary.json.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path

from sentdisc.checkpoint import CheckpointError
from sentdisc.config import parse
from sentdisc.data.readers import DataConfig, DataError, as_data_error
from sentdisc.model import ModelConfig
from sentdisc.train import TrainConfig, pretrain

REPO = Path(__file__).resolve().parents[2]
_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)")


def default_data_dir() -> Path:
    """$SENTDISC_DATA, else ../shared/data beside the working directory or this checkout."""
    if os.environ.get("SENTDISC_DATA"):
        return Path(os.environ["SENTDISC_DATA"])
    candidates = [Path.cwd().parent / "shared" / "data", REPO.parent / "shared" / "data"]
    return next((p for p in candidates if p.is_dir()), candidates[-1]).resolve()


def expand(value: str) -> str:
    """Environment variables in a path; SENTDISC_DATA falls back to default_data_dir()."""
    def sub(m: re.Match) -> str:
        name, default = m.group(1) or m.group(3), m.group(2)
        if os.environ.get(name):
            return os.environ[name]
        if default is not None:
            return default
        if name == "SENTDISC_DATA":
            return str(default_data_dir())
        raise ValueError(f"{value!r}: environment variable {name} is not set")

    return os.path.expanduser(_VAR.sub(sub, value)) if value else value


def main(argv=None) -> int:
    model_cfg, data_cfg, train_cfg = parse([ModelConfig, DataConfig, TrainConfig], argv,
                                           "Pretrain a byte-level mLSTM on Ray Train")
    try:
        data_cfg = dataclasses.replace(data_cfg, **{k: expand(getattr(data_cfg, k))
                                                    for k in ("train", "valid", "test")})
        train_cfg = dataclasses.replace(train_cfg, experiment_dir=expand(train_cfg.experiment_dir),
                                        resume=expand(train_cfg.resume))
        summary = pretrain(model_cfg, data_cfg, train_cfg)
    except (DataError, CheckpointError, ValueError) as e:
        hint = " (set SENTDISC_DATA to the data folder)" if isinstance(e, DataError) and \
            "no such file" in str(e) else ""
        print(f"pretrain: error: {e}{hint}", file=sys.stderr)
        return 2
    except Exception as e:  # a failed Train run: say why in one line when it is bad data
        data_error = as_data_error(e)
        if data_error is None:
            raise
        print(f"pretrain: error: {data_error}", file=sys.stderr)
        return 2
    print("\n[pretrain] done in {:.0f} s: {} iterations, train {} bpb, val {} bpb, test {} bpb".format(
        summary["wall_s"], summary["iterations"], _fmt(summary["train_bpb"]),
        _fmt(summary["val_bpb"]), _fmt(summary["test_bpb"])))
    if summary.get("skipped_total"):
        print(f"[pretrain] skipped {summary['skipped_total']} malformed records "
              f"(see skipped_* in history.csv)")
    for key in ("checkpoint", "history", "loss_plot"):
        print(f"[pretrain] {key:<10} {summary[key]}")
    return 0


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    sys.exit(main())
