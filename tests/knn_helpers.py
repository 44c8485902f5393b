"""k-NN attention test utilities: the tolerance rule (helpers.assert_rule) applied to knn_attention."""
from __future__ import annotations

import torch

from helpers import assert_rule
from vicinity_attn import knn_attention


def knn_outputs_and_grads(q, k, v, do, topk, **kw):
    out = knn_attention(q, k, v, topk, **kw)
    return [out, *torch.autograd.grad(out, (q, k, v), do.to(out.dtype))]


def check_knn_against_reference(q, k, v, topk, backend, **kw):
    """Forward and dq/dk/dv of ``backend`` against the float64 reference by the tolerance rule (the
    plain computation: the reference backend, the authors' formulation, run in q's dtype)."""
    dtype = q.dtype
    as64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref_out = knn_attention(*as64, topk, backend="reference", **kw)
    do = torch.randn_like(ref_out)
    ref = [ref_out, *torch.autograd.grad(ref_out, as64, do)]
    got = knn_outputs_and_grads(q, k, v, do, topk, backend=backend, **kw)
    if dtype == torch.float64:
        plain = ref
    else:
        lowp = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        plain = knn_outputs_and_grads(*lowp, do, topk, backend="reference", **kw)
    results = []
    for name, g, r, p in zip(("out", "dq", "dk", "dv"), got, ref, plain):
        assert g.dtype == dtype and g.shape == r.shape, f"{name}: {g.dtype} {tuple(g.shape)}"
        if topk == 1 and name in ("dq", "dk"):
            # One kept key per row: the softmax is the constant 1, so the scores get no gradient; what is
            # left is the rounding of dO.v_j - dO.o_i (o_i = v_j), a few ulps of the products' size.
            size = do.abs().max() * v.abs().max() * v.shape[-1] * q.abs().max() * k.abs().max()
            bound = 16 * torch.finfo(dtype).eps * size.item()
            assert g.abs().max().item() <= bound, f"{name} must vanish with topk = 1 (max {g.abs().max()})"
            continue
        results.append(assert_rule(name, g, r, p, dtype))
    return results
