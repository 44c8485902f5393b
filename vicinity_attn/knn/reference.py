"""k-NN attention (KVT), dense: the authors' formulation, for tests and small N only.

Scores are materialised in full; each row keeps exactly its ``topk`` largest entries, chosen by
``torch.topk`` and scattered into a dense float mask, the rest become -inf before the softmax (as in
the released ``kNNAttention``). Among exactly tied scores at the boundary ``torch.topk`` keeps an
arbitrary subset; the memory-bounded backends keep every score >= the topk-th largest (see
:mod:`vicinity_attn.knn.torch_backend`). Plain autograd, no custom op.

Non-finite scores (docs/knn.md, "Non-finite inputs"), made explicit here so that no result depends
on how a sort ranks NaN: NaN ranks above +inf, tau_i is the topk-th largest score in that order, and
where tau_i is not finite (+-inf or NaN) the row keeps every score not below tau_i (not s_ij < tau_i:
every tied key, every NaN, and the whole row if tau_i is NaN), as the memory-bounded backends do.
There such ties are the rule (an inf in q makes half a row +inf), and which of them are kept decides
which gradients are NaN.
"""
from __future__ import annotations

import torch


def knn_keep_mask(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """The kept entries of each row of ``scores`` [..., Nk] (bool), by the rules of the module docstring."""
    nan = scores.isnan()
    # NaN stands in as +inf for torch.topk; with a finite tau every NaN and +inf is above it and picked.
    values, index = torch.topk(scores.masked_fill(nan, float("inf")), k=topk, dim=-1, largest=True)
    tau = values[..., -1:].masked_fill(nan.sum(dim=-1, keepdim=True) >= topk, float("nan"))
    # Out of place (theirs scatters in place): under torch.func.vmap the indices are batched, the zeros not.
    mask = torch.zeros(scores.shape, dtype=torch.float32, device=scores.device).scatter(-1, index, 1.0) > 0
    return torch.where(tau.isfinite(), mask, ~(scores < tau))


def knn_probabilities(q: torch.Tensor, k: torch.Tensor, topk: int, scale: float) -> torch.Tensor:
    """softmax over each row's topk largest scores: [B, H, Nq, Nk] in q's dtype."""
    scores = (q @ k.transpose(-2, -1)) * scale
    keep = knn_keep_mask(scores.detach(), topk)
    scores = torch.where(keep, scores, torch.full_like(scores, float("-inf")))
    return scores.softmax(dim=-1)


def reference_knn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: int,
                            scale: float) -> torch.Tensor:
    """o [B, H, Nq, Dv] from q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv] (one dtype)."""
    return knn_probabilities(q, k, topk, scale) @ v
