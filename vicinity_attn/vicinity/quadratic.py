"""The exact quadratic form for small CPU calls of the torch backend.

With few tokens (a small ViT's 8 x 8, VVT's last stage at 7 x 7) the N x N weights cost fewer operations
than F states of D x Dv, and far fewer small tensor operations: one call is then two matmuls and a
weighting, as a softmax layer's core is. Same results as the linear form within the tolerance rule
(both are exact; they round differently), gradients included:

    A = (phi_q phi_k^T) * W,   U = A v,   r = A 1,   den = max(r, den_floor) + eps,   o = U / den

with W [Nq, Nk] the vicinity weights (the reference's, built once per grid pair). Backward (g = dO / den,
c = -(dO . o) / den, 0 where the floor is active): dA = g v^T + c 1^T, dv = A^T g, dS = dA * W,
dphi_q = dS phi_k, dphi_k = dS^T phi_q, dx = dphi * phi'(x).

Forward saves what the linear form saves (q, k, v, o, den); the backward recomputes A (one matmul), and
every N x N temporary is a scratch buffer (:mod:`.scratch`), so no call page-faults fresh N x N memory in.

:func:`cheaper` is the cost rule; the clamp, 16-bit inputs and devices other than the CPU keep the
linear form (which accumulates 16-bit inputs in fp32 and never holds N x N).
"""
from __future__ import annotations

import functools

import torch

from ..common.allocation import empty_output_like
from ..common.feature_maps import mul_feature_map_grad_
from ..common.overflow import raises_on_overflow
from ..common.spec import VicinitySpec
from .reference import vicinity_weights
from .scratch import scratch, scratch_session
from .torch_backend import _contiguous, _features, floor_active

# The largest Nq * Nk taken quadratically (a few cache-resident N x N blocks per head); 0 turns it off.
MAX_PAIRS = 4096
# Quadratic when its multiply-adds are at most this many times the linear form's: the linear form runs
# many small operations per call (per axis, per chunk), which a CPU pays for at small sizes.
LINEAR_OVERHEAD = 4


def cheaper(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: VicinitySpec) -> bool:
    """Whether the quadratic form is the cheaper exact form for this call (CPU, fp32 / fp64, no clamp)."""
    Nq, Nk = q.shape[2], k.shape[2]
    if (q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float64) or spec.clamp is not None
            or Nq * Nk > MAX_PAIRS):
        return False
    F, D, Dv = spec.n_features, q.shape[-1], v.shape[-1]
    return Nq * Nk * (D + Dv + 2) <= LINEAR_OVERHEAD * F * D * Dv * (Nq + Nk)


@functools.lru_cache(maxsize=64)
def _weights(spec: VicinitySpec, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return vicinity_weights(spec, dtype=dtype, device=device)


def _scores(phi_q: torch.Tensor, phi_k: torch.Tensor, spec: VicinitySpec) -> torch.Tensor:
    """A = (phi_q phi_k^T) * W [B, H, Nq, Nk], in the scratch buffer "quad_scores" (a temporary: fresh
    N x N buffers would be page-faulted in at every call, costing as much as the matmul)."""
    B, H, Nq, _ = phi_q.shape
    Nk = phi_k.shape[2]
    A = scratch("quad_scores", B * H * Nq * Nk, phi_q.dtype, phi_q.device).view(B, H, Nq, Nk)
    return torch.matmul(phi_q, phi_k.transpose(-1, -2), out=A).mul_(_weights(spec, phi_q.dtype, phi_q.device))


@raises_on_overflow("forward", 3)
def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str,
            spec: VicinitySpec) -> tuple[torch.Tensor, ...]:
    """(o, den): o [B, H, Nq, Dv] in q's dtype and memory order, den [B, H, Nq]; the backward recomputes A
    from q and k (one matmul) rather than keeping it."""
    with scratch_session():
        phi_q = _features(q, spec.feature_map, q.dtype, "quad_phi_q")
        phi_k = _features(k, spec.feature_map, q.dtype, "quad_phi_k")
        A = _scores(phi_q, phi_k, spec)
        r = A.sum(-1)
        den = (r.clamp_min(spec.den_floor) if spec.den_floor > 0 else r).add_(spec.eps)
        o = empty_output_like(q, v.shape[-1])
        values = _contiguous(v, v.dtype, "quad_values")     # one copy, not one inside each matmul
        if o.is_contiguous():
            torch.matmul(A, values, out=o)
        else:
            o.copy_(torch.matmul(A, values, out=scratch("quad_out", o.numel(), o.dtype, o.device).view(o.shape)))
        o.div_(den[..., None])
    return o, den


@raises_on_overflow("backward", 4)
def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             den: torch.Tensor, backend: str, spec: VicinitySpec,
             needs: tuple[bool, bool, bool]) -> tuple[torch.Tensor | None, ...]:
    """(dq, dk, dv) of :func:`forward` (None where ``needs`` says a gradient is not wanted)."""
    with scratch_session():
        g = scratch("quad_grad_out", do.numel(), q.dtype, q.device).view(do.shape)
        torch.div(do, den[..., None], out=g)                   # contiguous: read by two matmuls
        c = torch.mul(do, o, out=scratch("quad_dot", do.numel(), q.dtype, q.device).view(do.shape)).sum(-1)
        c = c.div_(den).neg_()
        floored = floor_active(den, spec)
        if floored is not None:
            c = c.masked_fill(floored, 0.0)
        phi_q = _features(q, spec.feature_map, q.dtype, "quad_phi_q")
        phi_k = _features(k, spec.feature_map, q.dtype, "quad_phi_k")
        A = _scores(phi_q, phi_k, spec)
        dv = A.transpose(-1, -2) @ g if needs[2] else None
        if not (needs[0] or needs[1]):
            return None, None, dv
        B, H, Nq, Nk = A.shape
        dS = scratch("quad_score_grads", B * H * Nq * Nk, q.dtype, q.device).view(B, H, Nq, Nk)
        values = _contiguous(v, v.dtype, "quad_values")
        torch.matmul(g, values.transpose(-1, -2), out=dS).add_(c[..., None]).mul_(_weights(spec, q.dtype, q.device))
        dq = mul_feature_map_grad_(dS @ phi_k, phi_q, spec.feature_map) if needs[0] else None
        dk = mul_feature_map_grad_(dS.transpose(-1, -2) @ phi_q, phi_k, spec.feature_map) if needs[1] else None
    return dq, dk, dv
