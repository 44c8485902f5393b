"""The torch backend's pieces for one shard of a token sequence (context parallelism).

Under context parallelism every rank holds a contiguous run of the queries and of the keys of one
sequence (:class:`~vicinity_attn.common.spec.TokenShard`), which is not a grid, so the axis-term grouping of
:mod:`vicinity_attn.vicinity.torch_backend` does not apply. These pieces use the feature form of the
README's "The math in short" instead, with the position features of the shard's own sequence positions
(:func:`vicinity_attn.common.positions.position_features` with ``tokens``), one feature at a time so that no
F*D-wide expanded features are ever built:

    states:          S_m = sum_j P_k(j)_m phi(k_j) v_j^T,  z_m = sum_j P_k(j)_m phi(k_j)   (local keys)
    output:          o_i = num_i / den_i from the summed S, z                            (local queries)
    query_backward:  dq, and dS_m = sum_i P_q(i)_m phi(q_i) g_i^T, dz_m = sum_i P_q(i)_m phi(q_i) c_i
    key_backward:    dk, dv from the summed dS, dz

(F matrix products per token and pass where the axis terms need n_axes; F = 4 for the paper's 2-d
"sum".) States are [B, H, F, D, Dv] and [B, H, F, D], unscaled, in the compute dtype (float32,
float64 for float64 inputs). :mod:`vicinity_attn.vicinity.context_parallel` sums them over ranks between the
pieces. The normaliser floor, eps and the VVT clamp act on the summed states, in ``output``.
"""
from __future__ import annotations

import torch

from ..common.allocation import compute_dtype
from ..common.feature_maps import apply_feature_map, mul_feature_map_grad_
from ..common.positions import position_features
from ..common.spec import TokenShard, VicinitySpec
from .torch_backend import _divide_, abs_clamp_, clamped_row_grads, clamped_state_passes, floor_active, normalise_


def _positions(spec: VicinitySpec, side: str, offset: int, n: int, dtype, device) -> torch.Tensor:
    """[n, F] position features of the tokens at sequence positions offset .. offset + n - 1."""
    grid = spec.grid if side == "query" else spec.kv_grid
    return position_features(grid, spec.variant, side=side, num_prefix_tokens=spec.num_prefix_tokens,
                             dtype=dtype, device=device, tokens=range(offset, offset + n))


def states(k: torch.Tensor, v: torch.Tensor, spec: VicinitySpec,
           shard: TokenShard) -> tuple[torch.Tensor, torch.Tensor]:
    """(S [B, H, F, D, Dv], z [B, H, F, D]) over the local keys k [B, H, n, D], v [B, H, n, Dv]."""
    dtype = compute_dtype(k.dtype)
    pos = _positions(spec, "key", shard.k_offset, k.shape[2], dtype, k.device)
    phi = apply_feature_map(k.to(dtype), spec.feature_map)
    vc = v.to(dtype)
    S = torch.stack([(phi * pos[:, m, None]).transpose(-1, -2) @ vc for m in range(pos.shape[1])], dim=2)
    return S, pos.T @ phi


def _numerator(phi: torch.Tensor, pos: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """sum_m P_m(i) phi(q_i)^T S_m: [B, H, n, Dv]."""
    num = (phi * pos[:, 0, None]) @ S[:, :, 0]
    for m in range(1, pos.shape[1]):
        num += (phi * pos[:, m, None]) @ S[:, :, m]
    return num


def output(q: torch.Tensor, S: torch.Tensor, z: torch.Tensor, spec: VicinitySpec,
           shard: TokenShard) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o [B, H, n, Dv] in q's dtype, den [B, H, n], the states as used: clamped with a clamp) for the
    local queries q [B, H, n, D], from the states summed over every rank's keys."""
    dtype = S.dtype
    if spec.clamp is not None:
        S = abs_clamp_(S.clone(), spec.clamp)
    pos = _positions(spec, "query", shard.q_offset, q.shape[2], dtype, q.device)
    phi = apply_feature_map(q.to(dtype), spec.feature_map)
    num = _numerator(phi, pos, S)
    den = normalise_(((phi @ z.transpose(-1, -2)) * pos).sum(-1), spec)
    return _divide_(num, den, spec).to(q.dtype), den, S


def query_backward(do: torch.Tensor, q: torch.Tensor, o: torch.Tensor, den: torch.Tensor, S: torch.Tensor,
                   z: torch.Tensor, spec: VicinitySpec, shard: TokenShard, need_dq: bool = True,
                   ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(dq or None, dS, dz): the local queries' gradient and their share of the state gradients, from
    dO [B, H, n, Dv] and :func:`output`'s o, den and states (the summed z)."""
    dtype = S.dtype
    pos = _positions(spec, "query", shard.q_offset, q.shape[2], dtype, q.device)
    phi = apply_feature_map(q.to(dtype), spec.feature_map)
    dof = do.to(dtype)
    if spec.clamp is None:
        g = dof / den.unsqueeze(-1)
        c = -(dof * o.to(dtype)).sum(-1, keepdim=True) / den.unsqueeze(-1)
    else:
        g = torch.empty_like(dof)
        c = clamped_row_grads(dof, _numerator(phi, pos, S), den, spec.clamp, g)
    floored = floor_active(den, spec)
    if floored is not None:   # there den is a constant: no gradient flows into it
        c = c.masked_fill(floored.unsqueeze(-1), 0.0)
    cp = c * pos                                                         # [B, H, n, F]
    dS = torch.stack([(phi * pos[:, m, None]).transpose(-1, -2) @ g for m in range(pos.shape[1])], dim=2)
    dz = cp.transpose(-1, -2) @ phi
    dq = None
    if need_dq:
        dphi = cp @ z
        for m in range(pos.shape[1]):
            dphi += pos[:, m, None] * (g @ S[:, :, m].transpose(-1, -2))
        dq = mul_feature_map_grad_(dphi, phi, spec.feature_map).to(q.dtype)
    return dq, dS, dz


def key_backward(k: torch.Tensor, v: torch.Tensor, S: torch.Tensor, dS: torch.Tensor, dz: torch.Tensor,
                 spec: VicinitySpec, shard: TokenShard, need_dk: bool = True, need_dv: bool = True,
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dk, dv) (None where not needed) of the local keys from the state gradients summed over every
    rank's queries; S: the states as :func:`output` used them (with a clamp, dS is 0 where S was clamped)."""
    dtype = dS.dtype
    if spec.clamp is not None:
        dS = dS * clamped_state_passes(S, spec.clamp)
    pos = _positions(spec, "key", shard.k_offset, k.shape[2], dtype, k.device)
    phi = apply_feature_map(k.to(dtype), spec.feature_map)
    dk = dv = None
    if need_dv:
        dv = _numerator(phi, pos, dS).to(v.dtype)
    if need_dk:
        vc = v.to(dtype)
        dphi = pos @ dz
        for m in range(pos.shape[1]):
            dphi += pos[:, m, None] * (vc @ dS[:, :, m].transpose(-1, -2))
        dk = mul_feature_map_grad_(dphi, phi, spec.feature_map).to(k.dtype)
    return dk, dv
