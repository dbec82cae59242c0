#!/usr/bin/env bash
# One H200, one table (benchmarks/bench_gpu.py): (a) mLSTM-4096 training at batch 128/256/512
# x 256 bytes, eager vs CUDA graph, bytes/s, FLOP/s and the fraction of the bf16 matmul rate
# measured in the same run; (b) fp32 vs bf16 losses over 200 steps from the same weights;
# (c) jobs/pretrain.py on Ray Train, one GPU, ~2 min on the carried text slice; (d) featurize
# of an mLSTM-4096 on SST-2 test; (e) the ETA of the paper's ~38 GB epoch. No network, < 8 min.
#
#   benchmarks/gpu.sh prepare      # here: .gpu_data/ (git-ignored): text slice, SST-2 test, Ray
#   benchmarks/gpu.sh run          # on the GPU machine (device tool: carry [".gpu_data"])
#   benchmarks/gpu.sh --dry_run    # here, on CPU: every stage, tiny sizes, meaningless numbers
#
# The table lands in benchmarks/results/gpu_<date>.md (gpu_dryrun_<date>.md), the log beside
# it (.log), and both in $OUT when that is set (the device tool brings $OUT back).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DATA="${SENTDISC_DATA:-$(cd .. && pwd)/shared/data}"

prepare() {
  rm -rf .gpu_data/text .gpu_data/sst2 && mkdir -p .gpu_data/text .gpu_data/sst2
  # ~13 MB of IMDB reviews, xz'd to ~4 MB (the readers decompress .xz as they stream)
  xz -T2 -6 -c "$DATA"/imdb/reviews/part-00.json > .gpu_data/text/part-00.json.xz
  cp "$DATA"/sst2/test.csv .gpu_data/sst2/
  [ -f .gpu_data/site.tar.xz ] || bundle_ray
  grep -qx ".gpu_data/" .git/info/exclude 2>/dev/null || echo ".gpu_data/" >> .git/info/exclude
  du -sh .gpu_data/*
}

bundle_ray() {
  # The H200 image has no Ray, and Ray's wheel (~80 MB) is over the 64 MiB carry: unpack it
  # for CPython 3.12 without its Java jars, RLlib, Serve and dashboard UI, add the packages
  # Ray Train needs that the image lacks, and carry that as one ~30 MB tar.xz.
  local v tmp
  v=$("$PY" -c 'import ray; print(ray.__version__)')
  tmp=$(mktemp -d)
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
      -d "$tmp/whl" "ray==$v" jsonschema jsonschema-specifications referencing rpds-py \
      pydantic pydantic-core annotated-types typing-inspection tensorboardX
  mkdir -p "$tmp/site"
  for w in "$tmp"/whl/*.whl; do unzip -q -o "$w" -d "$tmp/site"; done
  rm -rf "$tmp"/site/ray/{jars,rllib,serve,tests} "$tmp"/site/ray/dashboard/client
  tar -C "$tmp/site" -cf - . | xz -T2 -6 > .gpu_data/site.tar.xz
  rm -rf "$tmp"
}

save() {  # save <log>: the log and the table beside it, into $OUT too when set
  echo "saved $1"
  if [ -n "${OUT:-}" ]; then cp "$1" "${1%.log}.md" "$OUT"/ 2>/dev/null || true; fi
}

run() {
  if [ -f .gpu_data/site.tar.xz ]; then
    mkdir -p /tmp/site && tar -xJf .gpu_data/site.tar.xz -C /tmp/site
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  mkdir -p benchmarks/results
  local log="benchmarks/results/gpu_$(date +%F).log"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$log" || true
  PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 timeout 470 "$PY" -u benchmarks/bench_gpu.py "$@" 2>&1 | tee -a "$log"
  save "$log"
}

dry_run() {
  mkdir -p benchmarks/results
  local log="benchmarks/results/gpu_dryrun_$(date +%F).log"
  PYTHONPATH=".:${PYTHONPATH:-}" timeout 300 "$PY" -u benchmarks/bench_gpu.py --dry_run "$@" 2>&1 | tee "$log"
  save "$log"
}

case "${1:-run}" in
  prepare) prepare ;;
  run) shift $(( $# > 0 )); run "$@" ;;
  --dry_run) shift; dry_run "$@" ;;
  bundle_ray) bundle_ray ;;
  *) sed -n 2,12p "$0"; exit 2 ;;
esac
