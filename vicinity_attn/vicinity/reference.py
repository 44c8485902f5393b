"""The quadratic reference: the definition of vicinity attention, written as directly as possible.

It builds the full Nq x Nk weight matrix from the angles (not from the position features, so it
checks them too) and computes in the inputs' own dtype. In float64 it is the oracle every other
backend is tested against; in a low precision it is "the plain PyTorch computation in that dtype"
of the tolerance rule. Memory is O(B H Nq Nk): small N only.
"""
from __future__ import annotations

import math

import torch

from ..common.feature_maps import apply_feature_map
from ..common.positions import expand_features, grid_angles, position_features
from ..common.spec import VicinitySpec


def vicinity_weights(spec: VicinitySpec, *, dtype: torch.dtype = torch.float64,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """The [Nq, Nk] matrix w(i, j) of the README's "The math in short", prefix rows and columns set to 1;
    with ``spec.causal == "frames"`` times the frame-causal mask (:func:`frame_mask`)."""
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
    if spec.causal is not None:
        w = w * frame_mask(spec, device=device)
    return w.to(dtype)


def token_frames(grid: tuple[int, ...], num_prefix_tokens: int, *, device=None) -> torch.Tensor:
    """Each token's frame (its first grid coordinate), -1 for the prefix tokens: int64 [P + prod(grid)]."""
    frames = torch.arange(grid[0], device=device).repeat_interleave(math.prod(grid[1:]))
    return torch.cat([torch.full((num_prefix_tokens,), -1, device=device), frames])


def frame_mask(spec: VicinitySpec, *, device=None) -> torch.Tensor:
    """The frame-causal mask [Nq, Nk] (float64 0 / 1): query i sees key j when frame(j) <= frame(i), the
    prefix tokens being frame -1 (every token sees the prefix keys; prefix queries see only them)."""
    fq = token_frames(spec.grid, spec.num_prefix_tokens, device=device)
    fk = token_frames(spec.kv_grid, spec.num_prefix_tokens, device=device)
    return (fk[None, :] <= fq[:, None]).to(torch.float64)


def abs_clamp(t: torch.Tensor, clamp: tuple[float, float]) -> torch.Tensor:
    """|t| clamped into [clamp[0], clamp[1]], sign kept, zeros stay 0 (the VVT authors' ``abs_clamp``,
    out of place; autograd gives 0 where |t| is outside the range and at t = 0)."""
    return t.abs().clamp(*clamp) * t.sign()


def _normaliser(row_sums: torch.Tensor, spec: VicinitySpec) -> torch.Tensor:
    """den = max(row_sums, den_floor) + eps (no clamp op at all when there is no floor)."""
    if spec.den_floor > 0:
        row_sums = row_sums.clamp_min(spec.den_floor)
    return row_sums + spec.eps


def reference_vicinity_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 spec: VicinitySpec) -> torch.Tensor:
    """o_i = sum_j phi(q_i).phi(k_j) w(i,j) v_j / (max(sum_j phi(q_i).phi(k_j) w(i,j), den_floor) + eps).

    q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv] (any strides) -> o [B, H, Nq, Dv], in q's
    dtype, computed in that dtype with plain autograd.
    """
    if spec.clamp is not None:
        return _clamped_feature_form(q, k, v, spec)
    phi_q = apply_feature_map(q, spec.feature_map)
    phi_k = apply_feature_map(k, spec.feature_map)
    scores = phi_q @ phi_k.transpose(-1, -2)                       # [B, H, Nq, Nk]
    weighted = scores * vicinity_weights(spec, dtype=q.dtype, device=q.device)
    numerator = weighted @ v
    denominator = _normaliser(weighted.sum(-1, keepdim=True), spec)
    return numerator / denominator


def _clamped_feature_form(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: VicinitySpec) -> torch.Tensor:
    """The clamped computation in the authors' feature form (their VVT ``forward``):
    S = C(K_x^T V), r = C(1 / den), num = C(Q_x S), o = C(num * r), C = abs_clamp; den as without clamp.

    Q_x S is taken as phi(q_i)^T (sum_m P_q(i)_m S_m): the clamped states are mixed per query first, so
    states that cancel exactly (clamped ones are often exactly +-min_mag) give an exact 0, which the
    clamp keeps at 0; one [F*D]-long product would leave a rounding residual that it raises to min_mag."""
    kw = dict(num_prefix_tokens=spec.num_prefix_tokens, dtype=q.dtype, device=q.device)
    pos_q = position_features(spec.grid, spec.variant, side="query", **kw)
    pos_k = position_features(spec.kv_grid, spec.variant, side="key", **kw)
    xq = expand_features(apply_feature_map(q, spec.feature_map), pos_q)       # [B, H, Nq, F*D]
    xk = expand_features(apply_feature_map(k, spec.feature_map), pos_k)       # [B, H, Nk, F*D]
    phi_q = apply_feature_map(q, spec.feature_map)                             # [B, H, Nq, D]
    if spec.causal is None:
        states = abs_clamp(xk.transpose(-1, -2) @ v, spec.clamp)               # [B, H, F*D, Dv]
        row_sums = (xq * xk.sum(dim=2, keepdim=True)).sum(-1, keepdim=True)    # [B, H, Nq, 1]
        numerator = _mixed_numerator(phi_q, pos_q, states)
    else:
        # Frame-causal: the states each query sees are those of the keys of its frame and before (the
        # mask's rows), clamped as the states of a bidirectional call are.
        mask = frame_mask(spec, device=q.device).to(q.dtype)                   # [Nq, Nk]
        visible = mask[:, :, None] * xk[:, :, None]                            # [B, H, Nq, Nk, F*D]
        states = abs_clamp(visible.transpose(-1, -2) @ v[:, :, None], spec.clamp)   # [B, H, Nq, F*D, Dv]
        row_sums = (xq * visible.sum(dim=3)).sum(-1, keepdim=True)
        numerator = _mixed_numerator(phi_q, pos_q, states)
    inv_den = abs_clamp(1.0 / _normaliser(row_sums, spec), spec.clamp)
    numerator = abs_clamp(numerator, spec.clamp)
    return abs_clamp(numerator * inv_den, spec.clamp)


def _mixed_numerator(phi_q: torch.Tensor, pos_q: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """num_i = phi(q_i)^T M_i with M_i = sum_m P_q(i)_m S_m summed feature by feature in order:
    phi_q [B, H, Nq, D], pos_q [Nq, F], states [B, H, F*D, Dv] (or [B, H, Nq, F*D, Dv]: each query its own
    states) -> [B, H, Nq, Dv]."""
    F = pos_q.shape[1]
    if states.dim() == 4:
        states = states[:, :, None]
    S = states.unflatten(-2, (F, -1))                                          # [B, H, 1 or Nq, F, D, Dv]
    mixed = pos_q[:, 0, None, None] * S[:, :, :, 0]                            # [B, H, Nq, D, Dv]
    for m in range(1, F):
        mixed = mixed + pos_q[:, m, None, None] * S[:, :, :, m]
    return (phi_q.unsqueeze(-2) @ mixed).squeeze(-2)
