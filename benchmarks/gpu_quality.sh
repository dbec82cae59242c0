#!/usr/bin/env bash
# The quality table on one H200: pretrain the largest mLSTM that fits ~7 minutes in bf16 on a
# <60 MB slice of imdb/reviews, transfer every checkpoint on the device, print the same table.
#
#   benchmarks/gpu_quality.sh prepare      # here: copy the slice into .gpu_data/ (git-ignored)
#   benchmarks/gpu_quality.sh run          # on the GPU machine (device tool: carry .gpu_data)
#
# mLSTM-2048 at batch 256 x 256 in bf16 runs about 7 minutes for 4000 iterations by our
# estimate from benchmarks/gpu.sh's rates; adjust --max_iters to the measured bytes/s.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${SENTDISC_DATA:-$(cd .. && pwd)/shared/data}"
case "${1:-run}" in
  prepare)
    rm -rf .gpu_data && mkdir -p .gpu_data/imdb/reviews .gpu_data/sst2 .gpu_data/amazon_blitzer
    cp "$DATA"/imdb/reviews/part-0{0,1}.json .gpu_data/imdb/reviews/       # ~25 MB of 98
    # Seeded subsets of the IMDB labeled splits: the whole CSVs would overflow the 64 MiB carry.
    python - "$DATA" <<'PY'
import sys, pandas as pd
d = sys.argv[1]
for split, n in (("train", 6000), ("test", 5000)):
    pd.read_csv(f"{d}/imdb/{split}.csv").sample(n=n, random_state=0).to_csv(
        f".gpu_data/imdb/{split}.csv", index=False)
PY
    cp "$DATA"/sst2/*.csv .gpu_data/sst2/
    cp "$DATA"/amazon_blitzer/*.csv .gpu_data/amazon_blitzer/
    grep -qx ".gpu_data/" .git/info/exclude 2>/dev/null || echo ".gpu_data/" >> .git/info/exclude
    du -sh .gpu_data ;;
  run)
    pip install -q torch==2.13.0 2>/dev/null || true
    pip install -q -e . >/dev/null
    export SENTDISC_DATA="$PWD/.gpu_data" RAY_ADDRESS=local
    mkdir -p benchmarks/results
    out="benchmarks/results/gpu-quality-$(date +%Y%m%d-%H%M).txt"
    timeout 1500 python -u benchmarks/quality.py --use_gpu --precision bf16 \
        --corpus_path .gpu_data/imdb/reviews --rnn_size 2048 --batch_size 256 --seq_length 256 \
        --lr 1e-3 --max_iters 4000 --checkpoints 4 --threads_per_worker 8 \
        --max_train 5000 --max_val 1000 --max_test 5000 \
        --out benchmarks/results/quality-gpu --experiment_dir /tmp/experiments "$@" 2>&1 | tee "$out"
    echo "saved $out" ;;
  *) sed -n 2,9p "$0"; exit 2 ;;
esac
