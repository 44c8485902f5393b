"""torch.autocast: the op runs in the autocast dtype with fp32 accumulation, and backward works.

Only CPU bf16 can run here; the CUDA fp16 / bf16 path is the same code (the device type and dtype
come from ``torch.get_autocast_dtype(q.device.type)``).
"""
from __future__ import annotations

import pytest
import torch

from helpers import FLOOR, rel_err
from vicinity_attn import VicinityAttention, vicinity_attention

GRID, KV_GRID = (5, 6), (3, 4)


def _inputs(B=2, H=2, D=16, Dv=8, layout="bhnd"):
    nq, nk = 30, 12

    def one(n, d):
        shape = (B, H, n, d) if layout == "bhnd" else (B, n, H, d)
        return torch.randn(shape, dtype=torch.float32, requires_grad=True)
    return one(nq, D), one(nk, D), one(nk, Dv)


def _need_backend(backend):
    if backend == "triton":
        pytest.importorskip("vicinity_attn.triton_backend", reason="triton backend not built yet")


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_cpu_bf16_autocast_tolerance_rule(backend):
    """Forward and grads under autocast against the float64 reference on the same (bf16-rounded)
    inputs: error <= 2x the error of the plain bf16 computation + floor (DESIGN.md section 4)."""
    _need_backend(backend)
    q, k, v = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vicinity_attention(q, k, v, GRID, KV_GRID, backend=backend)
    assert out.dtype == torch.bfloat16
    do = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), do.to(out.dtype))
    assert all(g.dtype == torch.float32 for g in grads)  # gradients come back in the inputs' dtype

    # The reference in float64 on the inputs autocast actually used (the bf16-rounded ones).
    r64 = [t.detach().to(torch.bfloat16).double().requires_grad_(True) for t in (q, k, v)]
    ref = vicinity_attention(*r64, GRID, KV_GRID, backend="reference")
    ref_all = [ref, *torch.autograd.grad(ref, r64, do)]
    lp = [t.detach().to(torch.bfloat16).requires_grad_(True) for t in (q, k, v)]
    plain = vicinity_attention(*lp, GRID, KV_GRID, backend="reference")
    plain_all = [plain, *torch.autograd.grad(plain, lp, do.to(torch.bfloat16))]
    for name, got, r, p in zip(("out", "dq", "dk", "dv"), [out, *grads], ref_all, plain_all):
        err, allowed = rel_err(got, r), 2 * rel_err(p, r) + FLOOR[torch.bfloat16]
        assert err <= allowed, f"{name}: error {err:.3e} > allowed {allowed:.3e}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_accumulates_in_fp32(backend):
    """Autocast must not leak into the backend's fp32 accumulations: the result equals, bit for bit,
    the same backend called outside autocast on bf16 inputs (whose states are fp32 by design). If
    autocast re-cast the internal matmuls to bf16, the two would differ."""
    _need_backend(backend)
    q, k, v = _inputs(layout="bnhd")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vicinity_attention(q, k, v, GRID, KV_GRID, layout="bnhd", backend=backend)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    lp = [t.detach().to(torch.bfloat16).requires_grad_(True) for t in (q, k, v)]
    plain = vicinity_attention(*lp, GRID, KV_GRID, layout="bnhd", backend=backend)
    plain_grads = torch.autograd.grad(plain, lp, do)
    assert torch.equal(out, plain)
    for g, p in zip(grads, plain_grads):
        assert torch.equal(g, p.float())


def test_autocast_leaves_float64_alone():
    q, k, v = (t.detach().double().requires_grad_(True) for t in _inputs())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vicinity_attention(q, k, v, GRID, KV_GRID, backend="torch")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, vicinity_attention(q, k, v, GRID, KV_GRID, backend="reference"))


def test_module_trains_under_autocast():
    """VicinityAttention in a bf16 autocast region: bf16 output, fp32 parameter gradients, close to
    the fp32 module (bf16 tolerance)."""
    module = VicinityAttention(32, 2, sr_ratio=2, backend="torch")
    x = torch.randn(2, 6 * 8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x, 6, 8)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    module.zero_grad()
    ref = module(x, 6, 8)
    assert rel_err(out, ref) < 3e-2
    ref.square().sum().backward()
    for n, p in module.named_parameters():
        assert rel_err(grads[n], p.grad) < 1e-1, n


def test_autocast_inside_torch_compile():
    """The autocast handling traces too: compiled (fullgraph) under autocast equals eager under autocast."""
    torch._dynamo.reset()
    module = VicinityAttention(16, 2, backend="torch")
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 24, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = compiled(x, 4, 6), module(x, 4, 6)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
