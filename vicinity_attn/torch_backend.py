"""The linear pure-PyTorch backend: runs on any device; the default where no GPU is present.

Per (batch, head), with the position features P (N x F) of :mod:`vicinity_attn.positions`:

    S = sum_j X_k(j)^T v_j,  z = sum_j X_k(j),    X(j) = P(j) (x) phi(x_j), the F*D-wide "expanded" row
    num_i = X_q(i) S,        den_i = X_q(i) . z + eps,   o_i = num_i / den_i

Expanded rows exist only for one chunk of tokens at a time, so memory beyond the inputs and
outputs is O(chunk * F * D + F * D * Dv); nothing Nq x Nk is ever formed. Each pass is one wide
matmul over all F features at once (K = F * D), which runs far faster than F narrow ones.
Everything is computed in float32 (float64 for float64 inputs); the autograd Function saves
q, k, v, o, den, S and z and implements the backward of DESIGN.md section 1 by hand.
"""
from __future__ import annotations

import torch

from .feature_maps import apply_feature_map, feature_map_grad
from .layout import empty_output_like
from .positions import position_features
from .spec import VicinitySpec

# Tokens per chunk: large enough that the matmuls are efficient, small enough that the expanded
# chunk (chunk * F * D floats per head) stays in cache-friendly territory.
CHUNK_TOKENS = 1024


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(n: int, size: int = CHUNK_TOKENS):
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _expand(phi: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """[B, H, C, D] features and [C, F] positions -> [B, H, C, F*D] expanded rows."""
    B, H, C, D = phi.shape
    return (pos[:, :, None] * phi[:, :, :, None, :]).reshape(B, H, C, pos.shape[1] * D)


def _contract(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """[B, H, C, F*D] rows and [C, F] positions -> [B, H, C, D] = sum_m P_m * x[..., m, :]."""
    B, H, C, FD = x.shape
    F = pos.shape[1]
    return (x.view(B, H, C, F, FD // F) * pos[:, :, None]).sum(3)


def _phi(x: torch.Tensor, spec: VicinitySpec, dtype: torch.dtype) -> torch.Tensor:
    return apply_feature_map(x.to(dtype), spec.feature_map)


def _states(k: torch.Tensor, v: torch.Tensor, pos_k: torch.Tensor, spec: VicinitySpec,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """S [B, H, F*D, Dv] and z [B, H, F*D] accumulated over all keys."""
    B, H, Nk, D = k.shape
    F = pos_k.shape[1]
    S = torch.zeros(B, H, F * D, v.shape[-1], dtype=dtype, device=k.device)
    z = torch.zeros(B, H, F, D, dtype=dtype, device=k.device)
    for s, e in _chunks(Nk):
        phi_k = _phi(k[:, :, s:e], spec, dtype)
        S.add_(_expand(phi_k, pos_k[s:e]).transpose(-1, -2) @ v[:, :, s:e].to(dtype))
        z.add_(pos_k[s:e].T @ phi_k)  # [F, C] @ [B, H, C, D]: z_m = sum_j P_m(j) phi(k_j)
    return S, z.view(B, H, F * D)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            spec: VicinitySpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward pass: (o, den, S, z).

    o [B, H, Nq, Dv] in q's dtype and memory order; den [B, H, Nq], S [B, H, F*D, Dv] and z [B, H, F*D]
    in the compute dtype (float32, float64 for float64 inputs): what :func:`backward` needs.
    Shared by the autograd Function below and the custom op of :mod:`vicinity_attn.ops`.
    """
    dtype = compute_dtype(q.dtype)
    pos_q = position_features(spec.grid, spec.variant, side="query",
                              num_prefix_tokens=spec.num_prefix_tokens, dtype=dtype, device=q.device)
    pos_k = position_features(spec.kv_grid, spec.variant, side="key",
                              num_prefix_tokens=spec.num_prefix_tokens, dtype=dtype, device=q.device)
    S, z = _states(k, v, pos_k, spec, dtype)
    B, H, Nq, _ = q.shape
    o = empty_output_like(q, v.shape[-1])
    den = torch.empty(B, H, Nq, dtype=dtype, device=q.device)
    for s, e in _chunks(Nq):
        xq = _expand(_phi(q[:, :, s:e], spec, dtype), pos_q[s:e])
        den_c = (xq @ z.unsqueeze(-1)).squeeze(-1) + spec.eps
        o[:, :, s:e] = (xq @ S).div_(den_c.unsqueeze(-1))
        den[:, :, s:e] = den_c
    return o, den, S, z


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             den: torch.Tensor, S: torch.Tensor, z: torch.Tensor, spec: VicinitySpec,
             needs: tuple[bool, bool, bool] = (True, True, True),
             ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The backward pass: (dq, dk, dv) from dO [B, H, Nq, Dv] and :func:`forward`'s outputs.

    ``needs`` says which of dq, dk, dv to compute; the others are returned as None.
    Gradients have the dtype and memory order of q, k, v.
    """
    dtype = den.dtype
    pos_q = position_features(spec.grid, spec.variant, side="query",
                              num_prefix_tokens=spec.num_prefix_tokens, dtype=dtype, device=q.device)
    pos_k = position_features(spec.kv_grid, spec.variant, side="key",
                              num_prefix_tokens=spec.num_prefix_tokens, dtype=dtype, device=q.device)
    need_dq, need_dk, need_dv = needs
    B, H, Nq, D = q.shape
    dq = torch.empty_like(q) if need_dq else None
    dS = torch.zeros_like(S)
    dz = torch.zeros_like(z)
    # Query pass: g = dO / den, c = -(dO . o) / den; dS = sum X_q^T g, dz = sum X_q^T c,
    # dphi(q) = contract(g S^T + c z^T).
    for s, e in _chunks(Nq):
        inv_den = den[:, :, s:e].reciprocal().unsqueeze(-1)
        do_c = do[:, :, s:e].to(dtype)
        g = do_c * inv_den
        c = -(do_c * o[:, :, s:e].to(dtype)).sum(-1, keepdim=True) * inv_den
        q_c = q[:, :, s:e].to(dtype)
        phi_q = apply_feature_map(q_c, spec.feature_map)
        xq = _expand(phi_q, pos_q[s:e])
        dS.add_(xq.transpose(-1, -2) @ g)
        dz.add_((xq * c).sum(2))
        if need_dq:
            grad_x = torch.baddbmm(c.flatten(0, 1) * z.flatten(0, 1).unsqueeze(1),
                                   g.flatten(0, 1), S.flatten(0, 1).transpose(-1, -2))
            dphi = _contract(grad_x.view(B, H, e - s, -1), pos_q[s:e])
            dq[:, :, s:e] = dphi * feature_map_grad(q_c, phi_q, spec.feature_map)
    if not (need_dk or need_dv):
        return dq, None, None
    Nk = k.shape[2]
    dk = torch.empty_like(k) if need_dk else None
    dv = torch.empty_like(v) if need_dv else None
    # Key pass: dv = X_k dS, dphi(k) = contract(v dS^T + dz).
    for s, e in _chunks(Nk):
        k_c = k[:, :, s:e].to(dtype)
        phi_k = apply_feature_map(k_c, spec.feature_map)
        if need_dv:
            dv[:, :, s:e] = _expand(phi_k, pos_k[s:e]) @ dS
        if need_dk:
            grad_x = torch.baddbmm(dz.flatten(0, 1).unsqueeze(1), v[:, :, s:e].to(dtype).flatten(0, 1),
                                   dS.flatten(0, 1).transpose(-1, -2))
            dphi = _contract(grad_x.view(B, H, e - s, -1), pos_k[s:e])
            dk[:, :, s:e] = dphi * feature_map_grad(k_c, phi_k, spec.feature_map)
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
