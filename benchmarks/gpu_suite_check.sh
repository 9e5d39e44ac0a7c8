#!/usr/bin/env bash
# One script for a lent GPU (issue 9's "done when"): the whole test suite on one GPU, then the
# Universal Transformer example in bfloat16 and in mixed precision, printing the pass counts and
# what served the FFN. Budget: under ~9 minutes on an H200 (the suite took ~3 min there with
# xdist; give it 6 without). Logs go to $OUT when set (the device tool's output folder), else
# to benchmarks/results/.
#   PY=python3 bash benchmarks/gpu_suite_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
LOGS=${OUT:-benchmarks/results}
mkdir -p "$LOGS"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"

# The suite exactly as the issue runs it (one GPU: multidevice tests adapt or skip). pytest-xdist
# is used when present (-n 8); pytest-benchmark conflicts with it, hence -p no:benchmark.
xdist=()
$PY -c "import xdist" 2>/dev/null && xdist=(-n 8)
timeout 420 $PY -m pytest tests -p no:cacheprovider -p no:benchmark "${xdist[@]}" -q -rfEs \
  >"$LOGS/suite_gpu.log" 2>&1
echo "suite exit code $?: $(tail -n 1 "$LOGS/suite_gpu.log")"
grep -E "^(FAILED|ERROR)" "$LOGS/suite_gpu.log" | head -40

# The example: what served the FFN, and that it trains (300 steps; ~10 s each on an H200).
for precision in bfloat16 mixed; do
  timeout 150 $PY examples/universal_transformer.py --steps 300 --precision "$precision" \
    >"$LOGS/ut_$precision.log" 2>&1
  echo "UT --precision $precision exit code $?:"
  grep -E "^(jax |FFN served by|training loss|held-out)|Warning" "$LOGS/ut_$precision.log"
done
