"""The clamped backward in fp16 (VVT's clip=True under fp16 autocast): every intermediate that carries
1/den and the state scale (up to hi * Nk) stays in fp32; dense and packed calls, realistic and adversarial
magnitudes, against the float64 reference by the tolerance rule."""
from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import FLOOR, assert_rule, cu_seqlens, rel_err
from vicinity_attn import vicinity_attention, vicinity_attention_varlen

CLAMP = (1e-4, 1e4)   # the VVT authors' abs_clamp bounds
# (name, q scale, k scale, v scale): realistic activations, and queries that meet almost no key
# (den near eps, 1/den clamped at 1e4: g / s_k is about 1e4 * Nk * |dO| while the true |dv| is below 1).
SCALES = [("realistic", 0.5, 0.5, 1.0), ("adversarial", 1e-3, 0.03, 10.0)]


def _grads(fn, inputs, do):
    xs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*xs)
    return [out, *torch.autograd.grad(out, xs, do.to(out.dtype))]


def _check(fn, inputs, ref_fn):
    """fn (fp16, triton) against ref_fn in float64 by the tolerance rule, out and dq, dk, dv."""
    as64 = [t.double() for t in inputs]
    with torch.no_grad():
        shape = ref_fn(*as64).shape
    do = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = _grads(ref_fn, as64, do)
    got = _grads(fn, inputs, do)
    plain = _grads(ref_fn, inputs, do)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert torch.isfinite(g).all(), f"{name}: non-finite values where the reference is finite"
        assert torch.isfinite(r).all() and r.abs().max() > 0
    # The plain fp16 computation overflows itself in dq / dk where 1/den is large (the defect this pins);
    # there the allowance is the largest the rule gives this call's tensors where plain fp16 is finite.
    finite = [i for i, p in enumerate(plain) if torch.isfinite(p).all()]
    assert 0 in finite
    worst = max(rel_err(plain[i].double(), ref[i]) for i in finite)
    for i, (name, g, r, p) in enumerate(zip(("out", "dq", "dk", "dv"), got, ref, plain)):
        if i in finite:
            assert_rule(name, g.double(), r, p.double(), torch.float16)
        else:
            err, allowed = rel_err(g.double(), r), 2 * worst + FLOOR[torch.float16]
            assert err <= allowed, f"{name}: error {err:.3e} > allowed {allowed:.3e}"


def _inputs(shapes, scales, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, dtype=torch.float64, generator=gen) * c).half() for s, c in zip(shapes, scales)]


@pytest.mark.parametrize("name, sq, sk, sv", SCALES)
def test_dense_clamped_backward_fp16(name, sq, sk, sv):
    grid = (8, 8)
    B, H, N, D, Dv = 1, 2, 64, 16, 16
    q, k, v = _inputs([(B, H, N, D), (B, H, N, D), (B, H, N, Dv)], (sq, sk, sv))
    kw = dict(grid=grid, clamp=CLAMP)
    _check(lambda *t: vicinity_attention(*t, backend="triton", **kw), (q, k, v),
           lambda *t: vicinity_attention(*t, backend="reference", **kw))


@pytest.mark.parametrize("name, sq, sk, sv", SCALES)
def test_packed_clamped_backward_fp16(name, sq, sk, sv):
    grids = [(8, 8), (5, 7)]
    H, D, Dv = 2, 16, 16
    lengths = [math.prod(g) for g in grids]
    T = sum(lengths)
    q, k, v = _inputs([(T, H, D), (T, H, D), (T, H, Dv)], (sq, sk, sv))
    cu = cu_seqlens(lengths)

    def packed(q, k, v, backend):
        if backend == "triton":
            return vicinity_attention_varlen(q, k, v, cu, cu, grids, backend="triton", clamp=CLAMP)
        outs = [vicinity_attention(q[a:b][None], k[a:b][None], v[a:b][None], g, layout="bnhd", backend=backend,
                                   clamp=CLAMP)[0] for g, a, b in zip(grids, cu[:-1].tolist(), cu[1:].tolist())]
        return torch.cat(outs)
    _check(lambda *t: packed(*t, "triton"), (q, k, v), lambda *t: packed(*t, "reference"))
