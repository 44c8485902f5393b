"""k-NN attention (KVT) in pure PyTorch, memory-bounded: any device.

Semantics: row i keeps every score s_ij = scale * q_i . k_j with s_ij >= tau_i, tau_i the topk-th
largest score of the row, and takes a softmax over them. This is the authors' top-k mask except on
exact ties at tau_i: they keep an arbitrary ``topk`` of the tied entries (``torch.topk``), this keeps
all of them (so a row may keep more than ``topk``; with continuous inputs ties have probability 0).

The query rows are processed in blocks of about :data:`BLOCK_ELEMENTS` scores: no more than a block
of rows of scores (and its probabilities / gradients) is alive at any time, forward or backward, and
nothing Nq x Nk is saved. Forward saves, per query row, tau and the logsumexp of the kept scores
(FlashAttention's statistic); backward recomputes each block's scores from q and k and the mask from
tau (the same blocks and the same arithmetic as forward, so the recomputed scores are bitwise the
forward's and the mask is the same). Everything is computed in float32 (float64 for float64 inputs).
:func:`forward` and :func:`backward` are the bodies of the custom ops of :mod:`vicinity_attn.knn_ops`.
"""
from __future__ import annotations

import torch

from ..layout import compute_dtype, empty_grads_like, empty_output_like

# Scores per block of query rows (over all batch x head slices): 4 MiB of float32.
BLOCK_ELEMENTS = 1 << 20


def row_blocks(batch_heads: int, nq: int, nk: int) -> list[tuple[int, int]]:
    """(start, stop) of the blocks of query rows: about BLOCK_ELEMENTS scores each, at least one row."""
    rows = max(1, BLOCK_ELEMENTS // max(1, batch_heads * nk))
    return [(r, min(r + rows, nq)) for r in range(0, nq, rows)]


def block_scores(q_blk: torch.Tensor, k_t: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * q_blk @ k^T for one block of rows: [B, H, R, Nk]. The one place scores are computed."""
    return torch.matmul(q_blk, k_t).mul_(scale)


def row_thresholds(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """tau: the topk-th largest score of each row, [B, H, R]. (An unsorted top-k and its minimum: on a
    CPU faster than a sorted top-k or kthvalue.)"""
    return torch.topk(scores, topk, dim=-1, sorted=False).values.amin(dim=-1)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: int,
            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, tau, lse): o [B, H, Nq, Dv] in q's dtype and memory order; tau and lse [B, H, Nq] in the
    compute dtype (float32, float64 for float64 inputs)."""
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    dtype = compute_dtype(q.dtype)
    k_t, v_c = k.to(dtype).transpose(-2, -1), v.to(dtype)
    o = empty_output_like(q, v.shape[-1])
    tau = q.new_empty((B, H, Nq), dtype=dtype)
    lse = q.new_empty((B, H, Nq), dtype=dtype)
    for r0, r1 in row_blocks(B * H, Nq, Nk):
        s = block_scores(q[:, :, r0:r1].to(dtype), k_t, scale)
        t = row_thresholds(s, topk)
        m = s.amax(dim=-1, keepdim=True)
        keep = s >= t.unsqueeze(-1)
        p = s.sub_(m).exp_().mul_(keep)        # s is dead from here: its buffer holds p
        l = p.sum(dim=-1, keepdim=True)
        o[:, :, r0:r1] = torch.matmul(p, v_c).div_(l)
        tau[:, :, r0:r1] = t
        lse[:, :, r0:r1] = (m + l.log()).squeeze(-1)
    return o, tau, lse


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             tau: torch.Tensor, lse: torch.Tensor, topk: int, scale: float,
             needs: tuple[bool, bool, bool] = (True, True, True),
             ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dq, dk, dv) laid out like q, k, v (None where ``needs`` says not wanted), FlashAttention's
    backward over the same row blocks as :func:`forward`:
    p = [s >= tau] exp(s - lse), dv = p^T dO, ds = p * (dO v^T - rowsum(dO * o)), dq = scale ds k,
    dk = scale ds^T q."""
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    dtype = compute_dtype(q.dtype)
    k_c, v_c = k.to(dtype), v.to(dtype)
    k_t = k_c.transpose(-2, -1)
    dq, dk, dv = empty_grads_like((q, k, v), needs)
    dk_acc = torch.zeros(k.shape, dtype=dtype, device=q.device) if needs[1] else None
    dv_acc = torch.zeros(v.shape, dtype=dtype, device=q.device) if needs[2] else None
    delta = (do.to(dtype) * o.to(dtype)).sum(dim=-1)       # rowsum(dO * o): [B, H, Nq]
    for r0, r1 in row_blocks(B * H, Nq, Nk):
        q_blk = q[:, :, r0:r1].to(dtype)
        do_blk = do[:, :, r0:r1].to(dtype)
        s = block_scores(q_blk, k_t, scale)
        keep = s >= tau[:, :, r0:r1].unsqueeze(-1)
        p = s.sub_(lse[:, :, r0:r1].unsqueeze(-1)).exp_().mul_(keep)
        if dv_acc is not None:
            dv_acc += torch.matmul(p.transpose(-2, -1), do_blk)
        if not (needs[0] or needs[1]):
            continue
        ds = torch.matmul(do_blk, v_c.transpose(-2, -1)).sub_(delta[:, :, r0:r1].unsqueeze(-1)).mul_(p)
        if needs[0]:
            dq[:, :, r0:r1] = torch.matmul(ds, k_c).mul_(scale)
        if dk_acc is not None:
            dk_acc += torch.matmul(ds.transpose(-2, -1), q_blk).mul_(scale)
    if dk is not None:
        dk.copy_(dk_acc)
    if dv is not None:
        dv.copy_(dv_acc)
    return dq, dk, dv
