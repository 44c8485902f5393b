"""``launch_kernel(kernel, grid, *args, **kwargs)``: ``kernel[grid](*args, **kwargs)`` at a fraction of the host time.

Every ``kernel[grid](...)`` goes through Triton's ``JITFunction.run``: it binds the arguments to the
signature, computes each one's specialisation, reads Triton's knobs, builds the cache key and looks
the compiled kernel up, about 18 us per launch of a 40-argument kernel on this project's CPU. An eager
vicinity forward + backward makes 4-6 launches, so that binding alone was a third of its host time.

``launch_kernel`` asks ``JITFunction.run`` once per specialisation and keeps the ``CompiledKernel`` it returns;
later launches with the same specialisation call the compiled kernel directly, through
``CompiledKernel[grid](*args, stream=...)``, the interface triton 3.6 through 3.9 share (Triton's own
runner: the launch metadata and the launch hooks, e.g. a profiler's, are honoured). The key holds
what Triton specialises on, conservatively: every argument that is not a tensor by value (ints:
divisibility and the 32 / 64-bit type; constexprs; launch options), each tensor's dtype and 16-byte
alignment, the grid, and the driver and device launched on.

What does not take the shortcut: the interpreter (and interpreted kernels: the GPU model's traffic run),
and any launch while something has replaced ``JITFunction.run`` (the compile gate's launch capture, a
launch counter): those see every launch.
Triton's knobs (``TRITON_DEBUG``, instrumentation) are read at the first launch of a specialisation.
While ``replay.py`` records a call on this thread, each launch is also handed to it (the compiled kernel, the
grid and the full argument list), or marked as one it cannot replay.
"""
from __future__ import annotations

import inspect
import threading

import torch
from triton.compiler import CompiledKernel
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from .runtime import interpreting

_TRITON_RUN = JITFunction.run      # what "nothing hooks Triton's launches" looks like
CACHE_SIZE = 4096
_compiled: dict = {}               # key -> (compiled kernel, names of the parameters after the positional ones)
_Tensor = torch.Tensor


class _Recording(threading.local):
    """While replay.py records a call on this thread: .launches, a list of (compiled kernel, grid, full arguments)."""

    launches: list | None = None       # the class default: None on every thread until replay.py sets it


recording = _Recording()


def launch_kernel(kernel: JITFunction, grid: tuple[int, ...], *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``: the same launch; see the module docstring for what is cached."""
    if interpreting() or not isinstance(kernel, JITFunction) or JITFunction.run is not _TRITON_RUN:
        _slow(kernel, grid, args, kwargs)
        return
    try:
        active = driver.active
        device = active.get_current_device()
    except RuntimeError:         # no GPU driver: Triton's own path says so
        _slow(kernel, grid, args, kwargs)
        return
    key = (kernel, grid, active, device,
           *[(a.dtype, a.data_ptr() & 15 == 0) if isinstance(a, _Tensor) else a for a in args],
           *[(n, (a.dtype, a.data_ptr() & 15 == 0) if isinstance(a, _Tensor) else a) for n, a in kwargs.items()])
    try:
        entry = _compiled.get(key)
    except TypeError:            # an unhashable argument: Triton's own path decides what to do with it
        _slow(kernel, grid, args, kwargs)
        return
    if entry is None:
        compiled = kernel[grid](*args, **kwargs)
        if not isinstance(compiled, CompiledKernel):    # a future of an asynchronous compile
            _record(None)
            return
        if len(_compiled) >= CACHE_SIZE:
            _compiled.clear()
        entry = _compiled[key] = (compiled, _tail(kernel, len(args)))
        _record((compiled, _grid3(grid), _full_args(entry[1], args, kwargs)))
        return
    compiled, tail = entry
    full = _full_args(tail, args, kwargs)
    grid3 = _grid3(grid)
    if recording.launches is not None:
        recording.launches.append((compiled, grid3, full))
    compiled[grid3](*full, stream=active.get_current_stream(device))


def _full_args(tail: tuple[tuple[str, object], ...], args: tuple, kwargs: dict) -> tuple:
    """The positional arguments, then every later parameter in signature order (given or its default)."""
    return (*args, *[kwargs[name] if name in kwargs else default for name, default in tail])


def _slow(kernel, grid, args, kwargs) -> None:
    """A launch through Triton's own path (a launch recording, ``replay.py``, cannot replay it)."""
    _record(None)
    kernel[grid](*args, **kwargs)


def _record(launch) -> None:
    """Hands a launch to this thread's recording, if one is running (None: a launch it cannot replay)."""
    launches = recording.launches
    if launches is not None:
        launches.append(launch)


def _grid3(grid: tuple[int, ...]) -> tuple[int, int, int]:
    return (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)


_tails: dict = {}


def _tail(kernel: JITFunction, n_positional: int) -> tuple[tuple[str, object], ...]:
    """(name, default) of the kernel's parameters after the first ``n_positional``, in signature order:
    how a launch's keyword arguments and the defaults line up behind its positional ones."""
    key = (kernel, n_positional)
    tail = _tails.get(key)
    if tail is None:
        params = list(inspect.signature(kernel.fn).parameters.values())[n_positional:]
        tail = _tails[key] = tuple((p.name, p.default) for p in params)
    return tail


def clear() -> None:
    """Forget every kept compiled kernel (the next launch of each goes through Triton's binding again), and
    the recorded calls that launch them (``replay.py``)."""
    from . import replay
    _compiled.clear()
    replay.clear()
