#!/usr/bin/env bash
# The test suite from a fresh clone: set up what it needs (bench/venv.sh), then run pytest on tests/
# (extra arguments go to pytest) and, beside it, the side legs: the triton-3.6 check
# (tests/run_triton36.sh) and then, once it is done, the integration tests against the real timm and
# diffusers in their own environment (tests/run_integrations.sh; VICINITY_SKIP_INTEGRATIONS=1 skips it).
# The side legs run one after the other in the background while the main suite runs: on a 2-core
# machine the main suite (single-threaded Triton interpreter, mostly) and one side leg share the cores;
# three at once would slow the main suite. Their output is printed after the main suite's; the script
# fails if any leg fails.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/venv.sh test
side=""
logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
legs=()
[ -f tests/run_triton36.sh ] && legs+=("triton 3.6 leg (tests/run_triton36.sh):tests/run_triton36.sh")
if [ -f tests/run_integrations.sh ] && [ "${VICINITY_SKIP_INTEGRATIONS:-0}" != 1 ]; then
    legs+=("integrations leg (tests/run_integrations.sh):tests/run_integrations.sh")
fi
if [ "${#legs[@]}" -gt 0 ]; then
    (
        i=0
        for leg in "${legs[@]}"; do
            # One intra-op thread for a side leg, so that it and the main suite do not oversubscribe the cores.
            rc=0
            OMP_NUM_THREADS=1 PYTHON="$VPY" bash "${leg#*:}" >"$logs/$i.log" 2>&1 || rc=$?
            echo "$rc" >"$logs/$i.rc"
            i=$((i + 1))
        done
    ) &
    side=$!
fi
rc=0
"$VPY" -m pytest tests -q "$@" || rc=$?
if [ -n "$side" ]; then
    wait "$side" || true
    i=0
    for leg in "${legs[@]}"; do
        leg_rc="$(cat "$logs/$i.rc" 2>/dev/null || echo 1)"
        echo "== ${leg%%:*}, exit status $leg_rc =="
        cat "$logs/$i.log" 2>/dev/null || true
        [ "$leg_rc" -eq 0 ] || rc=$leg_rc
        i=$((i + 1))
    done
fi
exit "$rc"
