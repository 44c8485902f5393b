"""Scratch memory that the torch backend keeps between calls on the CPU.

Why: on a CPU every fresh multi-megabyte buffer is page-faulted in (and zero-filled by the kernel)
on first touch, and glibc hands large freed buffers straight back to the OS (munmap, heap trim), so
a layer that allocates its temporaries afresh pays that again on every call. At 112x112, B=1, H=4,
D=64 that was ~14,500 page faults and ~45 ms per training forward, against ~27 ms with glibc's
trimming turned off (no faults); ``python -m bench --target-check`` reports the fault count. On CUDA, PyTorch's caching allocator
already reuses memory, so the cache is CPU-only.

The torch backend takes its temporaries (never its outputs, never anything saved for backward)
from here by name. Each thread keeps its own buffers, so concurrent calls from several threads
never share one. Buffers grow to the largest request seen and are held until
:func:`clear_cpu_scratch`; a request that would take the thread's total above the limit
(:func:`set_cpu_scratch_limit`, default 256 MiB, or the environment variable
``VICINITY_ATTN_CPU_SCRATCH_MB``) gets a plain fresh tensor instead. The buffers held between calls
add to the process's memory everywhere else too (other layers' peaks included), by at most the
limit per thread that calls the backend.
"""
from __future__ import annotations

import os
import threading

import torch

_DEFAULT_LIMIT_BYTES = 256 * 2 ** 20


def _limit_from_env() -> int:
    raw = os.environ.get("VICINITY_ATTN_CPU_SCRATCH_MB")
    if raw is None or raw.strip() == "":
        return _DEFAULT_LIMIT_BYTES
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"VICINITY_ATTN_CPU_SCRATCH_MB must be a number of MiB, got {raw!r}") from None
    if mb < 0:
        raise ValueError(f"VICINITY_ATTN_CPU_SCRATCH_MB must be >= 0, got {raw!r}")
    return int(mb * 2 ** 20)


_limit_bytes = _limit_from_env()
_local = threading.local()


def _buffers() -> dict[tuple[str, torch.dtype], torch.Tensor]:
    if not hasattr(_local, "buffers"):
        _local.buffers = {}
    return _local.buffers


def set_cpu_scratch_limit(nbytes: int) -> None:
    """Cap the scratch memory each thread may keep between calls, in bytes (0 turns caching off).

    Buffers already held above the new cap are released."""
    global _limit_bytes
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be a non-negative int, got {nbytes!r}")
    _limit_bytes = nbytes
    if cpu_scratch_bytes() > nbytes:
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
    thread) returns the same memory. Never return the result or save it for backward."""
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
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
