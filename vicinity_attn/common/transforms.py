"""torch.func transforms and forward-mode AD over an attention op's pair of custom ops.

Shared by vicinity attention (:mod:`vicinity_attn.vicinity.ops`) and k-NN attention (:mod:`vicinity_attn.knn.ops`).
Each has a forward custom op ``(q, k, v, *options) -> (o, *state)`` and a backward custom op
``(do, q, k, v, o, *state, *options, need_dq, need_dk, need_dv) -> (dq, dk, dv)``, where ``state`` is
what the backend saves for backward (never differentiated) and ``options`` the op's non-tensor
arguments.

A custom op's registered autograd serves reverse mode (``.backward()``, ``torch.autograd.grad``) and
torch.compile, but torch.func transforms reject it and forward-mode AD silently gives it no tangent.
While a transform or a forward-AD level is active (:func:`transform_active`), the same two ops
therefore run inside the ``autograd.Function`` pair built by :func:`transformable_functions`: with
``setup_context``, a generated vmap rule (over the ops' own vmap rules, :func:`register_folding_vmap`,
which fold the vmapped dimension into the batch) and a ``jvp`` given by the op (a plain-PyTorch
tangent). Supported: grad, vjp, jacrev, jvp, jacfwd, vmap and ``torch.autograd.forward_ad``; any
derivative of a derivative (double backward, hessian, jvp of a grad) raises
:func:`double_backward_error`'s message. torch.compile never sees these Functions (Dynamo does not
trace an ``autograd.Function`` with a custom ``jvp``).

Plain eager calls (:func:`eager_call`) skip the custom ops altogether: :func:`eager_function` builds a
lean ``autograd.Function`` over the backend's own forward and backward, with the same double-backward
error.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

DOUBLE_BACKWARD_MESSAGE = (
    "{function}(backend={backend!r}) does not support double backward (a gradient of a gradient: "
    "backward through a graph built with create_graph=True, torch.func.hessian, nested torch.func.grad, "
    "jacfwd/jvp over a gradient). Its backward is hand-written and not itself differentiable. "
    "Use backend='reference' (plain PyTorch autograd, quadratic in the number of tokens) for higher-order "
    "derivatives.")


def double_backward_error(function: str, backend: str) -> RuntimeError:
    """The user-facing error for a derivative of ``function``'s hand-written backward."""
    return RuntimeError(DOUBLE_BACKWARD_MESSAGE.format(function=function, backend=backend))


def transform_active() -> bool:
    """A torch.func transform or a forward-AD dual level is active (and we are not being compiled)."""
    if torch.compiler.is_compiling():
        return False
    return (torch._C._functorch.peek_interpreter_stack() is not None
            or torch.autograd.forward_ad._current_level >= 0)


# ----------------------------------------------------------------------------------------------------
# vmap rules of the custom ops: a vmapped dimension folded into the batch
# ----------------------------------------------------------------------------------------------------

def fold(t: Tensor, dim: int | None, n: int) -> Tensor:
    """A vmapped tensor [..n at dim..] (or an unbatched one, broadcast to n) as a contiguous [n * B, ...]
    (the kernels take the saved states contiguous, and a broadcast would give them a zero stride)."""
    t = t.expand(n, *t.shape) if dim is None else t.movedim(dim, 0)
    return t.flatten(0, 1).contiguous()


def register_folding_vmap(forward_op, backward_op, n_backward_tensors: int) -> None:
    """vmap rules for a forward / backward custom-op pair that already take a batch of (batch, head)
    slices: the vmapped dimension is folded into the batch dimension of every tensor argument and
    unfolded from every output. The backward op's first ``n_backward_tensors`` arguments are tensors;
    its empty placeholder outputs (gradients not asked for) stay unbatched."""

    @forward_op.register_vmap
    def _(info, in_dims, q, k, v, *options):
        n = info.batch_size
        outs = forward_op(*(fold(t, d, n) for t, d in zip((q, k, v), in_dims)), *options)
        return tuple(t.unflatten(0, (n, -1)) for t in outs), (0,) * len(outs)

    @backward_op.register_vmap
    def _(info, in_dims, *args):
        n = info.batch_size
        tensors = [fold(t, d, n) for t, d in zip(args[:n_backward_tensors], in_dims)]
        grads = backward_op(*tensors, *args[n_backward_tensors:])
        return (tuple(g.unflatten(0, (n, -1)) if g.numel() else g for g in grads),
                tuple(0 if g.numel() else None for g in grads))


# ----------------------------------------------------------------------------------------------------
# autograd.Function pair for transforms and forward AD
# ----------------------------------------------------------------------------------------------------

def transformable_functions(name: str, function: str, n_state: int,
                            forward: Callable[..., tuple[Tensor, ...]],
                            backward: Callable[..., tuple[Tensor, Tensor, Tensor]],
                            tangent: Callable[..., Tensor]) -> tuple[type, type]:
    """(Attention, Backward): ``autograd.Function`` classes over an op pair, for transforms and forward AD.

    ``Attention.apply(q, k, v, backend, *options)`` returns ``forward(q, k, v, backend, *options)``, the
    op's ``(o, *state)`` with ``n_state`` state tensors (marked non-differentiable). Its backward calls
    ``Backward.apply(do, q, k, v, o, *state, backend, *options, need_dq, need_dk, need_dv)``, which runs
    ``backward`` with the same arguments; its jvp is ``tangent(q, k, v, tq, tk, tv, backend, *options)``
    (tangents None where zero), the tangent of o. ``name`` names the classes (their grad_fn is
    ``<name>Backward``); ``function`` is the public function named by the double-backward error.
    """

    def attention_forward(q, k, v, backend, *options):
        return forward(q, k, v, backend, *options)

    def attention_setup_context(ctx, inputs, output) -> None:
        q, k, v, backend, *options = inputs
        o, *state = output
        ctx.mark_non_differentiable(*state)
        ctx.save_for_backward(q, k, v, o, *state)
        ctx.save_for_forward(q, k, v)
        ctx.backend, ctx.options = backend, options
        ctx.set_materialize_grads(False)

    def attention_backward(ctx, do, *_dstate):
        n_args = 4 + len(ctx.options)
        if do is None:
            return (None,) * n_args
        needs = tuple(bool(n) for n in ctx.needs_input_grad[:3])
        grads = backward_fn.apply(do, *ctx.saved_tensors, ctx.backend, *ctx.options, *needs)
        return (*(g if n else None for g, n in zip(grads, needs)), *(None,) * (n_args - 3))

    def attention_jvp(ctx, tq, tk, tv, *_option_tangents):
        q, k, v = ctx.saved_tensors
        return (tangent(q, k, v, tq, tk, tv, ctx.backend, *ctx.options), *(None,) * n_state)

    def backward_forward(do, q, k, v, o, *rest):
        return backward(do, q, k, v, o, *rest)

    def backward_setup_context(ctx, inputs, output) -> None:
        ctx.backend = inputs[5 + n_state]

    def no_derivative(ctx, *grads):
        raise double_backward_error(function, ctx.backend)

    attention_fn = type(name, (torch.autograd.Function,), dict(
        __doc__=f"{function} through its custom ops, for torch.func transforms and forward-mode AD.",
        generate_vmap_rule=True, forward=staticmethod(attention_forward),
        setup_context=staticmethod(attention_setup_context), backward=staticmethod(attention_backward),
        jvp=staticmethod(attention_jvp)))
    backward_fn = type(f"{name}Grad", (torch.autograd.Function,), dict(
        __doc__=f"{function}'s backward op under transforms: differentiating it raises a clear error.",
        generate_vmap_rule=True, forward=staticmethod(backward_forward),
        setup_context=staticmethod(backward_setup_context), backward=staticmethod(no_derivative),
        jvp=staticmethod(no_derivative)))
    return attention_fn, backward_fn


# ----------------------------------------------------------------------------------------------------
# autograd.Function for plain eager calls
# ----------------------------------------------------------------------------------------------------

def eager_function(name: str, function: str, forward: Callable[..., tuple[Tensor, ...]],
                   backward: Callable[..., tuple[Tensor | None, Tensor | None, Tensor | None]]) -> type:
    """An ``autograd.Function`` over a backend's own ``forward`` / ``backward``, for eager calls.

    A custom op's dispatch (schema parsing, alias checks, the registered autograd) costs a plain eager
    call about as much host time as all of its kernel launches; an ``autograd.Function`` costs a
    fraction of that. The custom ops stay what torch.compile traces and what transforms wrap
    (:func:`eager_call` decides). ``Function.apply(q, k, v, backend, *options)`` returns o of
    ``forward(q, k, v, backend, *options) -> (o, *state)``; its backward returns
    ``backward(do, q, k, v, o, *state, backend, *options, needs)`` (None where ``needs`` is False),
    computed without recording a graph: with ``create_graph=True`` the gradients come out attached to
    a node whose own backward raises :func:`double_backward_error`, as the custom ops' do.
    ``Function.forward_only(q, k, v, backend, *options)`` returns o alone without autograd, for calls that
    record no graph (no input requires grad, or grad mode is off).
    """

    def attention_forward(ctx, q, k, v, backend, *options):
        o, *state = forward(q, k, v, backend, *options)
        ctx.save_for_backward(q, k, v, o, *state)
        ctx.backend, ctx.options = backend, options
        return o

    def attention_backward(ctx, do):
        needs = ctx.needs_input_grad[:3]
        if not torch.is_grad_enabled():  # the common case: the engine already runs backward without a graph
            grads = backward(do, *ctx.saved_tensors, ctx.backend, *ctx.options, needs)
            return (*grads, *(None,) * (1 + len(ctx.options)))
        with torch.no_grad():
            grads = backward(do, *ctx.saved_tensors, ctx.backend, *ctx.options, needs)
        # create_graph=True: the gradients themselves are not differentiable
        grads = _Underivable.apply(function, ctx.backend, *ctx.saved_tensors[:3], *grads)
        return (*grads, *(None,) * (1 + len(ctx.options)))

    def forward_only(q, k, v, backend, *options):
        return forward(q, k, v, backend, *options)[0]

    return type(name, (torch.autograd.Function,), dict(
        __doc__=f"{function} for eager calls: the backend's forward and backward without the custom op "
                "(``forward_only``: o alone, for calls that record no graph).",
        forward=staticmethod(attention_forward), backward=staticmethod(attention_backward),
        forward_only=staticmethod(forward_only)))


class _Underivable(torch.autograd.Function):
    """Identity on (dq, dk, dv) (None passes through); differentiating the result raises the op's
    double-backward error. q, k, v attach the result to the graph of what it depends on."""

    @staticmethod
    def forward(ctx, function, backend, q, k, v, *grads):
        ctx.function, ctx.backend = function, backend
        return tuple(None if g is None else g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx, *grads):
        raise double_backward_error(ctx.function, ctx.backend)


def eager_call(*tensors: Tensor) -> bool:
    """Whether a call on ``tensors`` may take :func:`eager_function`'s path: not being compiled, no
    transform or forward-AD level, plain (not subclassed) tensors on a real device, and no torch
    function or dispatch mode that expects to see the custom op."""
    if torch.compiler.is_compiling() or transform_active():
        return False
    for t in tensors:
        if type(t) is not Tensor or t.device.type == "meta":
            return False
    return not (_torch_function_mode_enabled() or _dispatch_mode_active())


def _torch_function_mode_enabled() -> bool:
    check = getattr(torch._C, "_is_torch_function_mode_enabled", None)
    return True if check is None else bool(check())


def _dispatch_mode_active() -> bool:
    depth = getattr(torch._C, "_len_torch_dispatch_stack", None)
    return True if depth is None else depth() > 0
