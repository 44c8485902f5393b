"""The forward-mode derivative (tangent) of vicinity attention, in plain PyTorch, for every backend.

With X = [P_q(i)_m phi(q_i)]_m and Y = [P_k(j)_m phi(k_j)]_m the F*D-wide expanded features
(README, "The math in short"), S = Y^T v, z = sum_j Y_j, num = X S, den = X z + eps and
o = num / den. Differentiating along tangents (tq, tk, tv):

    dX = expand(phi'(q) tq),  dY = expand(phi'(k) tk)
    dS = dY^T v + Y^T tv,     dz = sum_j dY_j
    d num = dX S + X dS,      d den = dX z + X dz
    do = (d num - o d den) / den

With L2ViT's normaliser floor (a spec's ``den_floor``: den = max(X z, den_floor) + eps) the floor
is a constant where it is active, so d den = 0 there. Spec options this module does not know (e.g.
a magnitude clamp) raise NotImplementedError rather than give a tangent that ignores them.

It builds the expanded features (F x the activations, the authors' formulation): forward AD is a
rare path, and this keeps it short and obviously the derivative of the formula. Computed in float32
(float64 for float64 inputs) like the backends; the result has q's dtype.
"""
from __future__ import annotations

import dataclasses

import torch

from ..common.allocation import compute_dtype
from ..common.feature_maps import apply_feature_map, feature_map_grad_mul
from ..common.positions import expand_features, position_features
from ..common.spec import VicinitySpec

# Spec fields the tangent accounts for; any other field must be at its default.
_SUPPORTED_FIELDS = frozenset({"grid", "kv_grid", "variant", "feature_map", "eps", "num_prefix_tokens", "den_floor",
                               "causal"})


def check_tangent_supported(spec: VicinitySpec) -> None:
    """NotImplementedError naming a spec option forward-mode AD does not handle."""
    for field in dataclasses.fields(spec):
        value = getattr(spec, field.name)
        if field.name not in _SUPPORTED_FIELDS and value != field.default:
            raise NotImplementedError(
                f"forward-mode AD (torch.func.jvp / jacfwd, torch.autograd.forward_ad) of vicinity_attention "
                f"does not support {field.name}={value!r}; reverse mode (.backward(), torch.func.grad) does")


def _feature_tangent(phi: torch.Tensor, tx: torch.Tensor, feature_map: str) -> torch.Tensor:
    """phi'(x) tx, with autograd's semantics where phi' = 0 (see ``feature_map_grad_mul``)."""
    return feature_map_grad_mul(tx.to(phi.dtype), phi, feature_map)


def vicinity_tangent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor | None,
                     tk: torch.Tensor | None, tv: torch.Tensor | None, spec: VicinitySpec) -> torch.Tensor:
    """The tangent of o [B, H, Nq, Dv] along (tq, tk, tv) (each shaped like its input, None for zero),
    for q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv]; in q's dtype."""
    check_tangent_supported(spec)
    if spec.causal is not None:
        return _frames_tangent(q, k, v, tq, tk, tv, spec)
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
    raw_den = X @ z.unsqueeze(-1)                                               # [B, H, Nq, 1]
    den_floor = getattr(spec, "den_floor", 0.0)
    den = (raw_den.clamp_min(den_floor) if den_floor > 0 else raw_den) + spec.eps
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
    if den_floor > 0:
        d_den_sum = d_den_sum.masked_fill(raw_den < den_floor, 0.0)   # the floor is a constant
    return ((sum(d_num) - o * d_den_sum) / den).to(q.dtype)


def _frames_tangent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor | None,
                    tk: torch.Tensor | None, tv: torch.Tensor | None, spec: VicinitySpec) -> torch.Tensor:
    """:func:`vicinity_tangent` of a frame-causal call: the same formulas with each query's slot states
    (:mod:`.frames`): dS(s) and dz(s) are the prefix sums of the slots' own state tangents."""
    from .frames import frame_constant, read_slots, slot_features, slot_states
    dtype = compute_dtype(q.dtype)
    P = spec.num_prefix_tokens
    pos_q, pos_qp = slot_features(spec, "query", 0, spec.n_frames, dtype, q.device)
    pos_k, pos_kp = slot_features(spec, "key", 0, spec.n_frames, dtype, q.device)
    const_q, const_k = frame_constant(spec, "query"), frame_constant(spec, "key")
    fq = apply_feature_map(q.to(dtype), spec.feature_map)
    fk = apply_feature_map(k.to(dtype), spec.feature_map)
    v = v.to(dtype)
    U, Uz = slot_states(fk, v, pos_k, pos_kp, P, const_k)
    S, z = U.cumsum(2), Uz.cumsum(2)
    num, raw_den = read_slots(fq, S, z, pos_q, pos_qp, P, const_q)
    den = (raw_den.clamp_min(spec.den_floor) if spec.den_floor > 0 else raw_den) + spec.eps
    o = num / den[..., None]

    d_num, d_den = [], []
    if tq is not None:
        n_q, r_q = read_slots(_feature_tangent(fq, tq, spec.feature_map), S, z, pos_q, pos_qp, P, const_q)
        d_num.append(n_q)
        d_den.append(r_q)
    if tk is not None:
        dU, dUz = slot_states(_feature_tangent(fk, tk, spec.feature_map), v, pos_k, pos_kp, P, const_k)
        n_k, r_k = read_slots(fq, dU.cumsum(2), dUz.cumsum(2), pos_q, pos_qp, P, const_q)
        d_num.append(n_k)
        d_den.append(r_k)
    if tv is not None:
        dU, _ = slot_states(fk, tv.to(dtype), pos_k, pos_kp, P, const_k)
        d_num.append(read_slots(fq, dU.cumsum(2), z, pos_q, pos_qp, P, const_q)[0])
    if not d_num:
        return torch.zeros_like(o, dtype=q.dtype)
    d_den_sum = sum(d_den) if d_den else torch.zeros_like(den)
    if spec.den_floor > 0:
        d_den_sum = d_den_sum.masked_fill(raw_den < spec.den_floor, 0.0)
    return ((sum(d_num) - o * d_den_sum[..., None]) / den[..., None]).to(q.dtype)
