"""Ray job entry: unsupervised pretraining of the byte-level mLSTM.

    python jobs/pretrain.py --config jobs/configs/local.yaml
    ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/paper.yaml --train ...
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from sentdisc.recipes.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
