"""The first eager call does not import torch._dynamo (about a second on a small CPU): checked in a
fresh interpreter, by what is imported, not by time."""
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys, torch
from vicinity_attn import vicinity_attention
q, k, v = (torch.randn(1, 2, 12, 8, requires_grad=True) for _ in range(3))
vicinity_attention(q, k, v, (3, 4), backend="torch").sum().backward()
print("dynamo imported:", "torch._dynamo" in sys.modules)
"""


def test_first_eager_call_does_not_import_dynamo():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert "dynamo imported: False" in out.stdout, out.stdout + out.stderr
