#!/usr/bin/env bash
# The main job from a fresh clone: set up what it needs (bench/venv.sh), then run the quick benchmark,
# which prints the table and writes bench_results/quick-<device>.json and .png.
# Extra arguments go to `python -m bench` (e.g. --model, or --help).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/venv.sh bench
if [ $# -eq 0 ]; then set -- --quick; fi
exec "$VPY" -m bench "$@"
