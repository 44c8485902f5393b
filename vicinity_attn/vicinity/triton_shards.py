"""The triton backend's pieces for one shard of a token sequence (context parallelism).

The same four pieces as :mod:`vicinity_attn.vicinity.torch_shards` (``states``, ``output``,
``query_backward``, ``key_backward``), over the kernel launchers' own passes
(``kernels/vicinity``: ``forward_states`` / ``forward_output`` / ``backward_queries`` /
``backward_keys``, which the single-process forward and backward are made of). The kernels are told
where the shard starts (``tok_offset``), so the position features are the whole sequence's.

States are [B*H, F, D, Dv] and [B*H, F, D], stored scaled by 2^-ceil(log2 Nk) with Nk the *whole*
sequence's key count (state gradients by 2^-ceil(log2 Nq) / 2^-ceil(log2 Nk), see
``kernels/vicinity/launch_backward.py``): every rank uses the same scale, so the shards' states add up to
the whole sequence's. A shard with no tokens launches nothing.
"""
from __future__ import annotations

import torch

from ..common.allocation import compute_dtype, empty_grads_like, empty_output_like
from ..common.device import launch_device
from ..common.spec import TokenShard, VicinitySpec
from ..kernels.vicinity import backward_keys, backward_queries, forward_output, forward_states
from ..kernels.vicinity.geometry import feature_count
from .triton_backend import _geometry, check_token_offsets


def _zero_states(x: torch.Tensor, spec: VicinitySpec, Dv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All-zero states for a shard without tokens."""
    B, H, _, D = x.shape
    geom = _geometry(spec)
    F = feature_count(geom.n_axes, geom.variant, geom.n_prefix > 0)
    dtype = compute_dtype(x.dtype)
    return (torch.zeros(B * H, F, D, Dv, dtype=dtype, device=x.device),
            torch.zeros(B * H, F, D, dtype=dtype, device=x.device))


def states(k: torch.Tensor, v: torch.Tensor, spec: VicinitySpec,
           shard: TokenShard) -> tuple[torch.Tensor, torch.Tensor]:
    """(S [BH, F, D, Dv], z [BH, F, D]) over the local keys k [B, H, n, D], v [B, H, n, Dv] (scaled)."""
    if k.shape[2] == 0:
        return _zero_states(k, spec, v.shape[-1])
    with launch_device(k):
        return forward_states(k, v, _geometry(spec), n_keys=shard.n_keys, key_offset=shard.k_offset)


def output(q: torch.Tensor, S: torch.Tensor, z: torch.Tensor, spec: VicinitySpec,
           shard: TokenShard) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o [B, H, n, Dv] in q's dtype, den [BH, n], the states as used) for the local queries q
    [B, H, n, D] from the summed states; with a clamp, S is clamped in place."""
    o = empty_output_like(q, S.shape[-1])
    check_token_offsets(o, "the output o")
    if q.shape[2] == 0:
        return o, torch.empty(q.shape[0] * q.shape[1], 0, dtype=S.dtype, device=q.device), S
    with launch_device(q):
        den = forward_output(q, S, z, o, _geometry(spec), spec.eps, spec.den_floor, spec.clamp,
                             n_keys=shard.n_keys, query_offset=shard.q_offset)
    return o, den, S


def query_backward(do: torch.Tensor, q: torch.Tensor, o: torch.Tensor, den: torch.Tensor, S: torch.Tensor,
                   z: torch.Tensor, spec: VicinitySpec, shard: TokenShard, need_dq: bool = True,
                   ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(dq or None, dS, dz): the local queries' gradient and their share of the (scaled) state gradients."""
    (dq,) = empty_grads_like((q,), (need_dq,))
    if q.shape[2] == 0:
        return (dq, *_zero_states(q, spec, S.shape[-1]))
    check_token_offsets(do, "the output gradient dO")
    with launch_device(q):
        dS, dz = backward_queries(do, q, o, den, S, z, dq, _geometry(spec), spec.eps, spec.den_floor, spec.clamp,
                                  shard.n_queries, shard.n_keys, query_offset=shard.q_offset)
    return dq, dS, dz


def key_backward(k: torch.Tensor, v: torch.Tensor, S: torch.Tensor, dS: torch.Tensor, dz: torch.Tensor,
                 spec: VicinitySpec, shard: TokenShard, need_dk: bool = True, need_dv: bool = True,
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dk, dv) (None where not needed) of the local keys from the summed state gradients; with a
    clamp, dS is masked in place where S was clamped."""
    dk, dv = empty_grads_like((k, v), (need_dk, need_dv))
    if k.shape[2] == 0 or not (need_dk or need_dv):
        return dk, dv
    with launch_device(k):
        backward_keys(k, v, S, dS, dz, dk, dv, _geometry(spec), spec.clamp, shard.n_queries, shard.n_keys,
                      key_offset=shard.k_offset)
    return dk, dv
