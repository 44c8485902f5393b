"""The VVT layer's abs_clamp (a fused autograd.Function) against the authors' form as plain autograd
(vicinity_attn.vicinity.reference.abs_clamp): values, gradients and forward-mode tangents bitwise equal,
NaN / inf / zeros / values on the bounds included, for every dtype."""
from __future__ import annotations

import pytest
import torch
from torch.func import jvp, vmap

from vicinity_attn.layers.vvt import abs_clamp
from vicinity_attn.vicinity.reference import abs_clamp as authors_abs_clamp

SPECIAL = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-4, -1e-4, 1e4, -1e4]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def inputs(dtype: torch.dtype, lo: float, hi: float):
    torch.manual_seed(3)
    scales = 10.0 ** torch.randint(-7, 7, (2000,)).double()
    t = torch.cat([torch.randn(2000, dtype=torch.float64) * scales,
                   torch.tensor(SPECIAL + [lo, hi, -lo, -hi], dtype=torch.float64)]).to(dtype)
    grad = torch.randn(t.shape, dtype=dtype)
    grad[::7], grad[3::11] = float("nan"), float("inf")
    return t, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lo, hi", [(1e-4, 1e4), (1e-3, 2.0), (0.0, 1e4), (-1.0, 3.0)])
def test_matches_the_authors_form(dtype, lo, hi):
    t, grad = inputs(dtype, lo, hi)
    leaf_a, leaf_b = t.clone().requires_grad_(), t.clone().requires_grad_()
    out, want = abs_clamp(leaf_a, lo, hi), authors_abs_clamp(leaf_b, (lo, hi))
    assert same(out, want)
    (g_out,), (g_want,) = torch.autograd.grad(out, leaf_a, grad), torch.autograd.grad(want, leaf_b, grad)
    assert same(g_out, g_want)
    tangent = torch.randn_like(t)
    tangent[::5] = float("nan")
    assert same(jvp(lambda x: abs_clamp(x, lo, hi), (t,), (tangent,))[1],
                jvp(lambda x: authors_abs_clamp(x, (lo, hi)), (t,), (tangent,))[1])
    assert same(vmap(lambda x: abs_clamp(x, lo, hi))(t.view(-1, 3)).view(-1), want.detach())


def test_compiles_to_the_same_values():
    t, _ = inputs(torch.float32, 1e-4, 1e4)
    compiled = torch.compile(abs_clamp, backend="aot_eager", fullgraph=True)
    assert same(compiled(t), authors_abs_clamp(t, (1e-4, 1e4)))
