# Creates (or reuses) the project's virtual environment and installs what is missing in it.
# Sourced by bench/run.sh and tests/run.sh:  source bench/venv.sh EXTRA   (EXTRA: bench or test)
# Afterwards $VPY is the environment's python.
#
# Where it lives: $VICINITY_VENV, default .venv in the repository root. $VICINITY_PYTHON instead
# names an interpreter to use as it is, with no virtual environment (e.g. a machine whose torch is
# preinstalled and which cannot install packages); what is missing is still installed into it.
# torch, when missing: with an NVIDIA GPU (nvidia-smi lists one) the default build from PyPI, a CUDA
# build; without one the CPU build of torch 2.13.0 (this project's machines keep its wheel on disk,
# which pip takes; elsewhere it comes from PyTorch's CPU index), so no multi-GB CUDA build is
# downloaded on a machine that cannot use it. $VICINITY_TORCH overrides the requirement.
# Then triton 3.9.0 on Linux without a GPU (the version the interpreter tests were written for) and
# the package itself, editable, with the extra's dependencies.
extra="${1:?usage: source bench/venv.sh bench|test}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ -n "${VICINITY_PYTHON:-}" ]; then
    VPY="$VICINITY_PYTHON"
else
    venv="${VICINITY_VENV:-$repo/.venv}"
    if [ ! -x "$venv/bin/python" ]; then
        echo "setup: creating the virtual environment $venv" >&2
        "${PYTHON:-python3}" -m venv "$venv"
    fi
    VPY="$venv/bin/python"
fi
gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then gpu=1; fi
# What is missing, in one interpreter start (-I: the current directory must not stand in for the
# installed package).
missing="$("$VPY" -I - "$repo" "$extra" <<'PY' 2>/dev/null
import importlib.util, os, sys
repo, extra = sys.argv[1], sys.argv[2]
found = lambda m: importlib.util.find_spec(m) is not None
missing = [m for m in ("torch", "triton") if not found(m)]
spec = importlib.util.find_spec("vicinity_attn")
mods = {"test": ["pytest", "pytest_benchmark", "numpy", "matplotlib", "ruff"], "bench": ["matplotlib", "pytest_benchmark", "numpy"]}[extra]
if (spec is None or not os.path.realpath(spec.origin).startswith(os.path.realpath(repo) + os.sep)
        or not all(found(m) for m in mods)):
    missing.append("package")
print(" ".join(missing))
PY
)" || missing="torch triton package"
case " $missing " in *" torch "*)
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
    fi;;
esac
case " $missing " in *" triton "*)
    if [ "$gpu" = 0 ] && [ "$(uname -s)" = Linux ]; then
        echo "setup: installing triton==3.9.0" >&2
        "$VPY" -m pip install -q "triton==3.9.0"
    fi;;
esac
case " $missing " in *" package "*)
    echo "setup: installing vicinity_attn[$extra] (editable) from $repo" >&2
    "$VPY" -m pip install -q -e "$repo[$extra]";;
esac
