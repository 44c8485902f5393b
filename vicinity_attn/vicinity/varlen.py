"""Packed variable-length vicinity attention (``vicinity_attention_varlen``) on each backend.

q [Tq, H, D], k [Tk, H, D], v [Tk, H, Dv] hold the tokens of S sequences one after another
(FlashAttention's packed layout); sequence i has its own query grid and key grid (:class:`VarlenSpec`).

- "reference": one quadratic reference call per sequence (the definition; a Python loop).
- "torch" (and "triton" with ``causal="frames"``): sequences with equal (grid, kv_grid) are stacked into one
  batched call of the dense
  ``vicinity_attn::torch_forward`` custom op (:func:`vicinity_attn.vicinity.ops.custom_op_attention`); a pack of
  four images of three sizes makes three calls. Autograd, torch.compile and torch.func come with the
  dense op; the stacking and the final concatenation are plain differentiable torch ops.
- "triton": the whole pack in one launch per kernel pass, through two custom ops registered here::

      vicinity_attn::triton_varlen_forward(q, k, v, <varlen spec>) -> (o, den, S, z)
      vicinity_attn::triton_varlen_backward(do, q, k, v, o, den, S, z, <varlen spec>, need_dq, need_dk, need_dv)
          -> (dq, dk, dv)

  ``<varlen spec>`` is ``grids: int[]`` and ``kv_grids: int[]`` (the per-sequence grids flattened,
  ``n_axes`` ints each), ``n_axes: int``, then the dense ops' options (``variant`` ... ``clamp``). The
  token offsets follow from the grids, so the ops take no ``cu_seqlens`` tensors (nothing to read back
  from the device, and torch.compile sees the grids as constants). o is a contiguous [Tq, H, Dv];
  den [H, Tq], S [S * H, F, D, Dv] and z [S * H, F, D] are the kernels' saved state. torch.func
  transforms and forward-mode AD are refused with a clear error on this path (the dense op's
  ``autograd.Function`` route is not duplicated here); backend "torch" supports them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..common.allocation import compute_dtype
from ..common.custom_ops import NAMESPACE, autocast_disabled, defer_dynamo_import, empty_if_none
from ..common.positions import feature_count
from ..common.spec import VarlenSpec
from ..common.transforms import double_backward_error, transform_active
from .ops import custom_op_attention


def _packed_as_batch(t: Tensor) -> Tensor:
    """A packed sequence [N, H, E] as a one-element batch [1, H, N, E] (a view)."""
    return t.unsqueeze(0).transpose(1, 2)


def _reference(q: Tensor, k: Tensor, v: Tensor, spec: VarlenSpec) -> Tensor:
    """One quadratic reference call per sequence, outputs concatenated in sequence order."""
    from .reference import reference_vicinity_attention
    qo, ko = spec.offsets("query"), spec.offsets("key")
    outs = []
    for i in range(spec.n_seqs):
        qi, ki, vi = (_packed_as_batch(t[a:b]) for t, a, b in ((q, qo[i], qo[i + 1]), (k, ko[i], ko[i + 1]),
                                                                 (v, ko[i], ko[i + 1])))
        outs.append(reference_vicinity_attention(qi, ki, vi, spec.sequence(i))[0].transpose(0, 1))
    return torch.cat(outs)


def _stacked(t: Tensor, offsets: list[int], seqs: list[int]) -> Tensor:
    """The sequences ``seqs`` (all of one length) of the packed t [T, H, E] as a batch [G, H, N, E]: a view
    for a single sequence, else one stacked copy."""
    parts = [t[offsets[i]:offsets[i + 1]] for i in seqs]
    batch = parts[0].unsqueeze(0) if len(parts) == 1 else torch.stack(parts)
    return batch.transpose(1, 2)


def _grouped(backend: str, q: Tensor, k: Tensor, v: Tensor, spec: VarlenSpec) -> Tensor:
    """One batched dense call of ``backend`` per group of sequences with equal grids."""
    qo, ko = spec.offsets("query"), spec.offsets("key")
    outs: list[Tensor | None] = [None] * spec.n_seqs
    for seqs in spec.groups():
        o = custom_op_attention(backend, _stacked(q, qo, seqs), _stacked(k, ko, seqs), _stacked(v, ko, seqs),
                                spec.sequence(seqs[0]))                       # [G, H, N, Dv]
        for j, i in enumerate(seqs):
            outs[i] = o[j].transpose(0, 1)                                     # [N, H, Dv]
    return torch.cat(outs)


def varlen_attention(backend: str, q: Tensor, k: Tensor, v: Tensor, spec: VarlenSpec) -> Tensor:
    """o [Tq, H, Dv] of the packed call on ``backend`` ("reference", "torch" or "triton"); differentiable."""
    if backend == "reference":
        return _reference(q, k, v, spec)
    if backend == "torch":
        return _grouped("torch", q, k, v, spec)
    if backend != "triton":
        raise ValueError(f"unknown backend {backend!r}")
    if spec.causal is not None:
        # The packed kernels are bidirectional: frame-causal packs run one dense launch set per grid group.
        return _grouped("triton", q, k, v, spec)
    from .triton_varlen import check_triton_varlen_inputs
    check_triton_varlen_inputs(q, k, v, spec)
    if transform_active():
        raise RuntimeError("vicinity_attention_varlen(backend='triton') does not support torch.func transforms or "
                           "forward-mode AD; use backend='torch' (which does), or vicinity_attention per sequence")
    return triton_varlen_forward(q, k, v, *varlen_spec_args(spec))[0]


# ----------------------------------------------------------------------------------------------------
# the triton varlen custom ops
# ----------------------------------------------------------------------------------------------------

def varlen_spec_args(spec: VarlenSpec) -> tuple:
    """A varlen spec as the plain values the ops' schemas take."""
    return ([s for g in spec.grids for s in g], [s for g in spec.kv_grids for s in g], spec.n_axes, spec.variant,
            spec.feature_map, spec.eps, spec.num_prefix_tokens, spec.den_floor, list(spec.clamp or ()))


def _varlen_spec(grids, kv_grids, n_axes, variant, feature_map, eps, num_prefix_tokens, den_floor,
                 clamp) -> VarlenSpec:
    def split(flat):
        return tuple(tuple(int(s) for s in flat[i:i + n_axes]) for i in range(0, len(flat), n_axes))
    return VarlenSpec(grids=split(grids), kv_grids=split(kv_grids), variant=variant, feature_map=feature_map,
                      eps=float(eps), num_prefix_tokens=int(num_prefix_tokens), den_floor=float(den_floor),
                      clamp=tuple(float(c) for c in clamp) if clamp else None)


@torch.library.custom_op(f"{NAMESPACE}::triton_varlen_forward", mutates_args=(), device_types=None)
def triton_varlen_forward(q: Tensor, k: Tensor, v: Tensor, grids: list[int], kv_grids: list[int], n_axes: int,
                          variant: str, feature_map: str, eps: float, num_prefix_tokens: int, den_floor: float,
                          clamp: list[float]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from . import triton_varlen
    spec = _varlen_spec(grids, kv_grids, n_axes, variant, feature_map, eps, num_prefix_tokens, den_floor, clamp)
    with autocast_disabled(q.device):
        return triton_varlen.forward(q, k, v, spec)


@triton_varlen_forward.register_fake
def _(q, k, v, grids, kv_grids, n_axes, variant, feature_map, eps, num_prefix_tokens, den_floor, clamp):
    Tq, H, D = q.shape
    Dv = v.shape[-1]
    S = len(grids) // n_axes
    F = feature_count(n_axes, variant, num_prefix_tokens > 0)
    dtype = compute_dtype(q.dtype)
    from .triton_backend import saved_state_dtype
    return (q.new_empty(Tq, H, Dv), q.new_empty((H, Tq), dtype=dtype),
            q.new_empty((S * H, F, D, Dv), dtype=saved_state_dtype(q, v, clamp)),
            q.new_empty((S * H, F, D), dtype=dtype))


@torch.library.custom_op(f"{NAMESPACE}::triton_varlen_backward", mutates_args=(), device_types=None)
def triton_varlen_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, den: Tensor, S: Tensor,
                           z: Tensor, grids: list[int], kv_grids: list[int], n_axes: int, variant: str,
                           feature_map: str, eps: float, num_prefix_tokens: int, den_floor: float,
                           clamp: list[float], need_dq: bool, need_dk: bool, need_dv: bool
                           ) -> tuple[Tensor, Tensor, Tensor]:
    from . import triton_varlen
    spec = _varlen_spec(grids, kv_grids, n_axes, variant, feature_map, eps, num_prefix_tokens, den_floor, clamp)
    with autocast_disabled(q.device):
        grads = triton_varlen.backward(do, q, k, v, o, den, S, z, spec, (need_dq, need_dk, need_dv))
    return tuple(empty_if_none(g, t) for g, t in zip(grads, (q, k, v)))


@triton_varlen_backward.register_fake
def _(do, q, k, v, o, den, S, z, grids, kv_grids, n_axes, variant, feature_map, eps, num_prefix_tokens, den_floor,
      clamp, need_dq, need_dk, need_dv):
    return tuple(t.new_empty(t.shape) if need else t.new_empty(0)
                 for t, need in zip((q, k, v), (need_dq, need_dk, need_dv)))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, *spec = inputs
    o, den, S, z = output
    ctx.save_for_backward(q, k, v, o, den, S, z)
    ctx.spec_args = spec
    ctx.set_materialize_grads(False)   # den, S, z are internal outputs: no zero gradients for them


def _backward(ctx, do, _dden, _dS, _dz):
    n_spec = len(ctx.spec_args)
    if do is None:
        return (None,) * (3 + n_spec)
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    grads = triton_varlen_backward(do, *ctx.saved_tensors, *ctx.spec_args, *needs)
    return (*(g if n else None for g, n in zip(grads, needs)), *(None,) * n_spec)


def _no_double_backward(ctx, *grads):
    raise double_backward_error("vicinity_attention_varlen", "triton")


triton_varlen_forward.register_autograd(_backward, setup_context=_setup_context)
triton_varlen_backward.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)
for _op in (triton_varlen_forward, triton_varlen_backward):
    defer_dynamo_import(_op)
