"""The linear pure-PyTorch backend: runs on any device; the default where no GPU is present.

Per (batch, head) it keeps the feature states of DESIGN.md section 1, S_m = sum_j P_k(j)_m
phi(k_j) v_j^T and z_m = sum_j P_k(j)_m phi(k_j) for the F position features, but computes them,
the output and the gradients term by term over grid axes (:mod:`vicinity_attn.axis_terms`): tokens
grouped by their coordinate on one axis share that axis's features, so each term costs one
D x Dv product per token instead of one per feature. For the paper's 2-d "sum" variant that is
half the FLOPs of the feature form (2 instead of 4 per token and pass), with no F*D-wide expanded
features at all; nothing Nq x Nk is ever formed, and temporaries are O(N * max(D, Dv)).

Everything is computed in float32 (float64 for float64 inputs). :func:`forward` and
:func:`backward` are shared by the autograd Function here and the custom op of
:mod:`vicinity_attn.ops`; what is saved for backward is q, k, v, o, den, S and z.
"""
from __future__ import annotations

import torch

from .axis_terms import AxisTerm, axis_terms, group_by_axis, ungroup_by_axis
from .feature_maps import apply_feature_map, feature_map_grad
from .layout import empty_output_like
from .spec import VicinitySpec


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scaled(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return x if scale is None else x * scale[:, None]


def _mix(coord: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """[s, G] coordinate features and [B, H, G, ...] states -> [B, H, s, ...] = sum_g coord[c, g] states[g]."""
    B, H, G = states.shape[:3]
    return (coord @ states.reshape(B, H, G, -1)).reshape(B, H, coord.shape[0], *states.shape[3:])


def _unmix(coord: torch.Tensor, per_coord: torch.Tensor) -> torch.Tensor:
    """Adjoint of :func:`_mix`: [s, G] and [B, H, s, ...] -> [B, H, G, ...]."""
    B, H, s = per_coord.shape[:3]
    return (coord.T @ per_coord.reshape(B, H, s, -1)).reshape(B, H, coord.shape[1], *per_coord.shape[3:])


class _Setup:
    """Everything forward and backward both need: terms, grids, prefix split, compute dtype."""

    def __init__(self, q: torch.Tensor, spec: VicinitySpec, dtype: torch.dtype):
        self.spec, self.dtype = spec, dtype
        self.P = spec.num_prefix_tokens
        self.F = spec.n_features
        self.terms: list[AxisTerm] = axis_terms(spec.grid, spec.kv_grid, spec.variant, dtype=dtype,
                                                device=q.device)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            spec: VicinitySpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward pass: (o, den, S, z).

    o [B, H, Nq, Dv] in q's dtype and memory order; den [B, H, Nq] (eps included), S [B, H, F*D, Dv]
    and z [B, H, F*D] in the compute dtype (float32, float64 for float64 inputs): what
    :func:`backward` needs.
    """
    dtype = compute_dtype(q.dtype)
    st = _Setup(q, spec, dtype)
    P, F = st.P, st.F
    B, H, Nq, D = q.shape
    Dv = v.shape[-1]
    phi_k = apply_feature_map(k.to(dtype), spec.feature_map)
    v_c = v.to(dtype)
    S = torch.zeros(B, H, F, D, Dv, dtype=dtype, device=q.device)
    z = torch.zeros(B, H, F, D, dtype=dtype, device=q.device)
    pk, vk = phi_k[:, :, P:], v_c[:, :, P:]
    for t in st.terms:
        xg = group_by_axis(_scaled(pk, t.scale_k), spec.kv_grid, t.axis)   # [B, H, s, n, D]
        per_coord = xg.transpose(-1, -2) @ group_by_axis(vk, spec.kv_grid, t.axis)
        S[:, :, list(t.features)] = _unmix(t.coord_k, per_coord)
        z[:, :, list(t.features)] = _unmix(t.coord_k, xg.sum(3))
    if P:
        # Prefix features: F-2 carries the prefix keys, F-1 the grid keys (positions.py scheme).
        S[:, :, F - 2] = phi_k[:, :, :P].transpose(-1, -2) @ v_c[:, :, :P]
        z[:, :, F - 2] = phi_k[:, :, :P].sum(2)
        S[:, :, F - 1] = pk.transpose(-1, -2) @ vk
        z[:, :, F - 1] = pk.sum(2)

    phi_q = apply_feature_map(q.to(dtype), spec.feature_map)
    pq = phi_q[:, :, P:]
    num = torch.zeros(B, H, Nq, Dv, dtype=dtype, device=q.device)
    den = torch.zeros(B, H, Nq, dtype=dtype, device=q.device)
    for t in st.terms:
        M = _mix(t.coord_q, S[:, :, list(t.features)])                     # [B, H, s, D, Dv]
        m = _mix(t.coord_q, z[:, :, list(t.features)])                     # [B, H, s, D]
        xg = group_by_axis(pq, spec.grid, t.axis)
        num[:, :, P:] += _scaled_rows(ungroup_by_axis(xg @ M, spec.grid, t.axis), t.scale_q)
        den[:, :, P:] += _scaled_rows(ungroup_by_axis(xg @ m.unsqueeze(-1), spec.grid, t.axis), t.scale_q)[..., 0]
    if P:
        num[:, :, P:] += pq @ S[:, :, F - 2]
        den[:, :, P:] += (pq @ z[:, :, F - 2].unsqueeze(-1))[..., 0]
        num[:, :, :P] = phi_q[:, :, :P] @ (S[:, :, F - 2] + S[:, :, F - 1])
        den[:, :, :P] = (phi_q[:, :, :P] @ (z[:, :, F - 2] + z[:, :, F - 1]).unsqueeze(-1))[..., 0]
    den += spec.eps
    o = empty_output_like(q, Dv)
    torch.div(num, den.unsqueeze(-1), out=num)
    o.copy_(num)
    return o, den, S.view(B, H, F * D, Dv), z.view(B, H, F * D)


def _scaled_rows(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x [B, H, N, E] with row i multiplied by scale[i] (None = 1)."""
    return x if scale is None else x * scale[:, None]


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             den: torch.Tensor, S: torch.Tensor, z: torch.Tensor, spec: VicinitySpec,
             needs: tuple[bool, bool, bool] = (True, True, True),
             ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The backward pass: (dq, dk, dv) from dO [B, H, Nq, Dv] and :func:`forward`'s outputs.

    ``needs`` says which of dq, dk, dv to compute; the others are returned as None.
    Gradients have the dtype and memory order of q, k, v.
    """
    dtype = den.dtype
    st = _Setup(q, spec, dtype)
    P, F = st.P, st.F
    need_dq, need_dk, need_dv = needs
    B, H, Nq, D = q.shape
    Dv = v.shape[-1]
    S = S.view(B, H, F, D, Dv)
    z = z.view(B, H, F, D)
    # g = dO / den and c = -(dO . o) / den, the gradients of num and of den.
    inv_den = den.reciprocal().unsqueeze(-1)
    do_c = do.to(dtype)
    g = do_c * inv_den
    c = -(do_c * o.to(dtype)).sum(-1, keepdim=True) * inv_den                # [B, H, Nq, 1]
    q_c = q.to(dtype)
    phi_q = apply_feature_map(q_c, spec.feature_map)
    pq, gq, cq = phi_q[:, :, P:], g[:, :, P:], c[:, :, P:]
    dS = torch.zeros_like(S)
    dz = torch.zeros_like(z)
    dphi_q = torch.zeros_like(phi_q) if need_dq else None
    for t in st.terms:
        feats = list(t.features)
        xg = group_by_axis(_scaled(pq, t.scale_q), spec.grid, t.axis)
        gg = group_by_axis(gq, spec.grid, t.axis)
        cg = group_by_axis(cq, spec.grid, t.axis)
        dS[:, :, feats] = _unmix(t.coord_q, xg.transpose(-1, -2) @ gg)
        dz[:, :, feats] = _unmix(t.coord_q, (xg * cg).sum(3))
        if need_dq:
            M = _mix(t.coord_q, S[:, :, feats])
            m = _mix(t.coord_q, z[:, :, feats])
            grad = torch.matmul(gg, M.transpose(-1, -2)).addcmul_(cg, m.unsqueeze(3))
            dphi_q[:, :, P:] += _scaled_rows(ungroup_by_axis(grad, spec.grid, t.axis), t.scale_q)
    if P:
        gp, cp, xp = g[:, :, :P], c[:, :, :P], phi_q[:, :, :P]
        dS_pre = xp.transpose(-1, -2) @ gp                                   # prefix queries see F-2 and F-1
        dz_pre = (xp * cp).sum(2)
        dS[:, :, F - 2] = pq.transpose(-1, -2) @ gq + dS_pre
        dz[:, :, F - 2] = (pq * cq).sum(2) + dz_pre
        dS[:, :, F - 1] = dS_pre
        dz[:, :, F - 1] = dz_pre
        if need_dq:
            dphi_q[:, :, P:] += torch.matmul(gq, S[:, :, F - 2].transpose(-1, -2)).addcmul_(cq, z[:, :, None, F - 2])
            S_pre = S[:, :, F - 2] + S[:, :, F - 1]
            z_pre = z[:, :, F - 2] + z[:, :, F - 1]
            dphi_q[:, :, :P] = torch.matmul(gp, S_pre.transpose(-1, -2)).addcmul_(cp, z_pre.unsqueeze(2))
    dq = None
    if need_dq:
        dq = torch.empty_like(q)
        dq.copy_(dphi_q.mul_(feature_map_grad(q_c, phi_q, spec.feature_map)))
    if not (need_dk or need_dv):
        return dq, None, None

    k_c = k.to(dtype)
    phi_k = apply_feature_map(k_c, spec.feature_map)
    v_c = v.to(dtype)
    pk, vk = phi_k[:, :, P:], v_c[:, :, P:]
    dphi_k = torch.zeros_like(phi_k) if need_dk else None
    dv_c = torch.zeros_like(v_c) if need_dv else None
    for t in st.terms:
        feats = list(t.features)
        dM = _mix(t.coord_k, dS[:, :, feats])                                # [B, H, s, D, Dv]
        dm = _mix(t.coord_k, dz[:, :, feats])                                # [B, H, s, D]
        if need_dv:
            xg = group_by_axis(_scaled(pk, t.scale_k), spec.kv_grid, t.axis)
            dv_c[:, :, P:] += ungroup_by_axis(xg @ dM, spec.kv_grid, t.axis)
        if need_dk:
            vg = group_by_axis(vk, spec.kv_grid, t.axis)
            grad = torch.matmul(vg, dM.transpose(-1, -2)).add_(dm.unsqueeze(3))
            dphi_k[:, :, P:] += _scaled_rows(ungroup_by_axis(grad, spec.kv_grid, t.axis), t.scale_k)
    if P:
        # Prefix keys carry feature F-2; grid keys additionally carry F-1.
        if need_dv:
            dv_c[:, :, :P] = phi_k[:, :, :P] @ dS[:, :, F - 2]
            dv_c[:, :, P:] += pk @ dS[:, :, F - 1]
        if need_dk:
            dphi_k[:, :, :P] = (v_c[:, :, :P] @ dS[:, :, F - 2].transpose(-1, -2)).add_(dz[:, :, None, F - 2])
            dphi_k[:, :, P:] += (vk @ dS[:, :, F - 1].transpose(-1, -2)).add_(dz[:, :, None, F - 1])
    dk = dv = None
    if need_dk:
        dk = torch.empty_like(k)
        dk.copy_(dphi_k.mul_(feature_map_grad(k_c, phi_k, spec.feature_map)))
    if need_dv:
        dv = torch.empty_like(v)
        dv.copy_(dv_c)
    return dq, dk, dv


class _TorchVicinityAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec: VicinitySpec):
        o, den, S, z = forward(q, k, v, spec)
        ctx.save_for_backward(q, k, v, o, den, S, z)
        ctx.spec = spec
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, den, S, z = ctx.saved_tensors
        dq, dk, dv = backward(do, q, k, v, o, den, S, z, ctx.spec, tuple(ctx.needs_input_grad[:3]))
        return dq, dk, dv, None


def torch_vicinity_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             spec: VicinitySpec) -> torch.Tensor:
    """Linear-time vicinity attention in pure PyTorch.

    q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv] (any strides, one floating dtype) ->
    o [B, H, Nq, Dv] in q's dtype, in q's memory order. Differentiable in q, k, v.
    """
    return _TorchVicinityAttention.apply(q, k, v, spec)
