"""The code is clean under the project's ruff configuration (pyproject.toml, [tool.ruff])."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO


def test_ruff_clean():
    pytest.importorskip("ruff", reason="ruff is in the test extra: pip install -e '.[test]'")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
