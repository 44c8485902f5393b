"""Shared test utilities: random inputs and the tolerance rule (a backend's error against float64 <= 2x the plain computation's in the same dtype, plus a small floor)."""
from __future__ import annotations

import collections
import itertools
import math

import torch

from vicinity_attn import vicinity_attention

# Absolute floor of the tolerance rule, relative to the reference's magnitude, per dtype.
FLOOR = {torch.float64: 1e-10, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def make_inputs(B, H, Nq, Nk, D, Dv, dtype=torch.float64, layout="bhnd", device="cpu", requires_grad=True):
    """Fresh standard-normal q, k, v in the requested layout (float64 values cast to dtype)."""
    def one(n, d):
        shape = (B, H, n, d) if layout == "bhnd" else (B, n, H, d)
        return torch.randn(shape, dtype=torch.float64, device=device).to(dtype).requires_grad_(requires_grad)
    return one(Nq, D), one(Nk, D), one(Nk, Dv)


def token_counts(grid, kv_grid=None, prefix=0):
    return prefix + math.prod(grid), prefix + math.prod(kv_grid or grid)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref|, in float64."""
    ref = ref.double()
    scale = ref.abs().max().item()
    assert scale > 0, "reference is all zeros: the comparison would be meaningless"
    return (x.double() - ref).abs().max().item() / scale


def outputs_and_grads(q, k, v, do, **kw):
    out = vicinity_attention(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), do.to(out.dtype))
    return [out, *grads]


def check_against_reference(q, k, v, **kw):
    """Forward and dq/dk/dv of ``kw['backend']`` against the float64 reference, by the tolerance rule.

    The rule: for inputs of dtype T, the backend's error against the float64 reference must be at
    most 2x the error of the reference computed in T (the plain PyTorch computation), plus a floor.
    Returns the list of (backend error, allowed) pairs for forward, dq, dk, dv.
    """
    dtype = q.dtype
    backend = kw.pop("backend")
    as64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref_out = vicinity_attention(*as64, backend="reference", **kw)
    do = torch.randn_like(ref_out)
    ref = [ref_out, *torch.autograd.grad(ref_out, as64, do)]
    got = outputs_and_grads(q, k, v, do, backend=backend, **kw)
    if dtype == torch.float64:
        plain = ref
    else:
        lowp = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        plain = outputs_and_grads(*lowp, do, backend="reference", **kw)
    results = []
    for name, g, r, p in zip(("out", "dq", "dk", "dv"), got, ref, plain):
        assert g.dtype == dtype and g.shape == r.shape, f"{name}: {g.dtype} {tuple(g.shape)}"
        results.append(assert_rule(name, g, r, p, dtype))
    return results


def assert_rule(name: str, got: torch.Tensor, ref: torch.Tensor, plain: torch.Tensor,
                dtype: torch.dtype) -> tuple[float, float]:
    """The tolerance rule for one tensor: error of ``got`` against the float64 ``ref`` at most 2x the
    error of ``plain`` (the same computation done plainly in ``dtype``) plus FLOOR[dtype]."""
    err, plain_err = rel_err(got, ref), rel_err(plain, ref)
    allowed = 2 * plain_err + FLOOR[dtype]
    assert err <= allowed, f"{name}: error {err:.3e} > allowed {allowed:.3e} (plain {dtype} error {plain_err:.3e})"
    return err, allowed


def count_launches(monkeypatch, kernels) -> collections.Counter:
    """Counts the launches (``kernel[grid](...)``) of each kernel in ``kernels`` ((module, name) pairs:
    the module attribute the launcher calls through) from now on; returns the live Counter by name."""
    launches = collections.Counter()

    class Counting:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launches[self.name] += 1
            return self.kernel[grid]
    for module, name in kernels:
        monkeypatch.setattr(module, name, Counting(name, getattr(module, name)))
    return launches


def cu_seqlens(lengths):
    """int32 [S + 1] offsets of sequences of ``lengths`` packed one after another."""
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


def pack(grids, kv_grids=None, prefix=0, H=2, D=4, Dv=3, dtype=torch.float64, requires_grad=True):
    """Random packed q, k, v for sequences of ``grids`` / ``kv_grids`` and their cu_seqlens."""
    kv_grids = kv_grids or grids
    nq = [prefix + math.prod(g if isinstance(g, tuple) else (g,)) for g in grids]
    nk = [prefix + math.prod(g if isinstance(g, tuple) else (g,)) for g in kv_grids]

    def one(n, d):
        return torch.randn(n, H, d, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
    return one(sum(nq), D), one(sum(nk), D), one(sum(nk), Dv), cu_seqlens(nq), cu_seqlens(nk)
