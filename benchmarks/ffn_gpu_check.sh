#!/usr/bin/env bash
# One script for a lent H100/H200 (jax >= 0.11 with CUDA): compiled-path kernel tests, then the
# FFN benchmark at d=1024, H=4096, bf16. Budget: under ~8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
$PY -c "import jax; print(jax.__version__, jax.devices())"
# Compiled kernels (TestFFNKernel runs for real on a GPU; the CPU-only checks are skipped here
# only by time: they are fast, so run the whole kernel suite). Shapes the Mosaic GPU kernels do
# not serve (float32, d % 64, hidden % 128) fall back to XLA there, which those tests accept;
# test_bf16_gradients_accumulate_in_float32_across_token_blocks must be served by the kernel.
timeout 240 $PY -m pytest tests/kernels -q -x -p no:cacheprovider
# n in {1,4,16} x M in {4096,16384}; M=65536 only for n in {1,4} to stay inside the budget.
timeout 200 $PY benchmarks/ffn.py --full --tokens 4096 16384 --reps 3
timeout 120 $PY benchmarks/ffn.py --full --tokens 65536 --n 1 4 --reps 2 \
  --out benchmarks/results/ffn_gpu_m65536.json
