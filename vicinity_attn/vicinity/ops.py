"""Vicinity attention as ``torch.library`` custom ops, so ``torch.compile`` traces through it.

``torch.compile`` cannot look inside an ``autograd.Function`` that runs Python loops over chunks or
launches Triton kernels without a graph break; a custom op is opaque to it instead: the compiler
only needs the op's schema, a *fake* implementation (output shapes, dtypes and strides from input
metadata) and an autograd formula. The "torch" and "triton" backends run only through these ops;
each gets two, over its ``forward()`` / ``backward()`` functions:

    vicinity_attn::torch_forward(q, k, v, <spec>)  -> (o, den, S, z)
    vicinity_attn::torch_backward(do, q, k, v, o, den, S, z, <spec>, need_dq, need_dk, need_dv) -> (dq, dk, dv)
    vicinity_attn::triton_forward / vicinity_attn::triton_backward   (same signatures)

``<spec>`` is the :class:`~vicinity_attn.common.spec.VicinitySpec` flattened into schema-friendly values:
``grid: int[]``, ``kv_grid: int[]``, ``variant: str``, ``feature_map: str``, ``eps: float``,
``num_prefix_tokens: int``, ``den_floor: float``, ``clamp: float[]`` (empty: no clamp), ``causal: str`` ("":
bidirectional; "frames": frame-causal, run by :mod:`.frames` / :mod:`.triton_frames`, whose saved S and z hold
one set of states per slot). den, S and z are the backend's saved state (compute dtype, backend-specific
shapes); only ``o`` is handed to users. A
gradient not asked for comes back as an empty tensor (custom ops cannot return None) and is turned back into None here.

The forward op's autograd formula calls the backward op, so the compiled backward graph holds one
opaque call as well. The backward op itself is not differentiable: differentiating it raises
:func:`~vicinity_attn.common.transforms.double_backward_error` (a user-facing error, not torch's "no autograd
formula").

Autograd modes: a custom op's registered autograd serves reverse mode (``.backward()``,
``torch.autograd.grad``) and torch.compile, but torch.func transforms reject it and forward-mode AD
silently gives it no tangent. While a torch.func transform or a forward-AD level is active, the same
two ops therefore run inside :class:`_TransformableAttention`, an ``autograd.Function`` with
``setup_context``, a generated vmap rule (over the ops' own vmap rules, which fold the vmapped
dimension into the batch) and a ``jvp`` (:mod:`vicinity_attn.vicinity.tangent`), built by
:mod:`vicinity_attn.common.transforms` (shared with the k-NN ops). Supported: grad, vjp, jacrev, jvp, jacfwd,
vmap and ``torch.autograd.forward_ad``; not supported: any derivative of a derivative (double
backward, hessian, jvp of a grad), which raises the error above.

Autocast: the ops run their bodies with autocast disabled, so that the backends' float32
accumulations are not silently turned into bf16 / fp16 matmuls; casting the inputs to the
autocast dtype is done by :func:`autocast_inputs`, called from ``vicinity_attention``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..common.allocation import compute_dtype, empty_grads_like, empty_output_like
from ..common.custom_ops import NAMESPACE, autocast_disabled, defer_dynamo_import, empty_if_none
from ..common.positions import feature_count
from ..common.spec import VicinitySpec
from ..common.transforms import (
    double_backward_error,
    eager_call,
    eager_function,
    register_folding_vmap,
    transform_active,
    transformable_functions,
)
from . import quadratic, torch_backend
from .tangent import vicinity_tangent


def spec_args(spec: VicinitySpec) -> tuple[list[int], list[int], str, str, float, int, float, list[float], str]:
    """A spec as the plain values the ops' schemas take (``causal``: "" for None)."""
    return (list(spec.grid), list(spec.kv_grid), spec.variant, spec.feature_map, spec.eps, spec.num_prefix_tokens,
            spec.den_floor, list(spec.clamp or ()), spec.causal or "")


def _spec(grid: Sequence[int], kv_grid: Sequence[int], variant: str, feature_map: str, eps: float,
          num_prefix_tokens: int, den_floor: float, clamp: Sequence[float], causal: str) -> VicinitySpec:
    return VicinitySpec(grid=tuple(int(g) for g in grid), kv_grid=tuple(int(g) for g in kv_grid),
                        variant=variant, feature_map=feature_map, eps=float(eps),
                        num_prefix_tokens=int(num_prefix_tokens), den_floor=float(den_floor),
                        clamp=tuple(float(c) for c in clamp) if clamp else None, causal=causal or None)


def _fake_forward(q: Tensor, v: Tensor, lead: tuple, state: tuple,
                  s_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fake (o, den, S, z) of a forward op: o like the real output; den [*lead, Nq], S [*lead, *state, Dv]
    and z [*lead, *state] in the compute dtype (S in ``s_dtype`` when given)."""
    Nq, Dv = q.shape[2], v.shape[-1]
    dtype = compute_dtype(q.dtype)
    return (empty_output_like(q, Dv),
            q.new_empty((*lead, Nq), dtype=dtype),
            q.new_empty((*lead, *state, Dv), dtype=s_dtype or dtype),
            q.new_empty((*lead, *state), dtype=dtype))


def _fake_backward(do, q, k, v, o, den, S, z, grid, kv_grid, variant, feature_map, eps, num_prefix_tokens,
                   den_floor, clamp, causal, need_dq, need_dk, need_dv):
    """Fake (dq, dk, dv) of a backward op: laid out like the real ones (empty where not needed)."""
    grads = empty_grads_like((q, k, v), (need_dq, need_dk, need_dv))
    return tuple(empty_if_none(g, t) for g, t in zip(grads, (q, k, v)))


def _backend_module(backend: str, causal: str | None = None):
    """The module with the backend's ``forward()`` / ``backward()`` for calls with ``causal`` (None / "":
    bidirectional; "frames": :mod:`.frames` / :mod:`.triton_frames`); triton imported on first use: it may
    be absent."""
    key = (backend, causal or None)
    module = _BACKENDS.get(key)
    if module is None:
        if key == ("torch", "frames"):
            from . import frames as module
        elif key == ("triton", "frames"):
            from . import triton_frames as module
        else:
            from . import triton_backend as module
        _BACKENDS[key] = module
    return module


_BACKENDS = {("torch", None): torch_backend}


def _define_ops(backend: str, state_layout: Callable[[int, int, int, int], tuple[tuple, tuple]]):
    """Registers ``vicinity_attn::<backend>_forward`` and ``<backend>_backward`` over the backend
    module's ``forward()`` / ``backward()``, with fakes and the autograd formula. ``state_layout(B, H,
    F, D)`` gives the (lead, state) dims of the saved den / S / z (see :func:`_fake_forward`): the torch
    backend keeps (B, H) and F*D, the kernels B*H and (F, D)."""

    @torch.library.custom_op(f"{NAMESPACE}::{backend}_forward", mutates_args=(), device_types=None)
    def forward_op(q: Tensor, k: Tensor, v: Tensor, grid: list[int], kv_grid: list[int], variant: str,
                   feature_map: str, eps: float, num_prefix_tokens: int, den_floor: float,
                   clamp: list[float], causal: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        spec = _spec(grid, kv_grid, variant, feature_map, eps, num_prefix_tokens, den_floor, clamp, causal)
        with autocast_disabled(q.device):
            return _backend_module(backend, causal).forward(q, k, v, spec)

    @forward_op.register_fake
    def _(q, k, v, grid, kv_grid, variant, feature_map, eps, num_prefix_tokens, den_floor, clamp, causal):
        B, H, _, D = q.shape
        F = feature_count(len(grid), variant, num_prefix_tokens > 0)
        s_dtype = _backend_module(backend).saved_state_dtype(q, v, clamp) if backend == "triton" else None
        lead, state = state_layout(B, H, F, D)
        if causal:      # one set of states per slot: the prefix queries', then each frame's
            state = (grid[0] + 1, *state)
        return _fake_forward(q, v, lead, state, s_dtype)

    @torch.library.custom_op(f"{NAMESPACE}::{backend}_backward", mutates_args=(), device_types=None)
    def backward_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, den: Tensor, S: Tensor, z: Tensor,
                    grid: list[int], kv_grid: list[int], variant: str, feature_map: str, eps: float,
                    num_prefix_tokens: int, den_floor: float, clamp: list[float], causal: str, need_dq: bool,
                    need_dk: bool, need_dv: bool) -> tuple[Tensor, Tensor, Tensor]:
        spec = _spec(grid, kv_grid, variant, feature_map, eps, num_prefix_tokens, den_floor, clamp, causal)
        with autocast_disabled(q.device):
            grads = _backend_module(backend, causal).backward(do, q, k, v, o, den, S, z, spec,
                                                              (need_dq, need_dk, need_dv))
        return tuple(empty_if_none(g, t) for g, t in zip(grads, (q, k, v)))

    backward_op.register_fake(_fake_backward)
    forward_op.register_autograd(_make_backward(backward_op), setup_context=_setup_context)
    backward_op.register_autograd(_no_double_backward(backend), setup_context=lambda ctx, inputs, output: None)

    # vmap: the ops already take a batch of (batch, head) slices; a vmapped dimension is folded into B.
    register_folding_vmap(forward_op, backward_op, n_backward_tensors=8)

    for op in (forward_op, backward_op):
        defer_dynamo_import(op)
    return forward_op, backward_op


def _no_double_backward(backend: str):
    """The backward op's autograd formula: a clear error where a gradient of a gradient is asked for."""
    def _backward(ctx, *grads):
        raise double_backward_error("vicinity_attention", backend)
    return _backward


# ----------------------------------------------------------------------------------------------------
# autograd: forward op -> backward op
# ----------------------------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output) -> None:
    q, k, v, *spec = inputs
    o, den, S, z = output
    ctx.save_for_backward(q, k, v, o, den, S, z)
    ctx.spec_args = spec
    # den, S, z are internal outputs nobody differentiates: do not allocate zero gradients for them.
    ctx.set_materialize_grads(False)


def _make_backward(backward_op):
    def _backward(ctx, do, _dden, _dS, _dz):
        n_spec = len(ctx.spec_args)
        if do is None:
            return (None,) * (3 + n_spec)
        q, k, v, o, den, S, z = ctx.saved_tensors
        needs = [bool(n) for n in ctx.needs_input_grad[:3]]
        grads = backward_op(do, q, k, v, o, den, S, z, *ctx.spec_args, *needs)
        return (*(g if n else None for g, n in zip(grads, needs)), *(None,) * n_spec)
    return _backward


torch_forward, torch_backward = _define_ops("torch", lambda B, H, F, D: ((B, H), (F * D,)))
# The kernels' launchers: CUDA, or CPU under TRITON_INTERPRET=1.
triton_forward, triton_backward = _define_ops("triton", lambda B, H, F, D: ((B * H,), (F, D)))

FORWARD_OPS = {"torch": torch_forward, "triton": triton_forward}
BACKWARD_OPS = {"torch": torch_backward, "triton": triton_backward}


# ----------------------------------------------------------------------------------------------------
# functorch transforms and forward-mode AD
# ----------------------------------------------------------------------------------------------------

# The same forward and backward ops as autograd.Functions with a jvp and a vmap rule (see the module
# docstring); used only while a transform is active (transform_active()).
_TransformableAttention, _TransformableBackward = transformable_functions(
    "_TransformableAttention", "vicinity_attention", n_state=3,
    forward=lambda q, k, v, backend, spec: FORWARD_OPS[backend](q, k, v, *spec_args(spec)),
    backward=lambda do, q, k, v, o, den, S, z, backend, spec, *needs: BACKWARD_OPS[backend](
        do, q, k, v, o, den, S, z, *spec_args(spec), *needs),
    tangent=lambda q, k, v, tq, tk, tv, backend, spec: vicinity_tangent(q, k, v, tq, tk, tv, spec))


def _eager_forward(q, k, v, backend, spec):
    module = _backend_module(backend, spec.causal)
    if backend == "triton":     # allocations and launches only: autocast changes nothing there
        return module.forward(q, k, v, spec)
    with autocast_disabled(q.device):
        return module.forward(q, k, v, spec)


def _eager_backward(do, q, k, v, o, den, S, z, backend, spec, needs):
    module = _backend_module(backend, spec.causal)
    if backend == "triton":
        return module.backward(do, q, k, v, o, den, S, z, spec, needs)
    with autocast_disabled(q.device):
        return module.backward(do, q, k, v, o, den, S, z, spec, needs)


# Plain eager calls: the backends directly, without the custom ops' dispatch (see eager_function).
_EagerAttention = eager_function("_EagerAttention", "vicinity_attention", _eager_forward, _eager_backward)
# Small CPU calls of the torch backend: the exact quadratic form where it is cheaper (quadratic.cheaper).
_EagerQuadratic = eager_function("_EagerQuadratic", "vicinity_attention", quadratic.forward, quadratic.backward)


def custom_op_attention(backend: str, q: Tensor, k: Tensor, v: Tensor, spec: VicinitySpec) -> Tensor:
    """o [B, H, Nq, Dv] of ``backend`` ("torch" or "triton"), differentiable: a plain eager call runs the
    backend through its eager Function (the torch backend's small CPU calls in the exact quadratic form);
    compile, transforms, modes and meta tensors go through the custom op."""
    if eager_call(q, k, v):     # the backend's forward checks its inputs itself
        function = (_EagerQuadratic if backend == "torch" and quadratic.cheaper(q, k, v, spec)
                    else _EagerAttention)
        if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
            return function.forward_only(q, k, v, backend, spec)   # no graph to record: skip autograd
        return function.apply(q, k, v, backend, spec)
    if backend == "triton":
        # Device / head-dim errors must surface at trace time as in eager, before the op.
        from .triton_backend import check_triton_inputs
        check_triton_inputs(q, k, v)
    if transform_active():
        return _TransformableAttention.apply(q, k, v, backend, spec)[0]
    return FORWARD_OPS[backend](q, k, v, *spec_args(spec))[0]
