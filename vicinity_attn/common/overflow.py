"""Overflow of the linear form's accumulators: an error, not a NaN, wherever it can be seen for free.

The states S_m = sum_j P_m(j) phi(k_j) v_j^T and the numerators phi(q_i) . S_m are accumulated in float32
for float32 / bfloat16 / float16 inputs. With |q|, |k| and |v| large enough that their products pass
float32's range (about max|q| * max|k| * max|v| * D * F > 3.4e38: magnitudes near 1e12 at D = 64), the
accumulators overflow and the output comes out inf / NaN, although o itself (a weighted mean of the
values) is in range. No scale chosen from the shapes alone can prevent that, and one chosen from the data
would cost every call a reduction over the inputs (and, on a GPU, a read back to the host).

So the backends check their result: a non-finite output or gradient from all-finite inputs raises
:class:`OverflowError` naming the magnitudes and the remedies. Where is set process-wide by
:func:`set_overflow_check` (or the environment variable ``VICINITY_ATTN_OVERFLOW_CHECK``):

- ``"free"`` (the default): where the check costs nothing but one pass over the result, on CPU tensors (the
  torch backend, the Triton interpreter). On a GPU it would cost a device-to-host read per call (and break
  CUDA-graph capture), so there the result is returned as computed: the docs state the domain.
- ``"always"``: on GPU tensors too, at the price of one synchronisation per call (for debugging a NaN);
  still skipped while a CUDA graph is being captured.
- ``"never"``: no check.

Never while torch.compile traces (a data-dependent branch would break the graph).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from . import feature_maps
from .spec import CallOptions

OVERFLOW_CHECK_MODES = ("free", "always", "never")
ENV_VAR = "VICINITY_ATTN_OVERFLOW_CHECK"
_mode: str | None = None     # None: not read from the environment yet


def set_overflow_check(mode: str) -> None:
    """Where the backends check for accumulator overflow, process-wide (module docstring): ``"free"``
    (CPU tensors only; the default), ``"always"`` (GPU tensors too: one synchronisation per call) or
    ``"never"``. Context-parallel calls put the mode in the fingerprint their ranks compare."""
    global _mode
    if mode not in OVERFLOW_CHECK_MODES:
        raise ValueError(f"set_overflow_check: mode must be one of {OVERFLOW_CHECK_MODES}, got {mode!r}")
    _mode = mode


def overflow_check() -> str:
    """The current mode of :func:`set_overflow_check` (first read from ``VICINITY_ATTN_OVERFLOW_CHECK``)."""
    global _mode
    if _mode is None:
        mode = os.environ.get(ENV_VAR, "free")
        if mode not in OVERFLOW_CHECK_MODES:
            raise ValueError(f"the environment variable {ENV_VAR} must be one of {OVERFLOW_CHECK_MODES}, "
                             f"got {mode!r}")
        _mode = mode
    return _mode


def checks_overflow(t: torch.Tensor) -> bool:
    """Whether a result like ``t`` is checked now (the mode, the device, tracing, CUDA-graph capture)."""
    mode = overflow_check()
    if mode == "never" or torch.compiler.is_compiling():
        return False
    if feature_maps.host_reads_are_free(t):
        return True
    return mode == "always" and not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def all_finite(tensors) -> bool:
    """No NaN or inf in any of ``tensors`` (None entries skipped)."""
    # A finite sum proves every element finite (a NaN or inf anywhere makes the sum NaN or inf): one
    # reduction, where isfinite().all() makes four passes. Only a non-finite sum, which finite values
    # can also give by overflowing, takes the exact test.
    return all(bool(t.sum().isfinite()) or bool(t.isfinite().all()) for t in tensors if t is not None)


def check_overflow(stage: str, results, inputs, spec: CallOptions | None) -> None:
    """Raise OverflowError when a result of ``stage`` ("forward" / "backward") is not finite although every
    input is, where :func:`checks_overflow` says so (see the module docstring). With identity features a
    zero normaliser is the caller's to avoid (documented), not an overflow: not checked."""
    first = next(t for t in results if t is not None)
    if not checks_overflow(first) or (spec is not None and spec.feature_map == "identity"):
        return
    if all_finite(results) or not all_finite(inputs):
        return
    raise_overflow(stage, inputs, first.dtype)


def raise_overflow(stage: str, inputs, dtype: torch.dtype, where: str = "") -> None:
    """The OverflowError of :func:`check_overflow` (``where``: an extra clause on what overflowed)."""
    names = ("q", "k", "v") if len(inputs) == 3 else ("dO", "q", "k", "v")
    sizes = ", ".join(f"max |{name}| = {float(t.abs().max()):.3g}" for name, t in zip(names, inputs))
    acc = "float64" if dtype == torch.float64 else "float32"
    limit = f"{torch.finfo(torch.float64 if acc == 'float64' else torch.float32).max:.2g}"
    raise OverflowError(
        f"vicinity_attention {stage}: the {acc} accumulators overflowed{where} ({sizes}; the states and numerators "
        f"grow like max|q| * max|k| * max|v| * D * F, which must stay below {limit}). The output is homogeneous "
        "of degree one in v and invariant to a common scale of q or k: rescale them (e.g. normalise q and k), "
        "or call with float64 inputs (backend 'torch').")


def raises_on_overflow(stage: str, n_inputs: int) -> Callable:
    """Decorates a backend's ``forward`` (stage "forward": its first result, o, is checked against its first
    ``n_inputs`` arguments) or ``backward`` (the gradients it returns) with :func:`check_overflow`."""
    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def checked(*args, **kwargs):
            out = fn(*args, **kwargs)
            if checks_overflow(args[0]):   # the results are on the inputs' device
                spec = next((a for a in args if isinstance(a, CallOptions)), kwargs.get("spec"))
                check_overflow(stage, out[:1] if stage == "forward" else out, args[:n_inputs], spec)
            return out
        return checked
    return decorate
