"""The k-NN kernels' AOT compile gate (vicinity_attn.tools.knn_gate) on its covering subset: no GPU
needed. The full matrix is the CLI default: ``python -m vicinity_attn.tools.knn_gate``."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_knn_gate_quick_matrix_compiles_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "vicinity_attn.tools.knn_gate", "--quick"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("knn_")]
    assert len(rows) == 8 * 2 * 3, proc.stdout[-3000:]
    assert all(line.endswith(" ok") for line in rows)
    for arch in ("sm_80 ", "sm_90a"):
        dot_rows = [r for r in rows if arch in r and not r.startswith("knn_delta")]
        assert dot_rows and all(("HMMA" in r or "HGMMA" in r) for r in dot_rows)
