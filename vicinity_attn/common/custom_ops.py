"""What both operations' ``torch.library`` custom ops share: the namespace, autocast handling, the
placeholder for gradients not asked for, and the deferred ``torch._dynamo`` import of a first eager call."""
from __future__ import annotations

import contextlib
import sys

import torch
from torch import Tensor

NAMESPACE = "vicinity_attn"


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``; False for device types autocast does not know
    (e.g. "meta", where ``torch.is_autocast_enabled`` raises)."""
    if device_type == "cuda" or device_type == "cpu":     # the common case, without the availability lookup
        return torch.is_autocast_enabled(device_type)
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def autocast_disabled(device: torch.device):
    """Autocast off for the op bodies (see the module docstring); a no-op where autocast is not on."""
    if autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def autocast_inputs(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Under ``torch.autocast`` for q's device type, q, k, v cast to the autocast dtype (the way autocast
    treats matmuls: float16 / bfloat16 / float32 inputs are cast, float64 is left alone); else unchanged."""
    device_type = q.device.type
    if not autocast_enabled(device_type):
        return q, k, v
    dtype = torch.get_autocast_dtype(device_type)
    cast = lambda t: t.to(dtype) if t.dtype != torch.float64 else t  # noqa: E731
    return cast(q), cast(k), cast(v)


def empty_if_none(g: Tensor | None, like: Tensor) -> Tensor:
    """An empty tensor for a gradient not asked for: custom ops cannot return None."""
    return like.new_empty(0) if g is None else g


def defer_dynamo_import(op) -> None:
    """Spare eager users the ~1 s import of ``torch._dynamo`` on the op's first call.

    ``torch.library.custom_op`` wraps each implementation in ``torch._disable_dynamo``, which imports
    ``torch._dynamo`` the first time it runs, to turn off frame evaluation inside the body. While
    ``torch._dynamo`` has never been imported, no frame-evaluation hook can be installed, so there is
    nothing to turn off: until then the body is called directly; after that, the real disable is built
    once (as torch would) and used. Where torch's internals differ from what is expected here, nothing
    is changed (the first call then just pays the import).
    """
    for wrapper in getattr(op, "_backend_fns", {}).values():
        body = getattr(wrapper, "__wrapped__", None)
        if body is None or hasattr(body, "__dynamo_disable"):
            continue

        def call(*args, _body=body, **kwargs):
            if "torch._dynamo" not in sys.modules:
                return _body(*args, **kwargs)
            import torch._dynamo
            disabled = torch._dynamo.disable(_body, recursive=True, wrapping=False)
            _body.__dynamo_disable = disabled   # torch's own cache slot: later calls go straight there
            return disabled(*args, **kwargs)

        body.__dynamo_disable = call
