"""k-NN attention (KVT) in pure PyTorch, memory-bounded: any device.

Semantics: row i keeps every score s_ij = scale * q_i . k_j with s_ij >= tau_i, tau_i the topk-th
largest score of the row, and takes a softmax over them. This is the authors' top-k mask except on
exact ties at tau_i: they keep an arbitrary ``topk`` of the tied entries (``torch.topk``), this keeps
all of them (so a row may keep more than ``topk``; with continuous inputs ties have probability 0).
Non-finite scores as docs/knn.md ("Non-finite inputs") and the reference say: NaN ranks above +inf, a
score is dropped only if it is below tau (so every NaN is kept), a row keeping a NaN or +inf score or
only -inf ones is NaN with p NaN at every key, and ds is exactly 0 off the mask.

The query rows are processed in blocks of about :data:`BLOCK_ELEMENTS` scores: no more than a block
of rows of scores (and its probabilities / gradients) is alive at any time, forward or backward, and
nothing Nq x Nk is saved. Forward saves, per query row, tau and the logsumexp of the kept scores
(FlashAttention's statistic); backward recomputes each block's scores from q and k and the mask from
tau (the same blocks and the same arithmetic as forward, so the recomputed scores are bitwise the
forward's and the mask is the same). Everything is computed in float32 (float64 for float64 inputs).
:func:`forward` and :func:`backward` are the bodies of the custom ops of :mod:`vicinity_attn.knn.ops`.
"""
from __future__ import annotations

import torch

from ..common.allocation import compute_dtype, empty_grads_like, empty_output_like

# Scores per block of query rows (over all batch x head slices): 32 MiB of float32. Few, large blocks:
# on a CPU every op is a parallel region, and on a loaded machine each costs a scheduling round.
BLOCK_ELEMENTS = 1 << 23


def row_blocks(batch_heads: int, nq: int, nk: int) -> list[tuple[int, int]]:
    """(start, stop) of the blocks of query rows: about BLOCK_ELEMENTS scores each, at least one row."""
    rows = max(1, BLOCK_ELEMENTS // max(1, batch_heads * nk))
    return [(r, min(r + rows, nq)) for r in range(0, nq, rows)]


def flat_heads(x: torch.Tensor, dtype: torch.dtype, factor: float | None = None) -> torch.Tensor:
    """x [B, H, N, E] as a [B*H, N, E] tensor of ``dtype`` (a copy only where needed), times ``factor``."""
    x = x.to(dtype).reshape(-1, x.shape[-2], x.shape[-1])
    return x * factor if factor is not None else x


def block_scores(q_scaled: torch.Tensor, k_t: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """(scale q) @ k^T for query rows r0:r1: [B*H, R, Nk]. The one place scores are computed, so that
    backward recomputes them bitwise as forward did (same blocks, same operands)."""
    return torch.bmm(q_scaled[:, r0:r1], k_t)


def dropped(s: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The dropped entries of score rows s [..., R, Nk] given tau [..., R]: s < tau. Never a NaN score (NaN
    ranks above +inf: always among the top-k), and nothing where tau is NaN (NaNs fill the top-k)."""
    return s < tau.unsqueeze(-1)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: int,
            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, tau, lse): o [B, H, Nq, Dv] in q's dtype and memory order; tau and lse [B, H, Nq] in the
    compute dtype (float32, float64 for float64 inputs)."""
    B, H, Nq, _ = q.shape
    Nk, Dv = k.shape[2], v.shape[-1]
    dtype = compute_dtype(q.dtype)
    q_s, k_t, v_c = flat_heads(q, dtype, scale), flat_heads(k, dtype).transpose(1, 2), flat_heads(v, dtype)
    o = empty_output_like(q, Dv)
    o_acc = torch.empty((B * H, Nq, Dv), dtype=dtype, device=q.device)
    tau = q.new_empty((B * H, Nq), dtype=dtype)
    lse = q.new_empty((B * H, Nq), dtype=dtype)
    for r0, r1 in row_blocks(B * H, Nq, Nk):
        s = block_scores(q_s, k_t, r0, r1)
        # The kept scores are the row's top-k values (torch.topk ranks NaN above +inf): their min is tau,
        # their max the softmax shift; NaN counts as +inf in both, and tau is NaN where all of them are NaN.
        top = torch.topk(s, topk, dim=-1, sorted=False).values
        top_nan = top.isnan()
        t, m = torch.aminmax(top.masked_fill_(top_nan, float("inf")), dim=-1)
        t.masked_fill_(top_nan.all(dim=-1), float("nan"))
        # s >= t, not ~dropped(s, t): they differ only at a NaN score or tau, in NaN rows (set below).
        keep = s >= t.unsqueeze(-1)
        p = s.sub_(m.unsqueeze(-1)).exp_().mul_(keep)        # s is dead from here: its buffer holds p
        # A kept NaN or +inf (m = +inf) or only -inf kept (m = -inf): the softmax is NaN on the whole row.
        l = p.sum(dim=-1).masked_fill_(~m.isfinite(), float("nan"))
        torch.bmm(p, v_c, out=o_acc[:, r0:r1])
        o_acc[:, r0:r1].div_(l.unsqueeze(-1))
        tau[:, r0:r1] = t
        torch.add(m, l.log_(), out=lse[:, r0:r1])
    o.copy_(o_acc.view(B, H, Nq, Dv))
    return o, tau.view(B, H, Nq), lse.view(B, H, Nq)


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             tau: torch.Tensor, lse: torch.Tensor, topk: int, scale: float,
             needs: tuple[bool, bool, bool] = (True, True, True),
             ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dq, dk, dv) laid out like q, k, v (None where ``needs`` says not wanted), FlashAttention's
    backward over the same row blocks as :func:`forward`:
    p = [s >= tau] exp(s - lse), dv = p^T dO, ds = p * (dO v^T - rowsum(dO * o)), dq = scale ds k,
    dk = ds^T (scale q)."""
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[-1]
    dtype = compute_dtype(q.dtype)
    q_s, k_c, do_c = flat_heads(q, dtype, scale), flat_heads(k, dtype), flat_heads(do, dtype)
    k_t = k_c.transpose(1, 2)
    tau, lse = tau.reshape(B * H, Nq), lse.reshape(B * H, Nq)
    dq, dk, dv = empty_grads_like((q, k, v), needs)
    need_ds = needs[0] or needs[1]
    if need_ds:
        v_t = flat_heads(v, dtype).transpose(1, 2)
        delta = (do_c * flat_heads(o, dtype)).sum(dim=-1)          # rowsum(dO * o): [B*H, Nq]
        k_scaled = k_c * scale if needs[0] else None
    dq_acc = torch.empty((B * H, Nq, D), dtype=dtype, device=q.device) if needs[0] else None
    dk_acc = torch.zeros((B * H, Nk, D), dtype=dtype, device=q.device) if needs[1] else None
    dv_acc = torch.zeros((B * H, Nk, Dv), dtype=dtype, device=q.device) if needs[2] else None
    for r0, r1 in row_blocks(B * H, Nq, Nk):
        s = block_scores(q_s, k_t, r0, r1)
        drop = dropped(s, tau[:, r0:r1])
        p = s.sub_(lse[:, r0:r1].unsqueeze(-1)).exp_().masked_fill_(drop, 0.0)
        if dv_acc is not None:
            dv_acc.baddbmm_(p.transpose(1, 2), do_c[:, r0:r1])
            # A NaN row (lse NaN) has p = NaN at every key, dropped ones too (the reference's softmax): every
            # dv of its (batch, head) is NaN.
            dv_acc.masked_fill_(lse[:, r0:r1].isnan().any(dim=-1)[:, None, None], float("nan"))
        if not need_ds:
            continue
        # ds is exactly 0 off the mask (the gradient of the reference's where), even where dO.v - delta is not
        # finite.
        ds = torch.bmm(do_c[:, r0:r1], v_t).sub_(delta[:, r0:r1].unsqueeze(-1)).mul_(p).masked_fill_(drop, 0.0)
        if dq_acc is not None:
            torch.bmm(ds, k_scaled, out=dq_acc[:, r0:r1])
        if dk_acc is not None:
            dk_acc.baddbmm_(ds.transpose(1, 2), q_s[:, r0:r1])
    for grad, acc in ((dq, dq_acc), (dk, dk_acc), (dv, dv_acc)):
        if grad is not None:
            grad.copy_(acc.view(grad.shape))
    return dq, dk, dv
