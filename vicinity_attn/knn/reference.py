"""k-NN attention (KVT), dense: the authors' formulation, for tests and small N only.

Scores are materialised in full; each row keeps exactly its ``topk`` largest entries, chosen by
``torch.topk`` and scattered into a dense float mask, the rest become -inf before the softmax (as in
the released ``kNNAttention``). Among exactly tied scores at the boundary ``torch.topk`` keeps an
arbitrary subset; the memory-bounded backends keep every score >= the topk-th largest (see
:mod:`vicinity_attn.knn.torch_backend`). Plain autograd, no custom op.
"""
from __future__ import annotations

import torch


def knn_probabilities(q: torch.Tensor, k: torch.Tensor, topk: int, scale: float) -> torch.Tensor:
    """softmax over each row's topk largest scores: [B, H, Nq, Nk] in q's dtype."""
    scores = (q @ k.transpose(-2, -1)) * scale
    index = torch.topk(scores, k=topk, dim=-1, largest=True)[1]
    # Out of place (theirs scatters in place): under torch.func.vmap the indices are batched, the zeros not.
    mask = torch.zeros(scores.shape, dtype=torch.float32, device=scores.device).scatter(-1, index, 1.0)
    scores = torch.where(mask > 0, scores, torch.full_like(scores, float("-inf")))
    return scores.softmax(dim=-1)


def reference_knn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: int,
                            scale: float) -> torch.Tensor:
    """o [B, H, Nq, Dv] from q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv] (one dtype)."""
    return knn_probabilities(q, k, topk, scale) @ v
