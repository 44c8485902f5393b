"""Overflow of the linear form's accumulators: an error, not a NaN, wherever it can be seen for free.

The states S_m = sum_j P_m(j) phi(k_j) v_j^T and the numerators phi(q_i) . S_m are accumulated in float32
for float32 / bfloat16 / float16 inputs. With |q|, |k| and |v| large enough that their products pass
float32's range (about max|q| * max|k| * max|v| * D * F > 3.4e38: magnitudes near 1e12 at D = 64), the
accumulators overflow and the output comes out inf / NaN, although o itself (a weighted mean of the
values) is in range. No scale chosen from the shapes alone can prevent that, and one chosen from the data
would cost every call a reduction over the inputs (and, on a GPU, a read back to the host).

So the backends check their result where that costs nothing but one pass over it: on CPU tensors (the torch
backend, the Triton interpreter), outside torch.compile's tracing. A non-finite output or gradient from
all-finite inputs raises :class:`OverflowError` naming the magnitudes and the remedies. On a GPU the check
would cost a device-to-host read per call (and break CUDA-graph capture), so there the result is returned
as computed: the docs state the domain.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from . import feature_maps
from .spec import VicinitySpec


def _all_finite(tensors) -> bool:
    # A finite sum proves every element finite (a NaN or inf anywhere makes the sum NaN or inf): one
    # reduction, where isfinite().all() makes four passes. Only a non-finite sum, which finite values
    # can also give by overflowing, takes the exact test.
    return all(bool(t.sum().isfinite()) or bool(t.isfinite().all()) for t in tensors if t is not None)


def check_overflow(stage: str, results, inputs, spec: VicinitySpec | None) -> None:
    """Raise OverflowError when a result of ``stage`` ("forward" / "backward") is not finite although every
    input is: only on CPU tensors and outside tracing (see the module docstring). With identity features a
    zero normaliser is the caller's to avoid (documented), not an overflow: not checked."""
    first = next(t for t in results if t is not None)
    if (not feature_maps.host_reads_are_free(first) or torch.compiler.is_compiling()
            or (spec is not None and spec.feature_map == "identity")):
        return
    if _all_finite(results) or not _all_finite(inputs):
        return
    names = ("q", "k", "v") if len(inputs) == 3 else ("dO", "q", "k", "v")
    sizes = ", ".join(f"max |{name}| = {float(t.abs().max()):.3g}" for name, t in zip(names, inputs))
    acc = "float64" if first.dtype == torch.float64 else "float32"
    limit = f"{torch.finfo(torch.float64 if acc == 'float64' else torch.float32).max:.2g}"
    raise OverflowError(
        f"vicinity_attention {stage}: the {acc} accumulators overflowed ({sizes}; the states and numerators "
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
            if feature_maps.host_reads_are_free(args[0]):   # the results are on the inputs' device
                spec = next((a for a in args if isinstance(a, VicinitySpec)), kwargs.get("spec"))
                check_overflow(stage, out[:1] if stage == "forward" else out, args[:n_inputs], spec)
            return out
        return checked
    return decorate
