#!/usr/bin/env bash
# The quality table on one H200 (benchmarks/quality.py): pretrain the largest mLSTM that trains
# in ~5 minutes in bf16 (CUDA-graph step) on a carried 60 MB slice of imdb/reviews, transfer the
# checkpoints and random weights to SST-2 / IMDB / Amazon, print the same table.
#
#   benchmarks/gpu_quality.sh prepare    # here: .gpu_data/quality/ and .gpu_data/site.tar.xz
#   benchmarks/gpu_quality.sh run        # on the GPU machine (device tool: carry
#                                        #   [".gpu_data/quality", ".gpu_data/site.tar.xz"])
#   benchmarks/gpu_quality.sh --dry_run  # here, on CPU: every stage, tiny sizes
#
# Size: mLSTM-$RNN (4096) at 256 x 256 bytes; iterations for ~5 minutes from the graph rate at
# batch 256 in the newest benchmarks/results/gpu_*.md (gpu.sh), else an estimate of 0.6 MB/s
# (set ITERS to override). Output: benchmarks/results/quality-gpu/ (quality_dryrun_<date>/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DATA="${SENTDISC_DATA:-$(cd .. && pwd)/shared/data}"
Q=.gpu_data/quality

prepare() {
  rm -rf "$Q" && mkdir -p "$Q"/reviews "$Q"/imdb "$Q"/sst2 "$Q"/amazon_blitzer
  # 60 MB of reviews cut at a line, xz'd (~4x smaller; the readers decompress .xz as they go)
  cat "$DATA"/imdb/reviews/part-0{0..4}.json | head -c 60000000 | sed '$d' \
      | xz -T2 -6 > "$Q"/reviews/part-00.json.xz
  # Seeded subsets of the labeled CSVs (quality.py samples again from these, seeded)
  "$PY" - "$DATA" "$Q" <<'PY'
import sys, pandas as pd
d, q = sys.argv[1:]
for split, n in (("train", 3500), ("test", 3000)):
    pd.read_csv(f"{d}/imdb/{split}.csv").sample(n=n, random_state=0).to_csv(
        f"{q}/imdb/{split}.csv", index=False)
am = pd.read_csv(f"{d}/amazon_blitzer/train.csv")
am.sample(n=min(3000, len(am)), random_state=0).to_csv(f"{q}/amazon_blitzer/train.csv", index=False)
PY
  cp "$DATA"/amazon_blitzer/{val,test}.csv "$Q"/amazon_blitzer/
  cp "$DATA"/sst2/*.csv "$Q"/sst2/
  [ -f .gpu_data/site.tar.xz ] || bash benchmarks/gpu.sh bundle_ray
  grep -qx ".gpu_data/" .git/info/exclude 2>/dev/null || echo ".gpu_data/" >> .git/info/exclude
  du -sh "$Q" .gpu_data/site.tar.xz
}

iterations() {  # ~300 s at the measured (or estimated) bytes/s of the graph step at batch 256
  local rate
  rate=$(grep -h "B=256 .* graph " $(ls -t benchmarks/results/gpu_2*.md 2>/dev/null | head -1) \
         /dev/null 2>/dev/null | grep -o "[0-9.]* MB/s" | head -1 | cut -d' ' -f1)
  "$PY" -c "print(max(200, int(300 * float('${rate:-0.6}') * 1e6 / (256 * 256))))"
}

run() {
  if [ -f .gpu_data/site.tar.xz ]; then
    mkdir -p /tmp/site && tar -xJf .gpu_data/site.tar.xz -C /tmp/site
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export SENTDISC_DATA="$PWD/$Q" RAY_ADDRESS=local PYTHONUNBUFFERED=1
  mkdir -p benchmarks/results
  local log="benchmarks/results/quality-gpu_$(date +%F).log" iters=${ITERS:-$(iterations)}
  echo "mLSTM-${RNN:-4096}, $iters iterations of 256 x 256 bytes" | tee "$log"
  PYTHONPATH=".:${PYTHONPATH:-}" timeout 570 "$PY" -u benchmarks/quality.py --use_gpu \
      --precision bf16 --corpus_path "$Q"/reviews --rnn_size "${RNN:-4096}" --batch_size 256 \
      --seq_length 256 --lr 5e-4 --max_iters "$iters" --checkpoints 2 --threads_per_worker 8 \
      --max_train 3000 --max_val 500 --max_test 3000 --tracking none \
      --out benchmarks/results/quality-gpu --experiment_dir /tmp/experiments "$@" 2>&1 | tee -a "$log"
  if [ -n "${OUT:-}" ]; then cp "$log" benchmarks/results/quality-gpu/quality.* "$OUT"/ || true; fi
  echo "saved $log"
}

dry_run() {  # every stage of quality.py (Ray Train, featurize, sweeps, table), tiny, on CPU;
  # the C sweeps run in process (DRY_SWEEP=tune: as Ray Tune trials, ~5x slower here)
  export SENTDISC_DATA="$DATA" RAY_ADDRESS=local
  local out="benchmarks/results/quality_dryrun_$(date +%F)" tmp
  tmp=$(mktemp -d)
  mkdir -p "$out"
  head -n 2000 "$DATA"/imdb/reviews/part-00.json > "$tmp"/part-00.json  # val: ~40 reviews
  PYTHONPATH=".:${PYTHONPATH:-}" timeout 600 "$PY" -u benchmarks/quality.py --precision bf16 \
      --corpus_path "$tmp" --rnn_size 16 --embed_size 8 --batch_size 4 --seq_length 32 \
      --max_iters 8 --checkpoints 1 --threads_per_worker 1 --max_sst2 60 --max_train 60 \
      --max_val 30 --max_test 60 --featurize_batch 16 --tracking none --out "$out" \
      --sweep_backend "${DRY_SWEEP:-local}" \
      --experiment_dir "$tmp/experiments" "$@" 2>&1 | tee "$out/quality.log"
  rm -rf "$tmp"
  sed -i '1s/^/DRY RUN (CPU, tiny sizes): these numbers only show that every stage ran. /' "$out"/quality.md
  echo "saved $out"
}

case "${1:-run}" in
  prepare) prepare ;;
  run) shift $(( $# > 0 )); run "$@" ;;
  --dry_run) shift; dry_run "$@" ;;
  *) sed -n 2,14p "$0"; exit 2 ;;
esac
