"""Scratch memory that the torch backend keeps between calls on the CPU.

Why: on a CPU every fresh multi-megabyte buffer is page-faulted in (and zero-filled by the kernel)
on first touch, and glibc hands large freed buffers straight back to the OS (munmap, heap trim), so
a layer that allocates its temporaries afresh pays that again on every call
(``python -m bench --target-check`` reports the faults per call). On CUDA, PyTorch's caching allocator
already reuses memory, so the cache is CPU-only.

The torch backend takes its temporaries (never its outputs, never anything saved for backward)
from here by name. Each thread keeps its own buffers, so concurrent calls from several threads
never share one. Buffers grow to the largest request seen and are held until
:func:`clear_cpu_scratch`; a request that would take the thread's total above the limit
(:func:`set_cpu_scratch_limit`, default 256 MiB, or the environment variable
``VICINITY_ATTN_CPU_SCRATCH_MB``) gets a plain fresh tensor instead. The limit is process-wide: set
from any thread, it binds every thread's cache from that thread's next request on (a thread holding
more than the new limit releases its buffers then). The buffers held between calls
add to the process's memory everywhere else too (other layers' peaks included), by at most the
limit per thread that calls the backend.

Re-entrancy: a call may start while another is in flight on the same thread (a signal handler, a
hook, a ``__torch_function__`` override that runs the attention again). The backend wraps each
forward and backward in :func:`scratch_session`; only the outermost session of a thread uses the
cache, a nested one gets fresh tensors, so it can never overwrite the outer call's temporaries.

A malformed ``VICINITY_ATTN_CPU_SCRATCH_MB`` (not a number, negative, nan or inf) does not make
``import vicinity_attn`` fail: the variable only tunes memory reuse, never a result, so the import
warns (``RuntimeWarning`` naming the variable and its value) and keeps the default limit.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import warnings
from collections.abc import Iterator

import torch

_DEFAULT_LIMIT_BYTES = 256 * 2 ** 20


ENV_VAR = "VICINITY_ATTN_CPU_SCRATCH_MB"


def _limit_from_env() -> int:
    """The limit in bytes from ``VICINITY_ATTN_CPU_SCRATCH_MB`` (a finite number of MiB >= 0), the
    default when it is unset or blank; ValueError naming the variable otherwise."""
    raw = os.environ.get(ENV_VAR)
    if raw is None or raw.strip() == "":
        return _DEFAULT_LIMIT_BYTES
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_VAR} must be a number of MiB, got {raw!r}") from None
    if not math.isfinite(mb) or mb < 0:
        raise ValueError(f"{ENV_VAR} must be a finite number of MiB >= 0, got {raw!r}")
    return int(mb * 2 ** 20)


def _initial_limit() -> int:
    """The limit at import: a bad environment value warns and falls back (see the module docstring)."""
    try:
        return _limit_from_env()
    except ValueError as exc:
        warnings.warn(f"{exc}; ignoring it and keeping the default limit of "
                      f"{_DEFAULT_LIMIT_BYTES // 2 ** 20} MiB", RuntimeWarning, stacklevel=2)
        return _DEFAULT_LIMIT_BYTES


_limit_bytes = _initial_limit()
_limit_version = 0   # bumped by every set_cpu_scratch_limit, so that each thread re-checks what it holds
_local = threading.local()


@contextlib.contextmanager
def scratch_session() -> Iterator[None]:
    """Marks one backend call on this thread; :func:`scratch` inside a nested session (a call started
    while another is in flight on the same thread) returns fresh tensors instead of cached ones."""
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


def _buffers() -> dict[tuple[str, torch.dtype], torch.Tensor]:
    if not hasattr(_local, "buffers"):
        _local.buffers = {}
    return _local.buffers


def set_cpu_scratch_limit(nbytes: int) -> None:
    """Cap the scratch memory each thread may keep between calls, in bytes (0 turns caching off).

    Process-wide: this thread releases buffers held above the new cap now, every other thread at its
    next scratch request."""
    global _limit_bytes, _limit_version
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be a non-negative int, got {nbytes!r}")
    _limit_bytes = nbytes
    _limit_version += 1
    _obey_limit()


def _obey_limit() -> None:
    """Release this thread's buffers if they exceed the current limit (set from any thread)."""
    _local.limit_version = _limit_version
    if cpu_scratch_bytes() > _limit_bytes:
        clear_cpu_scratch()


def cpu_scratch_limit() -> int:
    """The per-thread cap on kept scratch memory, in bytes."""
    return _limit_bytes


def cpu_scratch_bytes() -> int:
    """Bytes of scratch memory this thread currently keeps."""
    return sum(t.numel() * t.element_size() for t in _buffers().values())


def clear_cpu_scratch() -> None:
    """Release this thread's scratch buffers (they are re-created on the next call that needs them)."""
    _buffers().clear()


def scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat tensor of ``numel`` elements with undefined contents, for temporaries only.

    Two live temporaries must use different names: a later request for ``name`` (same dtype, this
    thread) returns the same memory. Never return the result or save it for backward. Inside a
    nested :func:`scratch_session` the result is always a fresh tensor."""
    if device.type != "cpu" or getattr(_local, "depth", 0) > 1:
        return torch.empty(numel, dtype=dtype, device=device)
    if getattr(_local, "limit_version", 0) != _limit_version:
        _obey_limit()
    buffers = _buffers()
    key = (name, dtype)
    held = buffers.get(key)
    if held is not None and held.numel() >= numel:
        return held[:numel]
    held_bytes = cpu_scratch_bytes() - (0 if held is None else held.numel() * held.element_size())
    if held_bytes + numel * dtype.itemsize > _limit_bytes:
        return torch.empty(numel, dtype=dtype, device=device)
    if held is not None:
        del buffers[key], held   # free the smaller buffer before the larger one is touched
    # A normal (non-inference) tensor, so that calls in and out of inference_mode can both write it.
    with torch.inference_mode(False):
        buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffers[key]
