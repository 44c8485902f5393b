"""kernels/fast_launch.py: a launch that skips Triton's binding hands the compiled kernel exactly what
Triton's own ``JITFunction.run`` hands it, and a new specialisation (here: a misaligned tensor) goes
back through Triton. Real launches need compiled kernels, so the check runs in a subprocess without
the interpreter, with the host benchmark's stand-in for a GPU (a fake sm_90 driver whose compiled
kernels record their launches instead of running), and with the replay of recorded calls (kernels/replay.py,
tested in test_launch_replay.py) switched off, so that every call goes through the launchers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tests.helpers import REPO

PROBE = textwrap.dedent("""
    import json, sys
    import torch
    from triton.compiler import CompiledKernel
    from bench import host
    from vicinity_attn import knn_attention, vicinity_attention
    from vicinity_attn.kernels import fast_launch

    records = []

    def describe(a):
        if isinstance(a, torch.Tensor):
            return ["tensor", str(a.dtype), list(a.shape), list(a.stride()), a.data_ptr() % 16]
        return repr(a)

    no_launch = host._no_launch

    def recording_no_launch():
        kernel = no_launch()
        kernel._run = lambda g0, g1, g2, stream, fn, meta, launch_meta, enter, exit_, *args: records.append(
            [g0, g1, g2] + [describe(a) for a in args])
        return kernel

    host._no_launch = recording_no_launch
    direct = []
    getitem = CompiledKernel.__getitem__

    def counting_getitem(self, grid):      # only the shortcut launches through CompiledKernel[grid]
        direct.append(grid)
        return getitem(self, grid)

    CompiledKernel.__getitem__ = counting_getitem
    torch.manual_seed(0)

    def call(offset):
        # B=2 H=3 on a 6x5 grid with one prefix token, bf16: a state pass, the output pass, and backward.
        base = [torch.randn(2 * 3 * 31 * 32 + offset, dtype=torch.bfloat16) for _ in range(3)]
        q, k, v = (t[offset:].view(2, 3, 31, 32).requires_grad_() for t in base)
        o = vicinity_attention(q, k, v, (6, 5), num_prefix_tokens=1, backend="triton")
        torch.autograd.grad(o, (q, k, v), torch.randn_like(o))
        qkv = [t.detach().requires_grad_() for t in (q, k, v)]
        o = knn_attention(*qkv, topk=9, backend="triton")
        torch.autograd.grad(o, qkv, torch.randn_like(o))

    result = {}
    with host.stubbed_launches():
        for name, offset in (("first", 0), ("second", 0), ("misaligned", 1), ("misaligned_again", 1)):
            records.clear(); direct.clear()
            call(offset)
            result[name] = {"records": list(records), "direct": len(direct), "kept": len(fast_launch._compiled)}
    json.dump(result, sys.stdout)
""")


def run_probe() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["VICINITY_ATTN_LAUNCH_REPLAY"] = "0"
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_shortcut_launches_what_triton_launches():
    result = run_probe()
    first, second = result["first"], result["second"]
    assert first["direct"] == 0 and first["kept"] > 0           # first calls: all through JITFunction.run
    n = len(first["records"])
    assert n >= 4 and second["direct"] == n                      # second: every launch took the shortcut
    assert second["kept"] == first["kept"]
    # Same kernels, grids and arguments (tensors compared by dtype, shape, strides, alignment).
    assert second["records"] == first["records"]


def test_new_alignment_goes_back_through_triton():
    result = run_probe()
    first, misaligned, again = result["first"], result["misaligned"], result["misaligned_again"]
    # q, k, v now start 2 bytes past a 16-byte boundary: the launches reading them are new specialisations.
    assert any(rec[3:] != first_rec[3:] for rec, first_rec in zip(misaligned["records"], first["records"]))
    assert misaligned["kept"] > first["kept"]
    assert misaligned["direct"] < len(misaligned["records"])
    assert again["direct"] == len(again["records"]) and again["records"] == misaligned["records"]
