"""The first eager call does not import torch._dynamo (about a second on a small CPU): checked in a
fresh interpreter, by what is imported, not by time, for both operations' public functions and for
their custom ops called directly (the path torch function modes and subclasses take)."""
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys, torch
from vicinity_attn import knn_attention, vicinity_attention
from vicinity_attn.knn import ops as knn_ops
from vicinity_attn.vicinity import ops
q, k, v = (torch.randn(1, 2, 12, 8, requires_grad=True) for _ in range(3))
vicinity_attention(q, k, v, (3, 4), backend="torch").sum().backward()
knn_attention(q, k, v, 5, backend="torch").sum().backward()
spec = ops._spec((3, 4), (3, 4), "sum", "relu", 1e-4, 0, 0.0, (), "")
ops.FORWARD_OPS["torch"](q, k, v, *ops.spec_args(spec))[0].sum().backward()
knn_ops.FORWARD_OPS["torch"](q, k, v, 5, 0.3)[0].sum().backward()
print("dynamo imported:", "torch._dynamo" in sys.modules)
"""


def test_first_eager_calls_do_not_import_dynamo():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert "dynamo imported: False" in out.stdout, out.stdout + out.stderr
