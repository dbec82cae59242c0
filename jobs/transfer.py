"""Ray job entry: sentiment transfer of a pretrained checkpoint to a labeled set.

    python jobs/transfer.py --load_model experiments/local/checkpoint_final --train ...
    ray job submit --working-dir . -- python jobs/transfer.py --load_model CKPT --train ...
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from sentdisc.recipes.transfer import main

if __name__ == "__main__":
    sys.exit(main())
