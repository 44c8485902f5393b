"""Median wall time of a callable: ``triton.testing.do_bench`` on a GPU, a careful loop on a CPU."""
from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

CPU_METHOD = ("CPU: one warm-up call (a timed sample only when it takes 1 s or more), then the median of repeated "
              "timed calls (time.perf_counter; calls under 2 ms are timed in batches; garbage collector paused)")
GPU_METHOD = "GPU: median of triton.testing.do_bench(warmup=25 ms, rep=100 ms, return_mode='all')"


@dataclass(frozen=True)
class Timing:
    """Median seconds per call, the number of timed samples, the relative spread (IQR / median) and
    the fastest sample (the least disturbed one: a useful second opinion on a loaded machine)."""

    median_s: float
    samples: int
    rel_iqr: float
    min_s: float = float("nan")
    q1_s: float = float("nan")     # first and third quartiles of the samples (error bars of the plot)
    q3_s: float = float("nan")


def _timing(samples: list[float], count: int | None = None) -> Timing:
    """A :class:`Timing` of per-call seconds ``samples`` (``count`` calls in all, default one per sample)."""
    median = statistics.median(samples)
    if len(samples) >= 4:
        q1, _, q3 = statistics.quantiles(samples, n=4)
    else:
        q1, q3 = min(samples), max(samples)
    return Timing(median, len(samples) if count is None else count, (q3 - q1) / median if median else 0.0,
                  min(samples), q1, q3)


@contextlib.contextmanager
def _gc_paused():
    """The garbage collector off while timing: a collection in the middle of a sample is noise, not
    the kernel's cost."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# Calls at least this long count their warm-up call as a timed sample.
LONG_CALL_S = 1.0


def cpu_median(fn: Callable[[], object], *, budget_s: float = 1.0, min_samples: int = 3,
               max_samples: int = 50) -> Timing:
    """Median seconds per call of ``fn`` on a CPU.

    The first call is a warm-up (allocator, thread pool, lazy imports) and is not counted (unless it
    took LONG_CALL_S or more, where such one-off costs vanish in the noise); its
    time (or, for short calls, that of a second call) sets how many samples fit into ``budget_s``
    (at least ``min_samples``). Very short calls are repeated inside one sample so that timer resolution and
    loop overhead do not count.
    """
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first < 0.05:
        # Short calls: the warm-up time is dominated by one-off costs; time a second call to size
        # the loop. Long calls skip this (the warm-up only overestimates them, i.e. fewer samples).
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
    inner = max(1, int(2e-3 / max(first, 1e-9))) if first < 2e-3 else 1
    n_samples = int(min(max_samples, max(min_samples, budget_s // max(first * inner, 1e-9))))
    samples = []
    if first >= LONG_CALL_S:
        # One-off costs are negligible against a call this long: the warm-up counts as a sample
        # (on a loaded 2-core CPU this saves 10-30 s per cell of softmax attention at 112x112).
        samples.append(first)
        n_samples -= 1
    with _gc_paused():
        for _ in range(n_samples):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t0) / inner)
    return _timing(samples, len(samples) * inner)


def gpu_median(fn: Callable[[], object]) -> Timing:
    """Median seconds per call of ``fn`` on a GPU with ``triton.testing.do_bench`` (CUDA events,
    L2 cache flushed between calls)."""
    import triton.testing

    try:
        # return_mode="all" (recent triton) gives every per-call time: median and spread from one run.
        times_ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="all")
    except (AssertionError, TypeError, ValueError):
        # Older triton: ask for the quartiles instead.
        q1, median_ms, q3 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.25, 0.5, 0.75])
        return Timing(median_ms / 1e3, 0, (q3 - q1) / median_ms if median_ms else 0.0, q1 / 1e3, q1 / 1e3, q3 / 1e3)
    return _timing([t / 1e3 for t in times_ms])


def median_time(fn: Callable[[], object], device: torch.device, *, budget_s: float = 1.0) -> Timing:
    """Median seconds per call of ``fn`` on ``device``."""
    if device.type == "cuda":
        return gpu_median(fn)
    return cpu_median(fn, budget_s=budget_s)


def timing_method(device: torch.device) -> str:
    """One sentence on how times on ``device`` were taken (goes into the JSON and the table header)."""
    return GPU_METHOD if device.type == "cuda" else CPU_METHOD


def interleaved_medians(fns: dict[str, Callable[[], object]], device: torch.device, *,
                        budget_s: float = 4.0, min_rounds: int = 3, max_rounds: int = 30) -> dict[str, Timing]:
    """Median seconds per call of several callables, timed in alternation.

    On a shared machine the background load drifts over seconds; calling A, B, A, B, ... exposes
    every callable to the same drift, so the *ratios* of the medians are far steadier than those of
    medians taken one after the other. After one untimed warm-up call of each, as many rounds run as
    fit into ``budget_s`` (at least ``min_rounds``). On a GPU each callable goes to do_bench instead
    (a GPU is not time-shared the same way).
    """
    if device.type == "cuda":
        return {name: gpu_median(fn) for name, fn in fns.items()}
    first = {}
    for name, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
    n_rounds = int(min(max_rounds, max(min_rounds, budget_s // max(sum(first.values()), 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    with _gc_paused():
        for _ in range(n_rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
    return {name: _timing(s) for name, s in samples.items()}
