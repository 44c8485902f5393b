"""The triton backend for packed variable-length calls: the whole pack in one launch per kernel pass.

The packed q [Tq, H, D], k, v [Tk, H, *] are handed to the kernels as one batch entry ([1, H, T, E]
views) with a per-sequence table (``kernels/vicinity/varlen.py``); the bodies of the
``vicinity_attn::triton_varlen_*`` custom ops of :mod:`vicinity_attn.vicinity.varlen` (never imported back).
Their launches are replayed per layout from a pack's third call on (kernels/replay.py).
"""
from __future__ import annotations

import functools

import torch

from ..common.device import launch_device
from ..common.overflow import raises_on_overflow
from ..common.spec import VarlenSpec
from ..kernels.replay import replayable
from ..kernels.vicinity import Geometry, Packing, vicinity_backward, vicinity_forward
from .triton_backend import check_token_offsets, check_triton_inputs

MAX_PROGRAMS_Y = 2 ** 16   # sequences x heads run along a CUDA grid's second axis


def _as_batch(t: torch.Tensor) -> torch.Tensor:
    """A packed [T, H, E] tensor as the [1, H, T, E] view the kernels take."""
    return t.unsqueeze(0).transpose(1, 2)


def check_packed_sizes(n_seqs: int, heads: int, q_tokens: int, k_tokens: int, d: int, dv: int) -> None:
    """The size limits of a packed launch, from sizes alone (packed [T, H, E] tensors, contiguous).

    The kernels address a (sequence, head) pair's rows and states in int64 (sequences x heads x tokens
    may pass 2^31); within the pack, a token's offset (token x heads x head dim, and h x tokens + start
    into the [H, T] buffers) is int32, and (sequence, head) pairs run along a CUDA grid axis."""
    if n_seqs * heads >= MAX_PROGRAMS_Y:
        raise ValueError(f"backend='triton' supports sequences * heads < {MAX_PROGRAMS_Y} (a CUDA grid axis), got "
                         f"{n_seqs} * {heads}")
    for side, tokens, width in (("q", q_tokens, d), ("k", k_tokens, d), ("v", k_tokens, dv), ("o", q_tokens, dv)):
        if tokens * heads * width >= 2 ** 31:
            raise ValueError(f"backend='triton': packed {side} has tokens * heads * head dim = {tokens} * {heads} * "
                             f"{width} >= 2^31, past the kernels' int32 token offsets")


def check_triton_varlen_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: VarlenSpec) -> None:
    """What :func:`check_triton_inputs` checks for a dense call (head dims, devices, dtypes, int32
    offsets), on the pack as one sequence, and :func:`check_packed_sizes`."""
    check_packed_sizes(spec.n_seqs, q.shape[1], q.shape[0], k.shape[0], q.shape[-1], v.shape[-1])
    check_triton_inputs(_as_batch(q), _as_batch(k), _as_batch(v))


@functools.lru_cache(maxsize=64)
def _geometry_and_pack(spec: VarlenSpec, device: torch.device) -> tuple[Geometry, Packing]:
    """Kept per (spec, device): a training loop's packs repeat, and each Packing holds its tables on the
    device (read-only for the kernels), so repeated calls copy nothing from the host."""
    # The geometry's constexprs (axes, variant, feature map, prefix) are shared; sizes come from the table.
    geom = Geometry.build(spec.grids[0], spec.kv_grids[0], spec.variant, spec.feature_map, spec.num_prefix_tokens)
    return geom, Packing.build(spec.grids, spec.kv_grids, spec.num_prefix_tokens, device)


@raises_on_overflow("forward", 3)
def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            spec: VarlenSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o [Tq, H, Dv] contiguous in q's dtype, den [H, Tq], S [S * H, F, D, Dv], z [S * H, F, D]); den, S
    and z in float32 (float64 for float64 inputs), scaled per sequence as a dense call scales them."""
    return _forward(q, k, v, spec)


@replayable
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             spec: VarlenSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_triton_varlen_inputs(q, k, v, spec)
    o = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype, device=q.device)
    geom, pack = _geometry_and_pack(spec, q.device)
    with launch_device(q):
        den, S, z = vicinity_forward(_as_batch(q), _as_batch(k), _as_batch(v), _as_batch(o), geom, spec.eps,
                                     spec.den_floor, spec.clamp, pack=pack)
    return o, den, S, z


@raises_on_overflow("backward", 4)
def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             den: torch.Tensor, S: torch.Tensor, z: torch.Tensor, spec: VarlenSpec,
             needs: tuple[bool, bool, bool] = (True, True, True),
             ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dq, dk, dv), contiguous [T, H, E] in the inputs' dtype; None where ``needs`` says not wanted."""
    return _backward(do, q, k, v, o, den, S, z, spec, tuple(bool(n) for n in needs))


@replayable
def _backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
              den: torch.Tensor, S: torch.Tensor, z: torch.Tensor, spec: VarlenSpec,
              needs: tuple[bool, bool, bool]) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) if need else None
                  for t, need in zip((q, k, v), needs))
    check_token_offsets(_as_batch(do), "the output gradient dO")
    geom, pack = _geometry_and_pack(spec, q.device)
    with launch_device(q):
        vicinity_backward(_as_batch(do), _as_batch(q), _as_batch(k), _as_batch(v), _as_batch(o), den, S, z,
                          *(None if g is None else _as_batch(g) for g in (dq, dk, dv)), geom, spec.eps,
                          spec.den_floor, spec.clamp, pack=pack)
    return dq, dk, dv
