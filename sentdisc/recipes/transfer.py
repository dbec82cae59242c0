"""``sentdisc transfer`` / ``python jobs/transfer.py``: a checkpoint + labeled data -> classifier.

    sentdisc transfer --load_model CKPT --train sst2/train.csv --valid sst2/val.csv \
        --test sst2/test.csv --text_key sentence --label_key label

Featurizes (in-process or on a Ray Data actor pool), sweeps the L1 strength with Ray Tune,
prints the report of NVIDIA's transfer.py and writes results.json, classifier.json,
tune_results.csv and the neuron plots under <experiment_dir>/<experiment_name>/transfer/<dataset>/,
and logs them as an MLflow run tagged with the checkpoint (``sentdisc.checkpoint``) in the
experiment ``transfer-<dataset>``, so ``mlflow ui`` compares checkpoints side by side.
Path values may use environment variables (``$VAR``, ``${SENTDISC_DATA}``). Submit to a cluster
with ``ray job submit -- python jobs/transfer.py ...``; there ``ray.init`` joins the cluster,
and the checkpoint and data paths must be readable by every node.
"""
from __future__ import annotations

import sys

from sentdisc.config import OutputConfig, parse
from sentdisc.recipes import run


def main(argv=None) -> int:
    from sentdisc.tracking import TrackingConfig
    from sentdisc.transfer import TransferConfig, run_transfer

    cfg, out, tracking = parse([TransferConfig, OutputConfig, TrackingConfig], argv,
                               "Sentiment transfer: featurize, L1 logistic regression swept by "
                               "Ray Tune, the sentiment neuron", prog="sentdisc transfer")
    # Ray starts on first use (after the inputs are checked): under `ray job submit` it joins
    # the cluster named by RAY_ADDRESS, otherwise it starts a local one.
    return run("transfer", lambda: run_transfer(cfg, out, tracking=tracking))


if __name__ == "__main__":
    sys.exit(main())
