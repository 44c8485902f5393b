"""The authors' formulation of vicinity attention, written here as a baseline.

The released VVT code materialises, for every token, the expanded features
``[phi(q) cos t_row, phi(q) sin t_row, phi(q) cos t_col, phi(q) sin t_col]`` (F*D wide, 4x the
activations on a 2-d grid), the same for the keys, and then computes two full-length matmuls:
``kv = Kx^T V`` and ``num = Qx kv``, ``den = Qx (Kx^T 1) + eps``. Autograd differentiates it and so
keeps the expanded tensors alive for the backward. That is the memory / traffic cost the fused
and chunked backends avoid; this module reproduces it faithfully, minus the authors' magnitude
clamps (a training hack, not part of the operation: see the README's "The math in short"), so that it equals the
reference numerically and the comparison is about speed only.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from vicinity_attn.common.feature_maps import apply_feature_map
from vicinity_attn.common.positions import expand_features, position_features


def authors_vicinity_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               grid: Sequence[int], kv_grid: Sequence[int] | None = None, *,
                               variant: str = "sum", feature_map: str = "relu",
                               eps: float = 1e-4) -> torch.Tensor:
    """Vicinity attention as the authors' code computes it: q [B,H,Nq,D], k [B,H,Nk,D],
    v [B,H,Nk,Dv] -> [B,H,Nq,Dv], in the inputs' dtype, plain autograd, no clamps."""
    kv_grid = grid if kv_grid is None else kv_grid
    # The authors recompute the cos/sin tables on every forward; so do we (O(N), negligible).
    pos_q = position_features(tuple(grid), variant, side="query", dtype=q.dtype, device=q.device)
    pos_k = position_features(tuple(kv_grid), variant, side="key", dtype=q.dtype, device=q.device)
    q_x = expand_features(apply_feature_map(q, feature_map), pos_q)   # [B, H, Nq, F*D]
    k_x = expand_features(apply_feature_map(k, feature_map), pos_k)   # [B, H, Nk, F*D]
    kv = k_x.transpose(-1, -2) @ v                                    # [B, H, F*D, Dv]
    k_sum = k_x.sum(dim=-2).unsqueeze(-1)                             # [B, H, F*D, 1]
    num = q_x @ kv                                                    # [B, H, Nq, Dv]
    den = q_x @ k_sum + eps                                           # [B, H, Nq, 1]
    return num / den
