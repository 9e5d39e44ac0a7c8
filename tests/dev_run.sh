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
# Usage: bash tests/dev_run.sh [LOG_DIR] [all|main|rest]   (PYTHON defaults to .venv/bin/python)
#   main: only the main property's two halves; rest: only the other properties and the lifecycle.
# Hours on two cores. Writes each part's pytest output and hypothesis statistics to LOG_DIR, and
# one line per part (start, end, exit code, pytest's summary) to LOG_DIR/lanes.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${1:-dev-run-logs}"
PART="${2:-all}"
PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$LOG"
export TIETRANSFORM_HYPOTHESIS_PROFILE=dev
main=tests/test_properties.py::test_tied_values_and_gradients_equal_the_untied_reference_summed_over_members
run() {  # run NAME EXAMPLES SEED TESTS...
  local name=$1 n=$2 seed=$3 rc=0
  shift 3
  echo "$(date -u +%FT%TZ) start $name ($n examples, seed $seed) at $(git rev-parse --short HEAD)" \
    >>"$LOG/lanes.txt"
  TIETRANSFORM_DEV_EXAMPLES=$n "$PY" -m pytest -q -p no:cacheprovider -n 0 \
    --hypothesis-seed="$seed" --hypothesis-show-statistics "$@" >"$LOG/$name.txt" 2>&1 || rc=$?
  echo "$(date -u +%FT%TZ) end $name exit $rc: $(tail -n 1 "$LOG/$name.txt")" >>"$LOG/lanes.txt"
}
secondary() {
  run secondary 2500 3 tests/test_properties.py \
    -k "not test_tied_values_and_gradients_equal_the_untied_reference_summed_over_members"
}
case "$PART" in
  all) (run main-seed1 1250 1 "$main"; secondary) & (run main-seed2 1250 2 "$main"; \
    run lifecycle 2500 4 tests/test_lifecycle.py) & ;;
  main) run main-seed1 1250 1 "$main" & run main-seed2 1250 2 "$main" & ;;
  rest) secondary & run lifecycle 2500 4 tests/test_lifecycle.py & ;;
  *) echo "unknown part '$PART' (all, main or rest)" >&2; exit 2 ;;
esac
wait
cat "$LOG/lanes.txt"
