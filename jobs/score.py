"""Ray job entry: batch scoring of a corpus with a checkpoint and its classifier -> Parquet.

    python jobs/score.py --load_model CKPT --classifier classifier.json --data CORPUS --output DIR
    ray job submit --working-dir . -- python jobs/score.py --load_model CKPT --classifier ... \
        --data 's3://bucket/reviews/*.json.gz' --output s3://bucket/scored/
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from sentdisc.recipes.score import main

if __name__ == "__main__":
    sys.exit(main())
