#!/usr/bin/env bash
# Every probe's note-vs-probe benchmark at real geometry with random weights in bf16 on a GPU
# (SDXL UNet at 1024 px, Wan2.1-1.3B transformer at 9 latent frames, DINOv3 ViT-L/16; the SD3
# scripts with the options they accept), written to benchmarks/results-gpu.md (GPU name, torch and
# CUDA versions, throughput, peak memory, ratio to the note's method).  Budget: under 8 minutes.
# Without a GPU it runs the same comparisons on the CPU at reduced size (so it is tested).
#   bash benchmarks/gpu.sh            # OUT=path overrides the result file
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results-gpu.md}"
PY="${PYTHON:-python}"
if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  MODE=gpu
else
  MODE=cpu-reduced
  echo "gpu.sh: no CUDA device; running the CPU-reduced comparisons" >&2
fi
exec timeout 480 "$PY" benchmarks/run_all.py --mode "$MODE" --markdown "$OUT"
