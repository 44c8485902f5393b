#!/usr/bin/env bash
# The test suite from a fresh clone: set up what it needs (bench/venv.sh), then run pytest on tests/
# (extra arguments go to pytest) and, beside it, the triton-3.6 check where tests/run_triton36.sh
# exists. The two run concurrently: both are dominated by the single-threaded Triton interpreter, so
# on a 2-core machine this takes the 3.6 leg (~4 min alone) mostly off the critical path. Its output
# is printed after the main suite's; the script fails if either fails.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/venv.sh test
leg36=""
if [ -f tests/run_triton36.sh ]; then
    log36="$(mktemp)"
    trap 'rm -f "$log36"' EXIT
    # One intra-op thread for the side leg, so the two legs do not oversubscribe the cores.
    OMP_NUM_THREADS=1 PYTHON="$VPY" bash tests/run_triton36.sh >"$log36" 2>&1 &
    leg36=$!
fi
rc=0
"$VPY" -m pytest tests -q "$@" || rc=$?
if [ -n "$leg36" ]; then
    rc36=0
    wait "$leg36" || rc36=$?
    echo "== triton 3.6 leg (tests/run_triton36.sh), exit status $rc36 =="
    cat "$log36"
    [ "$rc36" -eq 0 ] || rc=$rc36
fi
exit "$rc"
