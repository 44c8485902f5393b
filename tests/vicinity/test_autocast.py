"""torch.autocast: the op runs in the autocast dtype with fp32 accumulation, and backward works.

Only CPU bf16 can run here; the CUDA fp16 / bf16 path is the same code (the device type and dtype
come from ``torch.get_autocast_dtype(q.device.type)``).
"""
from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import assert_rule, make_inputs, token_counts
from vicinity_attn import VicinityAttention, vicinity_attention

GRID, KV_GRID = (5, 6), (3, 4)


def _inputs(layout="bhnd"):
    """fp32 q [2, 2, 30, 16], k [2, 2, 12, 16], v [2, 2, 12, 8] (or bnhd) requiring grad."""
    Nq, Nk = token_counts(GRID, KV_GRID)
    return make_inputs(2, 2, Nq, Nk, 16, 8, dtype=torch.float32, layout=layout)


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_autocast_dtypes(backend):
    """Under CPU bf16 autocast: bf16 output, gradients in the inputs' dtype (fp32), every backend."""
    q, k, v = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vicinity_attention(q, k, v, GRID, KV_GRID, backend=backend)
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert all(g.dtype == torch.float32 for g in grads)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cpu_bf16_autocast_tolerance_rule(backend):
    """Forward and grads under autocast against the float64 reference on the same (bf16-rounded)
    inputs: error <= 2x the error of the plain bf16 computation + floor (the tolerance rule).
    (The reference backend under autocast *is* the plain computation, so it is not compared here.)"""
    q, k, v = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vicinity_attention(q, k, v, GRID, KV_GRID, backend=backend)
    do = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), do.to(out.dtype))

    # The reference in float64 on the inputs autocast actually used (the bf16-rounded ones).
    r64 = [t.detach().to(torch.bfloat16).double().requires_grad_(True) for t in (q, k, v)]
    ref = vicinity_attention(*r64, GRID, KV_GRID, backend="reference")
    ref_all = [ref, *torch.autograd.grad(ref, r64, do)]
    lp = [t.detach().to(torch.bfloat16).requires_grad_(True) for t in (q, k, v)]
    plain = vicinity_attention(*lp, GRID, KV_GRID, backend="reference")
    plain_all = [plain, *torch.autograd.grad(plain, lp, do.to(torch.bfloat16))]
    for name, got, r, p in zip(("out", "dq", "dk", "dv"), [out, *grads], ref_all, plain_all):
        assert_rule(name, got, r, p, torch.bfloat16)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_accumulates_in_fp32(backend):
    """Autocast must not leak into the backend's fp32 accumulations: the result equals, bit for bit,
    the same backend called outside autocast on bf16 inputs (whose states are fp32 by design). If
    autocast re-cast the internal matmuls to bf16, the two would differ."""
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
    """VicinityAttention in a bf16 autocast region: bf16 output and fp32 parameter gradients that meet
    the tolerance rule against the float64 module (reference backend), the plain computation being
    the same module under autocast with the reference attention."""
    module = VicinityAttention(32, 2, sr_ratio=2, backend="torch")
    x = torch.randn(2, 6 * 8, 32)

    def run(m: VicinityAttention, inp: torch.Tensor, backend: str, autocast: bool) -> list[torch.Tensor]:
        m.backend = backend
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = m(inp, 6, 8)
        out.to(inp.dtype).square().sum().backward()
        return [out.detach(), *(p.grad.clone() for p in m.parameters())]

    got = run(module, x, "torch", True)
    assert got[0].dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in got[1:])
    plain = run(module, x, "reference", True)
    ref = run(copy.deepcopy(module).double(), x.double(), "reference", False)
    names = ["out", *(n for n, _ in module.named_parameters())]
    for name, g, r, p in zip(names, got, ref, plain, strict=True):
        assert_rule(name, g, r, p, torch.bfloat16)


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
