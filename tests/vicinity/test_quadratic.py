"""The torch backend's exact quadratic form for small CPU calls (vicinity/quadratic.py): the cost rule,
the dispatch, and results against the float64 reference by the tolerance rule, gradients included."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_rule, make_inputs, token_counts
from vicinity_attn import vicinity_attention
from vicinity_attn.common.spec import VicinitySpec
from vicinity_attn.vicinity import quadratic

pytestmark = pytest.mark.quadratic_form

CASES = [  # (grid, kv_grid, options)
    ((4, 5), None, dict()),
    ((3, 4), (2, 3), dict(variant="product", num_prefix_tokens=1)),
    ((5,), None, dict(variant="none", feature_map="elu1")),
    ((3, 4), (2, 2), dict(feature_map="identity", num_prefix_tokens=1)),
    ((2, 3, 2), None, dict(den_floor=3.0)),
    ((3, 3), (3, 2), dict(num_prefix_tokens=2, den_floor=0.5, eps=1e-3)),
]


def _grad_fn_name(o: torch.Tensor) -> str:
    return type(o.grad_fn).__name__


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_the_reference(case, dtype):
    grid, kv_grid, opts = CASES[case]
    Nq, Nk = token_counts(grid, kv_grid, opts.get("num_prefix_tokens", 0))
    q, k, v = make_inputs(2, 3, Nq, Nk, 8, 6, dtype=dtype, feature_map=opts.get("feature_map"))
    with torch.no_grad():
        for t in (q, k, v):
            t.mul_(1.7)        # some rows under den_floor, some over
    o = vicinity_attention(q, k, v, grid, kv_grid, backend="torch", **opts)
    assert _grad_fn_name(o).startswith("_EagerQuadratic")
    do = torch.randn_like(o)
    got = (o, *torch.autograd.grad(o, (q, k, v), do))
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_o = vicinity_attention(*ref_in, grid, kv_grid, backend="reference", **opts)
    ref = (ref_o, *torch.autograd.grad(ref_o, ref_in, do.double()))
    plain_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    plain_o = vicinity_attention(*plain_in, grid, kv_grid, backend="reference", **opts)
    plain = (plain_o, *torch.autograd.grad(plain_o, plain_in, do))
    for name, g, r, p in zip(("o", "dq", "dk", "dv"), got, ref, plain):
        assert_rule(name, g, r, p, dtype)


@pytest.mark.parametrize("chunk_rows", [6, 2])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_chunks_match_the_reference(chunk_rows, layout, monkeypatch):
    # B = H = 3: 6 rows a chunk is whole batches (2, then 1); 2 rows, heads of one batch (2, then 1).
    grid, kv_grid, opts = (3, 4), (2, 3), dict(num_prefix_tokens=1, den_floor=0.5)
    Nq, Nk = token_counts(grid, kv_grid, 1)
    monkeypatch.setattr(quadratic, "CHUNK_BYTES", chunk_rows * Nq * Nk * 4)
    q, k, v = make_inputs(3, 3, Nq, Nk, 8, 6, dtype=torch.float32, layout=layout)
    o = vicinity_attention(q, k, v, grid, kv_grid, layout=layout, backend="torch", **opts)
    node = o.grad_fn if layout == "bhnd" else o.grad_fn.next_functions[0][0]   # under the transpose
    assert type(node).__name__.startswith("_EagerQuadratic")
    do = torch.randn_like(o)
    got = (o, *torch.autograd.grad(o, (q, k, v), do))
    # Written in the inputs' memory order: the gradients of contiguous leaves come back contiguous.
    assert all(t.is_contiguous() for t in got)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_o = vicinity_attention(*ref_in, grid, kv_grid, layout=layout, backend="reference", **opts)
    ref = (ref_o, *torch.autograd.grad(ref_o, ref_in, do.double()))
    plain_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    plain_o = vicinity_attention(*plain_in, grid, kv_grid, layout=layout, backend="reference", **opts)
    plain = (plain_o, *torch.autograd.grad(plain_o, plain_in, do))
    for name, g, r, p in zip(("o", "dq", "dk", "dv"), got, ref, plain):
        assert_rule(name, g, r, p, torch.float32)


def test_partial_gradients():
    q, k, v = make_inputs(1, 2, 12, 12, 4, 4, dtype=torch.float64)
    k.requires_grad_(False)
    o = vicinity_attention(q, k, v, (3, 4), backend="torch")
    dq, dv = torch.autograd.grad(o.sum(), (q, v))
    ref_in = [t.detach().requires_grad_() for t in (q, v)]
    r = vicinity_attention(ref_in[0], k, ref_in[1], (3, 4), backend="reference")
    for g, w in zip((dq, dv), torch.autograd.grad(r.sum(), ref_in)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_cost_rule_and_dispatch():
    spec = VicinitySpec(grid=(8, 8), kv_grid=(8, 8))
    q = torch.randn(64, 4, 64, 16)
    assert quadratic.cheaper(q, q, q, spec)                                  # a small ViT layer: 8 x 8
    big = torch.randn(1, 4, 56 * 56, 64)
    assert not quadratic.cheaper(big, big, big, VicinitySpec(grid=(56, 56), kv_grid=(56, 56)))
    assert not quadratic.cheaper(q.bfloat16(), q.bfloat16(), q.bfloat16(), spec)  # 16-bit: linear, fp32 inside
    clamped = VicinitySpec(grid=(8, 8), kv_grid=(8, 8), clamp=(1e-4, 1e4))
    assert not quadratic.cheaper(q, q, q, clamped)
    x = torch.randn(1, 2, 64, 16, requires_grad=True)
    assert _grad_fn_name(vicinity_attention(x, x, x, (8, 8), backend="torch")).startswith("_EagerQuadratic")
    assert _grad_fn_name(vicinity_attention(x, x, x, (8, 8), backend="torch",
                                            clamp=(1e-4, 1e4))).startswith("_EagerAttention")


def test_double_backward_is_the_same_clear_error():
    q, k, v = make_inputs(1, 1, 6, 6, 4, 4, dtype=torch.float64)
    o = vicinity_attention(q, k, v, (2, 3), backend="torch")
    (dq,) = torch.autograd.grad(o.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        dq.sum().backward()
