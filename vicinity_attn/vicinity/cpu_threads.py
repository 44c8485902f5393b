"""How many threads one CPU call of the torch backend uses, chosen per call from its size and from
how busy the machine's cores are.

Why: the torch backend runs many mid-sized operations per call (per chunk of heads, per grid axis),
and each of PyTorch's OpenMP parallel regions ends in a barrier. When another process occupies a
core, a thread of ours waits for a time slice at every barrier, so the call slows down far more than
a few large matmuls would (the figures are in the CHANGELOG and docs/benchmarks.md).

The policy, for a call on CPU tensors while ``torch.get_num_threads() > 1``:

- a small call (under :data:`SMALL_CALL_WORK` multiply-adds of one D x Dv product per token) runs on
  one thread: threads cannot pay for their barriers there, loaded or not;
- otherwise the call uses as many threads as cores were left idle by other processes over the last
  quarter second or more (machine busy time from ``/proc/stat`` minus this process's own CPU time),
  at least one and at most torch's setting.

The thread count is restored after the call. ``VICINITY_ATTN_CPU_THREADS=torch`` turns the policy off
(torch's setting is used as it is); where ``/proc/stat`` cannot be read only the size rule applies.
"""
from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import TypeVar

import torch

# Below this many multiply-adds (B * H * N * D * Dv, the size of one D x Dv product per token) a call
# runs on one thread: 14x14 B2 H4 D32 is 1.6e6, 28x28 B1 H4 D64 is 1.3e7.
SMALL_CALL_WORK = 2 ** 22
# Other processes' CPU use is re-measured over windows of at least this many seconds.
WINDOW_S = 0.25

_T = TypeVar("_T")


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes spent busy since boot (Linux /proc/stat; None elsewhere)."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds this process (all its threads) has used."""
    t = os.times()
    return t.user + t.system


def other_processes_cores(start: tuple[float, float | None, float], end: tuple[float, float | None, float]
                          ) -> float | None:
    """Average number of cores other processes kept busy between two :func:`cpu_sample` readings."""
    (wall0, busy0, own0), (wall1, busy1, own1) = start, end
    if busy0 is None or busy1 is None or wall1 <= wall0:
        return None
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0)


def cpu_sample() -> tuple[float, float | None, float]:
    """(wall clock, machine busy CPU seconds, this process's CPU seconds), for :func:`other_processes_cores`."""
    return time.perf_counter(), machine_busy_seconds(), own_cpu_seconds()


class _IdleCores:
    """Cores other processes left idle, re-measured at most every WINDOW_S seconds."""

    def __init__(self) -> None:
        self._start = cpu_sample()
        self._idle: float | None = None

    def idle(self) -> float | None:
        now = time.perf_counter()
        if now - self._start[0] >= WINDOW_S:
            end = cpu_sample()
            others = other_processes_cores(self._start, end)
            self._idle = None if others is None else (os.cpu_count() or 1) - others
            self._start = end
        return self._idle


_IDLE = _IdleCores()


def call_threads(work: int) -> int:
    """Threads for one CPU call of ``work`` multiply-adds (see the module docstring)."""
    current = torch.get_num_threads()
    if current <= 1 or os.environ.get("VICINITY_ATTN_CPU_THREADS", "auto") == "torch":
        return current
    if work < SMALL_CALL_WORK:
        return 1
    idle = _IDLE.idle()
    if idle is None:
        return current
    return max(1, min(current, int(idle + 0.5)))


def with_call_threads(fn: Callable[..., _T]) -> Callable[..., _T]:
    """Runs ``fn`` (a backend's forward or backward, or a frame-causal window function: the 4-d tensors
    among its first four arguments are token tensors [B, H, N, D]) with :func:`call_threads` threads when
    they are CPU tensors."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tensors = [a for a in args[:4] if isinstance(a, torch.Tensor) and a.dim() == 4]
        if not tensors or tensors[0].device.type != "cpu":
            return fn(*args, **kwargs)
        previous = torch.get_num_threads()
        threads = call_threads(max(t.numel() * t.shape[-1] for t in tensors))
        if threads == previous:
            return fn(*args, **kwargs)
        torch.set_num_threads(threads)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(previous)

    return wrapper
