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

from ..common.allocation import empty_grads_like, empty_output_like
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
    """Whether the quadratic form is the cheaper exact form for this call (CPU, fp32 / fp64, no clamp,
    bidirectional)."""
    Nq, Nk = q.shape[2], k.shape[2]
    if (q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float64) or spec.clamp is not None
            or spec.causal is not None or Nq * Nk > MAX_PAIRS):
        return False
    F, D, Dv = spec.n_features, q.shape[-1], v.shape[-1]
    return Nq * Nk * (D + Dv + 2) <= LINEAR_OVERHEAD * F * D * Dv * (Nq + Nk)


@functools.lru_cache(maxsize=64)
def _weights(spec: VicinitySpec, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return vicinity_weights(spec, dtype=dtype, device=device)


def _chunks(B: int, H: int, Nq: int, Nk: int, dtype: torch.dtype) -> tuple[list[tuple], int]:
    """The (batch, head) rows in chunks of at most CHUNK_BYTES of N x N work, and the most rows in one: each
    chunk as (batch slice, head slice, first row, end row) of the [B, H] rows, whole batches when a batch's
    heads fit (else heads of one batch), so that a chunk is one strided slice of a [B, H, N, E] tensor."""
    rows = max(1, CHUNK_BYTES // (Nq * Nk * dtype.itemsize))
    if rows >= H:
        nb = rows // H
        return [(slice(b, min(b + nb, B)), slice(None), b * H, min(b + nb, B) * H) for b in range(0, B, nb)], \
            min(nb, B) * H
    return [(slice(b, b + 1), slice(h, min(h + rows, H)), b * H + h, b * H + min(h + rows, H))
            for b in range(B) for h in range(0, H, rows)], rows


def _scores(a: torch.Tensor, phi_q: torch.Tensor, phi_k: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """A = (phi_q phi_k^T) * W of one chunk [rows, Nq, Nk], written into ``a``."""
    return torch.bmm(phi_q, phi_k.transpose(1, 2), out=a).mul_(W)


def _grad_into(out: torch.Tensor, dphi: torch.Tensor, phi: torch.Tensor, feature_map: str) -> None:
    """out = dphi * phi'(x) (out: a strided slice of a gradient; dphi, phi: a chunk, contiguous), in one pass
    for relu (autograd's relu backward, the semantics of ``mul_feature_map_grad_``)."""
    if feature_map == "relu":
        torch.ops.aten.threshold_backward(dphi, phi, 0, grad_input=out)
    else:
        mul_feature_map_grad_(out.copy_(dphi), phi, feature_map)


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
        den = torch.empty(B, H, Nq, dtype=q.dtype, device=q.device)
        den_rows = den.view(n, Nq)
        chunks, rows = _chunks(B, H, Nq, Nk, q.dtype)
        A = scratch("quad_scores", rows * Nq * Nk, q.dtype, q.device)
        U = scratch("quad_out", rows * Nq * Dv, q.dtype, q.device)
        for bs, hs, i, j in chunks:
            a = _scores(A[:(j - i) * Nq * Nk].view(j - i, Nq, Nk), phi_q[i:j], phi_k[i:j], W)
            r = torch.sum(a, -1, out=den_rows[i:j])
            (r.clamp_min_(spec.den_floor) if spec.den_floor > 0 else r).add_(spec.eps)
            u = torch.bmm(a, values[i:j], out=U[:(j - i) * Nq * Dv].view(j - i, Nq, Dv))
            # o's chunk (in q's memory order) = U / den, in one pass from the cache-resident chunk
            out = o[bs, hs]
            torch.div(u.view(out.shape), r.view(*out.shape[:-1], 1), out=out)
    return o, den


@raises_on_overflow("backward", 4)
def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             den: torch.Tensor, backend: str, spec: VicinitySpec,
             needs: tuple[bool, bool, bool]) -> tuple[torch.Tensor | None, ...]:
    """(dq, dk, dv) of :func:`forward`, laid out in memory like q, k, v (so that autograd hands them on
    through the caller's views without a copy); None where ``needs`` says a gradient is not wanted."""
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[-1]
    n = B * H
    dq, dk, dv = empty_grads_like((q, k, v), needs)
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
        chunks, rows = _chunks(B, H, Nq, Nk, q.dtype)
        A = scratch("quad_scores", rows * Nq * Nk, q.dtype, q.device)
        G = scratch("quad_grad_chunk", rows * max(Nq, Nk) * max(D, Dv), q.dtype, q.device)
        g_rows, c_rows = g.view(n, Nq, Dv), c.view(n, Nq, 1)
        for bs, hs, i, j in chunks:
            m = j - i
            a = _scores(A[:m * Nq * Nk].view(m, Nq, Nk), phi_q[i:j], phi_k[i:j], W)
            if dv is not None:
                out = dv[bs, hs]
                dv_chunk = torch.bmm(a.transpose(1, 2), g_rows[i:j], out=G[:m * Nk * Dv].view(m, Nk, Dv))
                out.copy_(dv_chunk.view(out.shape))
            if scores_grad:
                # dS = (g v^T + c 1^T) * W, into A's buffer (A is not needed past dv); c added by the matmul.
                dS = torch.baddbmm(c_rows[i:j], g_rows[i:j], values[i:j].transpose(1, 2), out=a).mul_(W)
                if dq is not None:
                    out = dq[bs, hs]
                    dphi = torch.bmm(dS, phi_k[i:j], out=G[:m * Nq * D].view(m, Nq, D))
                    _grad_into(out, dphi.view(out.shape), phi_q[i:j].view(out.shape), spec.feature_map)
                if dk is not None:
                    out = dk[bs, hs]
                    dphi = torch.bmm(dS.transpose(1, 2), phi_q[i:j], out=G[:m * Nk * D].view(m, Nk, D))
                    _grad_into(out, dphi.view(out.shape), phi_k[i:j].view(out.shape), spec.feature_map)
    return dq, dk, dv
