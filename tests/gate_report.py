"""The compile gate's quick matrix (every operation), run once per test session and shared by
tests/test_compile_gate.py (vicinity kernels, report format) and tests/test_knn_gate.py (k-NN kernels).

The gate runs in a child process without TRITON_INTERPRET (the conftest sets it, and interpreted
kernels have no specialisation).
"""
import functools
import json
import os
import subprocess
import sys
import tempfile


@functools.lru_cache(maxsize=None)
def quick_gate_report() -> tuple[dict, str]:
    """(the JSON report of ``compile_gate --quick``, its stdout + stderr)."""
    out = os.path.join(tempfile.mkdtemp(prefix="quick_gate_"), "gate.json")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "vicinity_attn.tools.compile_gate", "--quick", "--json", out],
                          env=env, capture_output=True, text=True, timeout=1200)
    log = proc.stdout + proc.stderr
    assert proc.returncode in (0, 1) and os.path.exists(out), log[-6000:]
    with open(out) as f:
        return json.load(f), log


def kernels_of(report: dict, op: str) -> list[dict]:
    """The report's kernels that cases of operation ``op`` launch ("vicinity" includes the clamp cases)."""
    return [k for k in report["kernels"] if any(c.split(" ", 1)[0].startswith(op) for c in k["cases"])]
