#!/usr/bin/env bash
# The triton-backend tests under triton 3.6.0, the version the lent GPU machines ship (the package
# supports triton >= 3.6). Uses the current python environment (already holding torch and this
# package) through a throwaway venv with --system-site-packages, into which only triton 3.6.0 goes.
#
#   tests/run_triton36.sh [pytest args]        (PYTHON=... picks the interpreter; default: python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

"$PY" -m venv --system-site-packages "$tmp/venv"
venv_py="$tmp/venv/bin/python"
site="$("$venv_py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# When the current python is itself a venv, --system-site-packages reaches the base interpreter, not
# this environment: append this environment's site directories (after the new venv's own, so the
# triton installed below wins; addsitedir also runs their .pth files, e.g. an editable install).
"$PY" - "$site/parent_env.pth" <<'PYEOF'
import site, sys
if sys.prefix != sys.base_prefix:
    dirs = [d for d in site.getsitepackages() if d.startswith(sys.prefix)]
    with open(sys.argv[1], "w") as f:
        f.write("".join(f"import site; site.addsitedir({d!r})\n" for d in dirs))
PYEOF

"$venv_py" -m pip install -q --disable-pip-version-check --no-deps "triton==3.6.0"
"$venv_py" - <<'PYEOF'
import triton, torch, vicinity_attn
assert triton.__version__ == "3.6.0", triton.__version__
print(f"triton {triton.__version__} (from {triton.__file__}), torch {torch.__version__}, "
      f"vicinity_attn from {vicinity_attn.__file__}")
PYEOF
# Default: every triton-backend test, of the GPU-numerics file the emulation checks plus its hardest
# realistic case (fp16, sigma 0.03), the k-NN triton tests (kernels, autograd modes; ~20 s), the
# fast-launch and launch-replay checks (Triton's CompiledKernel interface under 3.6), the elected chunk
# reduction (atomics with memory semantics in 3.6's interpreter), the resident passes' persistent loops and
# the frame-causal kernels (~1 min): ~6 min in all on 2 cores. Arguments replace the default.
if [ "$#" -eq 0 ]; then
    set -- tests/vicinity/test_triton_backend.py tests/vicinity/test_gpu_numerics.py tests/knn/test_backends.py tests/knn/test_autograd_modes.py \
        tests/common/test_fast_launch.py tests/common/test_launch_replay.py tests/vicinity/test_chunk_election.py tests/vicinity/test_resident_passes.py \
        tests/vicinity/test_causal_triton.py \
        -k "not knn and (not realistic_scales or 0.03-fp16) or knn and triton"
fi
"$venv_py" -m pytest -q -p no:cacheprovider "$@"
