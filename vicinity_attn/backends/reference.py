"""The quadratic reference: the definition of vicinity attention, written as directly as possible.

It builds the full Nq x Nk weight matrix from the angles (not from the position features, so it
checks them too) and computes in the inputs' own dtype. In float64 it is the oracle every other
backend is tested against; in a low precision it is "the plain PyTorch computation in that dtype"
of the tolerance rule. Memory is O(B H Nq Nk): small N only.
"""
from __future__ import annotations

import torch

from ..feature_maps import apply_feature_map
from ..positions import grid_angles
from ..spec import VicinitySpec


def vicinity_weights(spec: VicinitySpec, *, dtype: torch.dtype = torch.float64,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """The [Nq, Nk] matrix w(i, j) of DESIGN.md section 1, prefix rows and columns set to 1."""
    theta_q = grid_angles(spec.grid, device=device)      # [Nq_grid, n_axes]
    theta_k = grid_angles(spec.kv_grid, device=device)   # [Nk_grid, n_axes]
    diff = theta_q[:, None, :] - theta_k[None, :, :]     # [Nq_grid, Nk_grid, n_axes]
    if spec.variant == "sum":
        w = torch.cos(diff).sum(-1)
    elif spec.variant == "product":
        w = torch.cos(diff).prod(-1)
    else:
        w = torch.ones(diff.shape[:2], dtype=torch.float64, device=device)
    p = spec.num_prefix_tokens
    if p:
        full = torch.ones(p + w.shape[0], p + w.shape[1], dtype=torch.float64, device=device)
        full[p:, p:] = w
        w = full
    return w.to(dtype)


def reference_vicinity_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 spec: VicinitySpec) -> torch.Tensor:
    """o_i = sum_j phi(q_i).phi(k_j) w(i,j) v_j / (sum_j phi(q_i).phi(k_j) w(i,j) + eps).

    q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv] (any strides) -> o [B, H, Nq, Dv], in q's
    dtype, computed in that dtype with plain autograd.
    """
    phi_q = apply_feature_map(q, spec.feature_map)
    phi_k = apply_feature_map(k, spec.feature_map)
    scores = phi_q @ phi_k.transpose(-1, -2)                       # [B, H, Nq, Nk]
    weighted = scores * vicinity_weights(spec, dtype=q.dtype, device=q.device)
    numerator = weighted @ v
    denominator = weighted.sum(-1, keepdim=True) + spec.eps
    return numerator / denominator
