"""The forward-mode derivative (tangent) of vicinity attention, in plain PyTorch, for every backend.

With X = [P_q(i)_m phi(q_i)]_m and Y = [P_k(j)_m phi(k_j)]_m the F*D-wide expanded features
(DESIGN.md section 1, "Why it is linear"), S = Y^T v, z = sum_j Y_j, num = X S, den = X z + eps and
o = num / den. Differentiating along tangents (tq, tk, tv):

    dX = expand(phi'(q) tq),  dY = expand(phi'(k) tk)
    dS = dY^T v + Y^T tv,     dz = sum_j dY_j
    d num = dX S + X dS,      d den = dX z + X dz
    do = (d num - o d den) / den

It builds the expanded features (F x the activations, the authors' formulation): forward AD is a
rare path, and this keeps it short and obviously the derivative of the formula. Computed in float32
(float64 for float64 inputs) like the backends; the result has q's dtype.
"""
from __future__ import annotations

import torch

from ..feature_maps import apply_feature_map, feature_map_grad_mul
from ..layout import compute_dtype
from ..positions import expand_features, position_features
from ..spec import VicinitySpec


def _feature_tangent(phi: torch.Tensor, tx: torch.Tensor, feature_map: str) -> torch.Tensor:
    """phi'(x) tx, with autograd's semantics where phi' = 0 (see ``feature_map_grad_mul``)."""
    return feature_map_grad_mul(tx.to(phi.dtype), phi, feature_map)


def vicinity_tangent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor | None,
                     tk: torch.Tensor | None, tv: torch.Tensor | None, spec: VicinitySpec) -> torch.Tensor:
    """The tangent of o [B, H, Nq, Dv] along (tq, tk, tv) (each shaped like its input, None for zero),
    for q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv]; in q's dtype."""
    dtype = compute_dtype(q.dtype)
    kw = dict(num_prefix_tokens=spec.num_prefix_tokens, dtype=dtype, device=q.device)
    pos_q = position_features(spec.grid, spec.variant, side="query", **kw)      # [Nq, F]
    pos_k = position_features(spec.kv_grid, spec.variant, side="key", **kw)     # [Nk, F]
    fq = apply_feature_map(q.to(dtype), spec.feature_map)
    fk = apply_feature_map(k.to(dtype), spec.feature_map)
    v = v.to(dtype)
    X, Y = expand_features(fq, pos_q), expand_features(fk, pos_k)               # [B, H, N, F*D]
    S = Y.transpose(-1, -2) @ v                                                 # [B, H, F*D, Dv]
    z = Y.sum(-2)                                                               # [B, H, F*D]
    den = (X @ z.unsqueeze(-1)) + spec.eps                                      # [B, H, Nq, 1]
    o = (X @ S) / den

    # Sums built out of place: under vmap (jacfwd) the tangents are batched and o, den are not.
    d_num, d_den = [], []
    if tq is not None:
        dX = expand_features(_feature_tangent(fq, tq, spec.feature_map), pos_q)
        d_num.append(dX @ S)
        d_den.append(dX @ z.unsqueeze(-1))
    if tk is not None:
        dY = expand_features(_feature_tangent(fk, tk, spec.feature_map), pos_k)
        d_num.append(X @ (dY.transpose(-1, -2) @ v))
        d_den.append(X @ dY.sum(-2).unsqueeze(-1))
    if tv is not None:
        d_num.append(X @ (Y.transpose(-1, -2) @ tv.to(dtype)))
    if not d_num:
        return torch.zeros_like(o, dtype=q.dtype)
    d_den_sum = sum(d_den) if d_den else torch.zeros_like(den)
    return ((sum(d_num) - o * d_den_sum) / den).to(q.dtype)
