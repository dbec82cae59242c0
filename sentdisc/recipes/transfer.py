"""``sentdisc transfer`` / ``python jobs/transfer.py``: a checkpoint + labeled data -> classifier.

    sentdisc transfer --load_model CKPT --train sst2/train.csv --valid sst2/val.csv \
        --test sst2/test.csv --text_key sentence --label_key label

Featurizes (in-process or on a Ray Data actor pool), sweeps the L1 strength with Ray Tune,
prints the report of NVIDIA's transfer.py and writes results.json, classifier.json,
tune_results.csv and the neuron plots under <experiment_dir>/<experiment_name>/transfer/<dataset>/.
Submit to a cluster with ``ray job submit -- python jobs/transfer.py ...``; there ``ray.init``
joins the cluster, and the checkpoint and data paths must be readable by every node.
"""
from __future__ import annotations

import sys

from sentdisc.config import parse


def main(argv=None):
    from sentdisc.checkpoint import CheckpointError
    from sentdisc.transfer import TransferConfig, TransferError, run_transfer

    (cfg,) = parse([TransferConfig], argv, "Sentiment transfer: featurize, L1 logistic "
                   "regression swept by Ray Tune, the sentiment neuron")
    # Ray starts on first use (after the inputs are checked): under `ray job submit` it joins
    # the cluster named by RAY_ADDRESS, otherwise it starts a local one.
    try:
        run_transfer(cfg)
    except (TransferError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    return 0


if __name__ == "__main__":
    main()
