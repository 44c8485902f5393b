"""k-NN attention as ``torch.library`` custom ops (the pattern of :mod:`vicinity_attn.vicinity.ops`).

Each memory-bounded backend ("torch", "triton") gets a forward and a backward op over its
``forward()`` / ``backward()``:

    vicinity_attn::knn_<backend>_forward(q, k, v, topk, scale) -> (o, tau, lse)
    vicinity_attn::knn_<backend>_backward(do, q, k, v, o, tau, lse, topk, scale, need_dq, need_dk, need_dv)
        -> (dq, dk, dv)

tau (each row's topk-th largest score) and lse (the logsumexp of the kept scores) are [B, H, Nq] in
the compute dtype: the only per-row state saved besides q, k, v and o. A gradient not asked for
comes back empty (custom ops cannot return None) and is turned back into None here. The forward
op's autograd formula calls the backward op; differentiating the backward op raises a clear error. Op bodies run
with autocast off (inputs are cast by :func:`vicinity_attn.common.custom_ops.autocast_inputs` beforehand).

Autograd modes, as for vicinity attention (:mod:`vicinity_attn.common.transforms`): while a torch.func
transform or a forward-AD level is active the ops run inside :data:`_TransformableKnn`, an
``autograd.Function`` with a generated vmap rule (over the ops' vmap rules, which fold a vmapped
dimension into the batch) and a jvp (:func:`vicinity_attn.knn.tangent.knn_tangent`: the
tangent of the masked softmax with the mask held fixed). grad, vjp, jacrev, jvp, jacfwd, vmap and
``torch.autograd.forward_ad`` work; a derivative of a derivative raises a clear error.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..common.allocation import compute_dtype, empty_grads_like, empty_output_like
from ..common.custom_ops import NAMESPACE, autocast_disabled, defer_dynamo_import, empty_if_none
from ..common.transforms import (
    double_backward_error,
    eager_call,
    eager_function,
    register_folding_vmap,
    transform_active,
    transformable_functions,
)
from . import torch_backend as knn_torch
from .tangent import knn_tangent


def _backend_module(backend: str):
    """The module with the backend's ``forward()`` / ``backward()`` (triton imported on first use)."""
    if backend == "torch":
        return knn_torch
    from . import triton_backend as knn_triton
    return knn_triton


def _define_ops(backend: str):
    """Registers ``knn_<backend>_forward`` / ``knn_<backend>_backward`` with fakes and autograd."""

    @torch.library.custom_op(f"{NAMESPACE}::knn_{backend}_forward", mutates_args=(), device_types=None)
    def forward_op(q: Tensor, k: Tensor, v: Tensor, topk: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        with autocast_disabled(q.device):
            return _backend_module(backend).forward(q, k, v, topk, scale)

    @forward_op.register_fake
    def _(q, k, v, topk, scale):
        B, H, Nq, _ = q.shape
        dtype = compute_dtype(q.dtype)
        return (empty_output_like(q, v.shape[-1]), q.new_empty((B, H, Nq), dtype=dtype),
                q.new_empty((B, H, Nq), dtype=dtype))

    @torch.library.custom_op(f"{NAMESPACE}::knn_{backend}_backward", mutates_args=(), device_types=None)
    def backward_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, tau: Tensor, lse: Tensor,
                    topk: int, scale: float, need_dq: bool, need_dk: bool, need_dv: bool
                    ) -> tuple[Tensor, Tensor, Tensor]:
        with autocast_disabled(q.device):
            grads = _backend_module(backend).backward(do, q, k, v, o, tau, lse, topk, scale,
                                                      (need_dq, need_dk, need_dv))
        return tuple(empty_if_none(g, t) for g, t in zip(grads, (q, k, v)))

    @backward_op.register_fake
    def _(do, q, k, v, o, tau, lse, topk, scale, need_dq, need_dk, need_dv):
        grads = empty_grads_like((q, k, v), (need_dq, need_dk, need_dv))
        return tuple(empty_if_none(g, t) for g, t in zip(grads, (q, k, v)))

    def setup_context(ctx, inputs, output) -> None:
        q, k, v, topk, scale = inputs
        o, tau, lse = output
        ctx.save_for_backward(q, k, v, o, tau, lse)
        ctx.topk, ctx.scale = topk, scale
        ctx.set_materialize_grads(False)   # tau and lse are never differentiated

    def backward(ctx, do, _dtau, _dlse):
        if do is None:
            return None, None, None, None, None
        q, k, v, o, tau, lse = ctx.saved_tensors
        needs = [bool(n) for n in ctx.needs_input_grad[:3]]
        grads = backward_op(do, q, k, v, o, tau, lse, ctx.topk, ctx.scale, *needs)
        return (*(g if n else None for g, n in zip(grads, needs)), None, None)

    def no_double_backward(ctx, *grads):
        raise double_backward_error("knn_attention", backend)

    forward_op.register_autograd(backward, setup_context=setup_context)
    backward_op.register_autograd(no_double_backward, setup_context=lambda ctx, inputs, output: None)
    # vmap: the ops take a batch of (batch, head) slices; a vmapped dimension is folded into B.
    register_folding_vmap(forward_op, backward_op, n_backward_tensors=7)
    for op in (forward_op, backward_op):
        defer_dynamo_import(op)
    return forward_op, backward_op


knn_torch_forward, knn_torch_backward = _define_ops("torch")
knn_triton_forward, knn_triton_backward = _define_ops("triton")

FORWARD_OPS = {"torch": knn_torch_forward, "triton": knn_triton_forward}
BACKWARD_OPS = {"torch": knn_torch_backward, "triton": knn_triton_backward}

# The same ops as autograd.Functions with a jvp and a vmap rule, for torch.func transforms and forward AD.
_TransformableKnn, _TransformableKnnBackward = transformable_functions(
    "_TransformableKnn", "knn_attention", n_state=2,
    forward=lambda q, k, v, backend, topk, scale: FORWARD_OPS[backend](q, k, v, topk, scale),
    backward=lambda do, q, k, v, o, tau, lse, backend, topk, scale, *needs: BACKWARD_OPS[backend](
        do, q, k, v, o, tau, lse, topk, scale, *needs),
    tangent=lambda q, k, v, tq, tk, tv, backend, topk, scale: knn_tangent(q, k, v, tq, tk, tv, topk, scale))


def _eager_forward(q, k, v, backend, topk, scale):
    with autocast_disabled(q.device):
        return _backend_module(backend).forward(q, k, v, topk, scale)


def _eager_backward(do, q, k, v, o, tau, lse, backend, topk, scale, needs):
    with autocast_disabled(q.device):
        return _backend_module(backend).backward(do, q, k, v, o, tau, lse, topk, scale, needs)


# Plain eager calls: the backends directly, without the custom ops' dispatch (see eager_function).
_EagerKnn = eager_function("_EagerKnn", "knn_attention", _eager_forward, _eager_backward)


def custom_op_knn_attention(backend: str, q: Tensor, k: Tensor, v: Tensor, topk: int, scale: float) -> Tensor:
    """o [B, H, Nq, Dv] of ``backend`` ("torch" or "triton"), differentiable: a plain eager call runs the
    backend through its eager Function; compile, transforms, modes and meta tensors go through the custom op."""
    if eager_call(q, k, v):     # the backend's forward checks its inputs itself
        if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
            return _EagerKnn.forward_only(q, k, v, backend, topk, scale)   # no graph to record: skip autograd
        return _EagerKnn.apply(q, k, v, backend, topk, scale)
    if backend == "triton":
        from .triton_backend import check_knn_triton_inputs
        check_knn_triton_inputs(q, k, v)
    if transform_active():
        return _TransformableKnn.apply(q, k, v, backend, topk, scale)[0]
    return FORWARD_OPS[backend](q, k, v, topk, scale)[0]
