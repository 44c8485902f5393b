"""The wheel: built from the checkout, installed into a fresh environment (which sees this environment's
torch, triton and numpy but not its install of this project), and used from there, away from the source tree:
the README's quick start runs, and a triton-backend call through the interpreter matches the reference.
A wheel without the kernels, or a package folder missing from pyproject.toml's list, fails here."""
from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO

TRITON_CALL = """
import torch, vicinity_attn, vicinity_attn.kernels
from pathlib import Path
installed = Path(vicinity_attn.__file__).resolve().parent
assert Path(vicinity_attn.kernels.__file__).resolve().parent == installed / "kernels", vicinity_attn.kernels.__file__
torch.manual_seed(0)
q, k, v = (torch.randn(2, 2, 36, 16) for _ in range(3))
o = vicinity_attn.vicinity_attention(q, k, v, grid=(6, 6), backend="triton")
ref = vicinity_attn.vicinity_attention(q.double(), k.double(), v.double(), grid=(6, 6), backend="reference")
err = ((o.double() - ref).abs().max() / ref.abs().max()).item()
assert err < 1e-5, err
print("triton call from", installed, "version", vicinity_attn.__version__, "rel err", err)
"""


def _package_folders() -> set[str]:
    """Every package folder of the checkout, named as installed."""
    names = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "vicinity_attn").rglob("__init__.py")}
    names |= {".".join(("vicinity_attn",) + p.parent.relative_to(REPO).parts)
              for p in (REPO / "kernels").rglob("__init__.py")}
    return {n for n in names if "__pycache__" not in n}


def _quick_start() -> str:
    """The README's first Python block that uses the package."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), flags=re.S)
    uses = [b for b in blocks if "vicinity_attn" in b]
    assert uses, "README.md has no ```python block that uses vicinity_attn"
    return uses[0]


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    # Built from a copy of the files git knows (no stale build/ folder can fill in what the list misses).
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (tmp / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tmp / "src" / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"),
                            str(tmp / "src")],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (tmp / "dist").glob("vicinity_attn-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(tmp / "venv")], check=True, timeout=300)
    py = tmp / "venv" / "bin" / "python"
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # Plain path lines: this environment's packages become importable, but its .pth files (the editable
    # install of this checkout among them) are not run.
    parents = [p for p in {sysconfig.get_paths()["purelib"], *site.getsitepackages()} if os.path.isdir(p)]
    Path(purelib, "parent_packages.pth").write_text("".join(p + "\n" for p in parents))
    install = subprocess.run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    return wheel, py, tmp


def _run(py, code: str, cwd, interpret: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([py, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_wheel_holds_every_package_and_the_kernels(wheel_env):
    wheel, _, _ = wheel_env
    names = zipfile.ZipFile(wheel).namelist()
    folders = {n.rsplit("/", 1)[0].replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert folders == _package_folders()
    assert "vicinity_attn/kernels/vicinity/__init__.py" in names
    assert any(n.endswith("LICENSE") for n in names)


def test_quick_start_and_triton_call_from_the_installed_wheel(wheel_env):
    _, py, tmp = wheel_env
    where = _run(py, "import vicinity_attn; print(vicinity_attn.__file__)", tmp, interpret=False)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).resolve().is_relative_to(tmp / "venv"), where.stdout
    quick = _run(py, _quick_start(), tmp, interpret=False)
    assert quick.returncode == 0, quick.stdout + quick.stderr
    call = _run(py, TRITON_CALL, tmp, interpret=True)
    assert call.returncode == 0, call.stdout + call.stderr
    assert "rel err" in call.stdout
