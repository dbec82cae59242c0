"""Ray job entry: fine-tune a pretrained checkpoint with a classifier head on labeled data.

    python jobs/finetune.py --load_model experiments/local/checkpoint_final --train ...
    ray job submit --working-dir . -- python jobs/finetune.py --load_model CKPT --train ...
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from sentdisc.recipes.finetune import main

if __name__ == "__main__":
    sys.exit(main())
