#!/usr/bin/env bash
# The suite under load: both cores kept busy by two spinning processes while the tests marked
# `timing` (they depend on how processes and threads interleave) run TIMING_RUNS times and the
# whole suite SUITE_RUNS times. Every run must pass; the counts are printed at the end.
#   scripts/stress.sh [TIMING_RUNS [SUITE_RUNS]]      (defaults 20 and 3)
set -uo pipefail
cd "$(dirname "$0")/.."
TIMING_RUNS=${1:-20}
SUITE_RUNS=${2:-3}
VPY=${VPY:-.venv/bin/python}
LOG=${STRESS_LOG:-stress.log}
: > "$LOG"
SPIN=()
for _ in 1 2; do
  "$VPY" -c "while True: pass" &
  SPIN+=($!)
done
trap 'kill "${SPIN[@]}" 2>/dev/null' EXIT
passed=0 failed=0
run() {  # label, pytest arguments...
  local label=$1 start=$SECONDS
  shift
  if "$VPY" -m pytest -q -p no:cacheprovider "$@" >>"$LOG" 2>&1; then
    passed=$((passed + 1)); echo "stress: $label passed ($((SECONDS - start)) s)"
  else
    failed=$((failed + 1)); echo "stress: $label FAILED ($((SECONDS - start)) s; see $LOG)"
  fi
}
for i in $(seq "$TIMING_RUNS"); do run "timing tests, run $i of $TIMING_RUNS" -m timing; done
for i in $(seq "$SUITE_RUNS"); do run "whole suite, run $i of $SUITE_RUNS"; done
echo "stress: $passed of $((passed + failed)) runs passed under load ($TIMING_RUNS of the timing tests, $SUITE_RUNS of the whole suite; $(nproc) cores, 2 spinning)"
[ "$failed" -eq 0 ]
