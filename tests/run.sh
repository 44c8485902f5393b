#!/usr/bin/env bash
# The test suite from a fresh clone: set up what it needs (bench/venv.sh), then run pytest on tests/
# (extra arguments go to pytest), then the triton-3.6 check where tests/run_triton36.sh exists.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/venv.sh test
"$VPY" -m pytest tests -q "$@"
if [ -f tests/run_triton36.sh ]; then PYTHON="$VPY" bash tests/run_triton36.sh; fi
