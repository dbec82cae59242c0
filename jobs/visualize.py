"""Ray job entry: heatmap of a neuron, or ``--generate`` text with the neuron held.

    ray job submit --working-dir . -- python jobs/visualize.py --load_model CKPT --text "..."
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from sentdisc.recipes.visualize import main

if __name__ == "__main__":
    sys.exit(main())
