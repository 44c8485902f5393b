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
# The N x N work of this many bytes of (batch, head) rows at a time: a chunk's scores stay in a core's L2
# cache between the matmul that writes them and the ones that read them.
CHUNK_BYTES = 2 ** 20
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


def _chunks(n_rows: int, Nq: int, Nk: int, dtype: torch.dtype):
    """(first, end) row ranges of the (batch, head) rows, each holding at most CHUNK_BYTES of N x N work."""
    rows = max(1, CHUNK_BYTES // (Nq * Nk * dtype.itemsize))
    return [(i, min(i + rows, n_rows)) for i in range(0, n_rows, rows)], min(rows, n_rows)


def _scores(a: torch.Tensor, phi_q: torch.Tensor, phi_k: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """A = (phi_q phi_k^T) * W of one chunk [rows, Nq, Nk], written into ``a``."""
    return torch.bmm(phi_q, phi_k.transpose(1, 2), out=a).mul_(W)


@raises_on_overflow("forward", 3)
def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str,
            spec: VicinitySpec) -> tuple[torch.Tensor, ...]:
    """(o, den): o [B, H, Nq, Dv] in q's dtype and memory order, den [B, H, Nq]; the backward recomputes A
    from q and k (one matmul) rather than keeping it."""
    B, H, Nq, _ = q.shape
    Nk, Dv = k.shape[2], v.shape[-1]
    n = B * H
    with scratch_session():
        phi_q = _features(q, spec.feature_map, q.dtype, "quad_phi_q").view(n, Nq, -1)
        phi_k = _features(k, spec.feature_map, q.dtype, "quad_phi_k").view(n, Nk, -1)
        values = _contiguous(v, v.dtype, "quad_values").view(n, Nk, Dv)   # one copy, not one per matmul
        W = _weights(spec, q.dtype, q.device)
        o = empty_output_like(q, Dv)
        direct = o.is_contiguous()
        U = o if direct else scratch("quad_out", o.numel(), o.dtype, o.device).view(o.shape)
        r = torch.empty(B, H, Nq, dtype=q.dtype, device=q.device)
        chunks, rows = _chunks(n, Nq, Nk, q.dtype)
        A = scratch("quad_scores", rows * Nq * Nk, q.dtype, q.device)
        U_rows, r_rows = U.view(n, Nq, Dv), r.view(n, Nq)
        for i, j in chunks:
            a = _scores(A[:(j - i) * Nq * Nk].view(j - i, Nq, Nk), phi_q[i:j], phi_k[i:j], W)
            torch.sum(a, -1, out=r_rows[i:j])
            torch.bmm(a, values[i:j], out=U_rows[i:j])
        den = (r.clamp_min_(spec.den_floor) if spec.den_floor > 0 else r).add_(spec.eps)
        if direct:
            o.div_(den[..., None])
        else:
            torch.div(U, den[..., None], out=o)
    return o, den


@raises_on_overflow("backward", 4)
def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             den: torch.Tensor, backend: str, spec: VicinitySpec,
             needs: tuple[bool, bool, bool]) -> tuple[torch.Tensor | None, ...]:
    """(dq, dk, dv) of :func:`forward` (None where ``needs`` says a gradient is not wanted)."""
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[-1]
    n = B * H
    new = lambda N, E: torch.empty(B, H, N, E, dtype=q.dtype, device=q.device)  # noqa: E731
    dq, dk, dv = (new(Nq, D) if needs[0] else None, new(Nk, D) if needs[1] else None,
                  new(Nk, Dv) if needs[2] else None)
    scores_grad = dq is not None or dk is not None
    with scratch_session():
        g = scratch("quad_grad_out", do.numel(), q.dtype, q.device).view(do.shape)
        torch.div(do, den[..., None], out=g)                   # contiguous: read by two matmuls
        c = torch.mul(do, o, out=scratch("quad_dot", do.numel(), q.dtype, q.device).view(do.shape)).sum(-1)
        c = c.div_(den).neg_()
        floored = floor_active(den, spec)
        if floored is not None:
            c = c.masked_fill(floored, 0.0)
        phi_q = _features(q, spec.feature_map, q.dtype, "quad_phi_q").view(n, Nq, D)
        phi_k = _features(k, spec.feature_map, q.dtype, "quad_phi_k").view(n, Nk, D)
        values = _contiguous(v, v.dtype, "quad_values").view(n, Nk, Dv) if scores_grad else None
        W = _weights(spec, q.dtype, q.device)
        chunks, rows = _chunks(n, Nq, Nk, q.dtype)
        A = scratch("quad_scores", rows * Nq * Nk, q.dtype, q.device)
        g_rows, c_rows = g.view(n, Nq, Dv), c.view(n, Nq, 1)
        for i, j in chunks:
            a = _scores(A[:(j - i) * Nq * Nk].view(j - i, Nq, Nk), phi_q[i:j], phi_k[i:j], W)
            if dv is not None:
                torch.bmm(a.transpose(1, 2), g_rows[i:j], out=dv.view(n, Nk, Dv)[i:j])
            if scores_grad:
                # dS = (g v^T + c 1^T) * W, into A's buffer (A is not needed past dv).
                dS = torch.bmm(g_rows[i:j], values[i:j].transpose(1, 2), out=a).add_(c_rows[i:j]).mul_(W)
                if dq is not None:
                    torch.bmm(dS, phi_k[i:j], out=dq.view(n, Nq, D)[i:j])
                if dk is not None:
                    torch.bmm(dS.transpose(1, 2), phi_q[i:j], out=dk.view(n, Nk, D)[i:j])
        if dq is not None:
            mul_feature_map_grad_(dq, phi_q.view(dq.shape), spec.feature_map)
        if dk is not None:
            mul_feature_map_grad_(dk, phi_k.view(dk.shape), spec.feature_map)
    return dq, dk, dv
