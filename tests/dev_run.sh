#!/usr/bin/env bash
# The `dev` hypothesis run of the property suite: >= 10^4 examples in total, on two lanes (one per
# core; each example is dominated by single-threaded XLA compilation, so two lanes halve the wall
# time). The main property's 2500 examples are split over the lanes as 2 x 1250 with different
# seeds; everything else runs at the dev profile's size.
#
#   lane 1: main property (1250, seed 1)  then  pack/unpack (2500), finite differences (1250),
#           compiled parameters (1250)
#   lane 2: main property (1250, seed 2)  then  lifecycle state machine (2500)
#
# Usage: bash tests/dev_run.sh [LOG_DIR]   (PYTHON defaults to .venv/bin/python)
# Hours on two cores. Prints each lane's pytest summary and hypothesis statistics to LOG_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${1:-dev-run-logs}"
PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$LOG"
export TIETRANSFORM_HYPOTHESIS_PROFILE=dev
main=tests/test_properties.py::test_tied_values_and_gradients_equal_the_untied_reference_summed_over_members
run() {  # run NAME EXAMPLES SEED TESTS...
  local name=$1 n=$2 seed=$3; shift 3
  echo "$(date -u +%FT%TZ) start $name ($n examples, seed $seed)" >>"$LOG/lanes.txt"
  TIETRANSFORM_DEV_EXAMPLES=$n "$PY" -m pytest -q -p no:cacheprovider --hypothesis-seed="$seed" \
    --hypothesis-show-statistics "$@" >"$LOG/$name.txt" 2>&1
  echo "$(date -u +%FT%TZ) end $name rc=$? $(tail -1 "$LOG/$name.txt")" >>"$LOG/lanes.txt"
}
(
  run main-seed1 1250 1 "$main"
  run secondary 2500 3 tests/test_properties.py \
    -k "not test_tied_values_and_gradients_equal_the_untied_reference_summed_over_members"
) &
(
  run main-seed2 1250 2 "$main"
  run lifecycle 2500 4 tests/test_lifecycle.py
) &
wait
cat "$LOG/lanes.txt"
