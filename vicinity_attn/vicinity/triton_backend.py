"""The triton backend: the fused kernels in ``vicinity_attn.kernels``, differentiable through the
custom op of :mod:`vicinity_attn.vicinity.ops` (this module never imports the op back).

Forward saves q, k, v, o, den (one float per query token) and the reduced states S, z (F x D x Dv per
head), the same order of memory as FlashAttention saves; nothing N x N and no F*D-wide expanded
features exist at any point. CUDA tensors run on the GPU; CPU tensors run only in the Triton
interpreter (``TRITON_INTERPRET=1`` set before triton is imported).
"""
from __future__ import annotations

import functools

import torch

from ..common.allocation import compute_dtype, empty_grads_like, empty_output_like
from ..common.device import launch_device
from ..common.overflow import raises_on_overflow
from ..common.spec import VicinitySpec
from ..kernels.replay import replayable
from ..kernels.runtime import interpreting
from ..kernels.vicinity import Geometry, vicinity_backward, vicinity_forward
from ..kernels.vicinity import saved_state_dtype as kernel_saved_state_dtype

MAX_HEAD_DIM = 256


def check_triton_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Errors for calls the kernels cannot run: head dims above 256, float64 on CUDA, CPU tensors
    outside the interpreter, sizes past the kernels' int32 offsets."""
    D, Dv = q.shape[-1], v.shape[-1]
    if D > MAX_HEAD_DIM:
        raise ValueError(f"backend='triton' supports head dims up to {MAX_HEAD_DIM}, got D = {D} for q/k")
    if Dv > MAX_HEAD_DIM:
        raise ValueError(f"backend='triton' supports head dims up to {MAX_HEAD_DIM}, got Dv = {Dv} for v")
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    if B * H >= 2 ** 16:
        raise ValueError(f"backend='triton' supports batch * heads < 65536 (a CUDA grid axis), got "
                         f"B * H = {B * H}")
    # Within one (batch, head) the kernels index tokens with int32 offsets (cheaper address math).
    if B * H * max(Nq, Nk) >= 2 ** 31:
        raise ValueError(f"backend='triton': B * H * max(Nq, Nk) = {B * H * max(Nq, Nk)} is too large for the "
                         "kernels' int32 offsets into the per-token buffers (den and row weights)")
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        check_token_offsets(t, name)
    if q.device.type == "cpu":
        if not interpreting():
            raise RuntimeError("backend='triton' needs CUDA tensors; CPU tensors run only in the Triton "
                               "interpreter (set TRITON_INTERPRET=1 before importing triton), or use "
                               "backend='torch'")
    elif q.device.type not in ("cuda", "meta"):   # meta: shapes only, answered by the op's fake
        raise RuntimeError(f"backend='triton' needs CUDA tensors, got device {q.device}")
    elif q.device.type == "cuda" and q.dtype == torch.float64:
        # fp64 kernels are neither built by the compile gate nor run anywhere: refuse rather than guess.
        raise TypeError("backend='triton' does not run float64 on CUDA (use backend='torch', which "
                        "backend='auto' picks for float64); float64 runs on triton only in the interpreter")


def check_token_offsets(t: torch.Tensor, name: str) -> None:
    """Every tensor the kernels index ([B, H, N, D] view: q, k, v, o, dO, dq, dk, dv) is addressed as
    int64 batch / head offsets plus int32 offsets within one (batch, head): those must fit in int32."""
    span = (t.shape[2] - 1) * t.stride(2) + (t.shape[3] - 1) * t.stride(3)
    if span >= 2 ** 31:
        raise ValueError(f"backend='triton': {name} is too large for the kernels' int32 token offsets "
                         f"(shape {tuple(t.shape)}, strides {t.stride()})")


def saved_state_dtype(q: torch.Tensor, v: torch.Tensor, clamp) -> torch.dtype:
    """The dtype of the S :func:`forward` returns for q, v (any layout: the head dims are the last axis)
    and the spec's ``clamp`` (empty / None: no clamp): float32 (float64 for float64 inputs), or bfloat16
    where the kernels keep S as the bf16 operand of the backward's dq dots (bf16 on a GPU, 64-wide
    head tiles, no clamp: ``kernels.vicinity.saved_state_dtype``)."""
    return kernel_saved_state_dtype(q.dtype, q.shape[-1], v.shape[-1], tuple(clamp) if clamp else None,
                                    compute_dtype(q.dtype))


@functools.lru_cache(maxsize=1024)
def _geometry(spec: VicinitySpec) -> Geometry:
    return Geometry.build(spec.grid, spec.kv_grid, spec.variant, spec.feature_map, spec.num_prefix_tokens)


def _checked_geometry(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                      spec: VicinitySpec) -> Geometry:
    """:func:`check_triton_inputs` (and the output's offsets) and the kernels' geometry, once per layout of a
    call: what they check is a function of the shapes, strides, dtype and device type (and of whether the
    interpreter runs, fixed per process)."""
    key = (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), o.stride(), q.dtype, q.device.type, spec,
           interpreting())
    geom = _CHECKED.get(key)
    if geom is None:
        check_triton_inputs(q, k, v)
        check_token_offsets(o, "the output o")
        geom = _geometry(spec)
        if len(_CHECKED) >= 1024:
            _CHECKED.clear()
        _CHECKED[key] = geom
    return geom


_CHECKED: dict = {}
_GRAD_PLANS: dict = {}


@raises_on_overflow("forward", 3)
def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            spec: VicinitySpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, den, S, z) of the fused kernels: o [B, H, Nq, Dv] in q's dtype and memory order; den
    [B*H, Nq], S [B*H, F, D, Dv], z [B*H, F, D] stored scaled by a power of two (see
    ``kernels/forward.py``), in float32 (float64 for float64 inputs; S in bfloat16 where
    :func:`saved_state_dtype` says). The body of the custom
    op of :mod:`vicinity_attn.vicinity.ops`, which also carries the autograd formula. Frame-causal calls run
    :mod:`vicinity_attn.vicinity.triton_frames` instead (the ops pick it)."""
    return _forward(q, k, v, spec)


@replayable
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             spec: VicinitySpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    o = empty_output_like(q, v.shape[-1])
    geom = _checked_geometry(q, k, v, o, spec)
    with launch_device(q):
        den, S, z = vicinity_forward(q, k, v, o, geom, spec.eps, spec.den_floor, spec.clamp)
    return o, den, S, z


@raises_on_overflow("backward", 4)
def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             den: torch.Tensor, S: torch.Tensor, z: torch.Tensor, spec: VicinitySpec,
             needs: tuple[bool, bool, bool] = (True, True, True),
             ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dq, dk, dv) from dO and :func:`forward`'s outputs, laid out like q, k, v; None (and the
    kernel passes behind it skipped) where ``needs`` says a gradient is not wanted."""
    return _backward(do, q, k, v, o, den, S, z, spec, tuple(bool(n) for n in needs))


@replayable
def _backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
              den: torch.Tensor, S: torch.Tensor, z: torch.Tensor, spec: VicinitySpec,
              needs: tuple[bool, bool, bool]) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    # The checks and the gradients' memory order are a function of the shapes and strides: decided once per
    # layout, then the gradients are allocated as decided.
    key = (do.shape, do.stride(), q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), needs, spec)
    plan = _GRAD_PLANS.get(key)
    if plan is None:
        grads = empty_grads_like((q, k, v), needs)
        for t, name in zip((do, *grads), ("the output gradient dO", "dq", "dk", "dv")):
            if t is not None:
                check_token_offsets(t, name)
        if len(_GRAD_PLANS) >= 1024:
            _GRAD_PLANS.clear()
        # (memory shape, stored heads-inner) per gradient, as empty_output_like laid it out
        allocs = tuple(None if g is None else (tuple(g.transpose(1, 2).shape), True) if not g.is_contiguous()
                       else (tuple(g.shape), False) for g in grads)
        plan = _GRAD_PLANS[key] = (_geometry(spec), allocs)
    geom, allocs = plan
    dtype, device = q.dtype, q.device
    dq, dk, dv = (None if a is None else torch.empty(a[0], dtype=dtype, device=device).transpose(1, 2) if a[1]
                  else torch.empty(a[0], dtype=dtype, device=device) for a in allocs)
    with launch_device(q):
        vicinity_backward(do, q, k, v, o, den, S, z, dq, dk, dv, geom, spec.eps, spec.den_floor, spec.clamp)
    return dq, dk, dv
