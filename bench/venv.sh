# Creates (or reuses) the project's virtual environment and installs what is missing in it.
# Sourced by bench/run.sh and tests/run.sh:  source bench/venv.sh EXTRA   (EXTRA: bench or test)
# Afterwards $VPY is the environment's python.
#
# Where it lives: $VICINITY_VENV, default .venv in the repository root. It is created with
# --system-site-packages, so a torch already installed system-wide (e.g. on a GPU machine) is reused.
# torch, when missing: with an NVIDIA GPU (nvidia-smi lists one) the default build from PyPI, a CUDA
# build; without one the CPU build of torch 2.13.0 (this project's machines keep its wheel on disk,
# which pip takes; elsewhere it comes from PyTorch's CPU index), so no multi-GB CUDA build is
# downloaded on a machine that cannot use it. $VICINITY_TORCH overrides the requirement.
# Then triton 3.9.0 on Linux without a GPU (the version the interpreter tests were written for) and
# the package itself, editable, with the extra's dependencies.
extra="${1:?usage: source bench/venv.sh bench|test}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VICINITY_VENV:-$repo/.venv}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating the virtual environment $venv" >&2
    "${PYTHON:-python3}" -m venv --system-site-packages "$venv"
fi
VPY="$venv/bin/python"
gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then gpu=1; fi
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    if [ -n "${VICINITY_TORCH:-}" ]; then
        echo "setup: installing $VICINITY_TORCH" >&2
        "$VPY" -m pip install -q "$VICINITY_TORCH"
    elif [ "$gpu" = 1 ]; then
        echo "setup: NVIDIA GPU found: installing torch (a CUDA build)" >&2
        "$VPY" -m pip install -q torch
    else
        echo "setup: no GPU: installing the CPU build torch==2.13.0" >&2
        # The wheel on disk first (no index: PyPI's Linux wheel of the same version is a CUDA build),
        # then its dependencies; where no such wheel lies, PyTorch's CPU index.
        { "$VPY" -m pip install -q --no-index --no-deps "torch==2.13.0" >/dev/null 2>&1 \
            && "$VPY" -m pip install -q "torch==2.13.0"; } \
            || "$VPY" -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
    fi
fi
if [ "$gpu" = 0 ] && [ "$(uname -s)" = Linux ] && ! "$VPY" -c "import triton" >/dev/null 2>&1; then
    echo "setup: installing triton==3.9.0" >&2
    "$VPY" -m pip install -q "triton==3.9.0"
fi
# The package (editable, from this checkout) and the extra's modules: installed only when missing.
if ! "$VPY" - "$repo" "$extra" <<'PY' >/dev/null 2>&1
import importlib.util, os, sys
repo, extra = sys.argv[1], sys.argv[2]
import vicinity_attn
assert os.path.realpath(vicinity_attn.__file__).startswith(os.path.realpath(repo) + os.sep)
needed = {"test": ["pytest", "pytest_benchmark", "numpy"], "bench": ["matplotlib", "pytest_benchmark", "numpy"]}[extra]
assert all(importlib.util.find_spec(m) for m in needed)
PY
then
    echo "setup: installing vicinity_attn[$extra] (editable) from $repo" >&2
    "$VPY" -m pip install -q -e "$repo[$extra]"
fi
