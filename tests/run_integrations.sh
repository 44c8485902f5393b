#!/usr/bin/env bash
# The integration tests (tests/integrations) against the real timm and diffusers, in a side environment:
# timm imports torchvision, which installs only as 0.29.1 with torch 2.14.1 here (a CUDA build that runs
# on the CPU, ~5.5 GB, from the machine's local package files), not beside the main environment's CPU
# torch. Creates (or reuses) the virtual environment $VICINITY_INTEGRATIONS_VENV (default
# .venv-integrations in the repository root), installs what is missing there (pinned versions, the
# package itself editable), then runs pytest on tests/integrations (arguments replace that default).
#
#   tests/run_integrations.sh [pytest args]        (PYTHON=... picks the interpreter that makes the venv)
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
venv="${VICINITY_INTEGRATIONS_VENV:-$PWD/.venv-integrations}"
# The versions the tests were written against; torch's own dependencies (triton 3.8 among them) follow it.
REQUIREMENTS=("torch==2.14.1" "torchvision==0.29.1" "timm==1.0.31" "diffusers==0.42.1" "pytest" "numpy")
start=$SECONDS
if [ ! -x "$venv/bin/python" ]; then
    echo "integrations: creating the virtual environment $venv"
    "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
# What is missing, in one interpreter start (-I: the current directory must not stand in for the package).
missing="$("$py" -I - "$PWD" "${REQUIREMENTS[@]}" <<'PY' 2>/dev/null
import importlib.metadata as md, importlib.util, os, sys
repo, reqs = sys.argv[1], sys.argv[2:]
def have(req):
    name, _, version = req.partition("==")
    try:
        installed = md.version(name)
    except md.PackageNotFoundError:
        return False
    return not version or installed.split("+")[0] == version
missing = [r for r in reqs if not have(r)]
spec = importlib.util.find_spec("vicinity_attn")
if spec is None or not os.path.realpath(spec.origin).startswith(os.path.realpath(repo) + os.sep):
    missing.append("package")
print(" ".join(missing))
PY
)" || missing="${REQUIREMENTS[*]} package"
deps=(); pkg=0
for m in $missing; do if [ "$m" = package ]; then pkg=1; else deps+=("$m"); fi; done
if [ "${#deps[@]}" -gt 0 ]; then
    echo "integrations: installing ${deps[*]}"
    "$py" -m pip install -q "${deps[@]}" 2>&1 | grep -v "^WARNING: Location" || true
    "$py" -c "import timm, diffusers, torchvision, pytest" # fail here, clearly, if the install did not work
fi
if [ "$pkg" = 1 ]; then
    echo "integrations: installing vicinity_attn (editable, no dependencies) from $PWD"
    "$py" -m pip install -q --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
fi
"$py" - "$((SECONDS - start))" <<'PY'
import sys
import diffusers, timm, torch, torchvision, triton, vicinity_attn
print(f"integrations: setup {sys.argv[1]} s; torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"timm {timm.__version__}, diffusers {diffusers.__version__}, triton {triton.__version__}; "
      f"vicinity_attn from {vicinity_attn.__file__}")
PY
[ "$#" -eq 0 ] && set -- tests/integrations
exec "$py" -m pytest -q -p no:cacheprovider "$@"
