#!/usr/bin/env bash
# mLSTM-4096 on one GPU (H200-class): bf16 autocast, fused gates (sentdisc.kernels), the
# whole training step replayed from a CUDA graph; batch 128/256/512; then fp32 vs bf16
# losses over 200 steps. No network needed; < 8 minutes. Prints a table and keeps a copy
# in benchmarks/results/gpu-<date>.txt (commit it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
mkdir -p benchmarks/results
out="benchmarks/results/gpu-$(date +%Y%m%d-%H%M).txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out" || true
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" timeout 470 "$PY" -u benchmarks/bench_gpu.py "$@" 2>&1 | tee -a "$out"
echo "saved $out"
