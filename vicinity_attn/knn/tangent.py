"""The forward-mode derivative (tangent) of k-NN attention, in plain PyTorch, for every backend.

With s = scale q k^T, the mask keep_ij = s_ij >= tau_i and p = softmax(s | keep) (row-wise over the
kept scores), o = p v. The mask is piecewise constant in q and k: along tangents (tq, tk, tv) it is
held fixed (tau_i moves with the scores, and no kept / dropped score crosses it under an
infinitesimal change unless two scores are tied at tau_i), so

    ds_ij    = scale (tq_i . k_j + q_i . tk_j)                on the kept entries
    dp_ij    = p_ij (ds_ij - delta_i),    delta_i = sum_j p_ij ds_ij
    do_i     = sum_j dp_ij v_j + sum_j p_ij tv_j = sum_j p_ij ds_ij v_j - delta_i o_i + (p tv)_i

Ties: where scores tie at tau_i the output has no derivative (it is not even continuous there: a
change that breaks the tie drops a tied key). The tangent given holds every tied key kept: it is the
derivative along directions that keep the tied scores equal, and belongs to the forward value of the
"torch" / "triton" backends (which keep every tied key). The "reference" backend (``torch.topk``)
keeps an arbitrary ``topk`` of them, and its autograd differentiates that choice.

Memory-bounded like the "torch" backend: the same blocks of query rows, the same score computation
(:func:`knn_torch.block_scores`) and the same selection of tau, so nothing Nq x Nk is ever alive. The
mask is found here from the scores computed here, not from another backend's saved tau: a tau from the
kernels could differ from these scores by a rounding and drop the topk-th key. Computed in float32
(float64 for float64 inputs); the result has q's dtype. Written out of place where a tangent meets a
primal: under vmap (jacfwd) the tangents are batched and the primals are not.
"""
from __future__ import annotations

import torch

from ..common.allocation import compute_dtype
from .torch_backend import block_scores, flat_heads, row_blocks


def knn_tangent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor | None,
                tk: torch.Tensor | None, tv: torch.Tensor | None, topk: int, scale: float) -> torch.Tensor:
    """The tangent of o [B, H, Nq, Dv] along (tq, tk, tv) (each shaped like its input, None for zero),
    for q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv]; in q's dtype."""
    B, H, Nq, _ = q.shape
    Nk, Dv = k.shape[2], v.shape[-1]
    dtype = compute_dtype(q.dtype)
    q_s, k_c, v_c = flat_heads(q, dtype, scale), flat_heads(k, dtype), flat_heads(v, dtype)
    k_t = k_c.transpose(1, 2)
    tq_s = flat_heads(tq, dtype, scale) if tq is not None else None
    tk_t = flat_heads(tk, dtype).transpose(1, 2) if tk is not None else None
    tv_c = flat_heads(tv, dtype) if tv is not None else None
    blocks = []
    for r0, r1 in row_blocks(B * H, Nq, Nk):
        s = block_scores(q_s, k_t, r0, r1)
        # A NaN among the top-k makes tau NaN here (amin), which drops nothing: that row's softmax is NaN anyway.
        tau = torch.topk(s, topk, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        drop = s < tau
        p = torch.softmax(s.masked_fill(drop, float("-inf")), dim=-1)     # [B*H, R, Nk]
        terms = []
        if tq_s is not None or tk_t is not None:
            ds = 0
            if tq_s is not None:
                ds = ds + torch.bmm(tq_s[..., r0:r1, :], k_t)
            if tk_t is not None:
                ds = ds + torch.bmm(q_s[:, r0:r1], tk_t)
            # Non-finite inputs as docs/knn.md says: ds is 0 off the mask (the tangent of the reference's
            # where), and dp v is one product (p ds v - delta o would make inf - inf with an inf in v).
            ds = ds.masked_fill(drop, 0.0)
            delta = (p * ds).sum(dim=-1, keepdim=True)
            terms.append(torch.bmm(p * (ds - delta), v_c))
        if tv_c is not None:
            terms.append(torch.bmm(p, tv_c))
        blocks.append(sum(terms) if terms else torch.zeros((B * H, r1 - r0, Dv), dtype=dtype, device=q.device))
    out = torch.cat(blocks, dim=-2) if blocks else torch.zeros((B * H, 0, Dv), dtype=dtype, device=q.device)
    return out.reshape(B, H, Nq, Dv).to(q.dtype)
