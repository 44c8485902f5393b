"""The sweep: cases x providers x modes -> rows, each measured or skipped with a printed reason."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .cases import Case
from .flops import MODES, mode_flops
from .memory import memory_budget_bytes, peak_allocated_bytes, saved_tensor_bytes
from .providers import Provider, make_inputs, make_provider
from .report import NOISY_SPREAD
from .timing import median_time


@dataclass
class SweepConfig:
    """Everything about a sweep except the cases."""

    device: torch.device
    dtype: torch.dtype
    providers: Sequence[str]
    modes: Sequence[str] = MODES
    variant: str = "sum"
    max_call_s: float = 5.0        # skip a provider/mode whose single call is estimated to take longer
    budget_s: float = 1.0          # CPU timing budget per row (more samples for fast calls)
    memory_budget: float | None = None   # bytes; default: half the free memory of the device
    matmul_flops_per_s: float | None = None  # the machine's dense rate: a first guess for unseen sizes
    progress: bool = True


@dataclass
class _History:
    """Measured (flops, seconds) per provider/mode/head shape, to extrapolate to the next size."""

    seen: dict = field(default_factory=dict)

    def key(self, case: Case, provider: str, mode: str) -> tuple:
        return (provider, mode, case.batch, case.heads, case.dim, case.dim_v)

    def estimate(self, case: Case, provider: str, mode: str, flops: float) -> float | None:
        prev = self.seen.get(self.key(case, provider, mode))
        if prev is None:
            return None
        prev_flops, prev_s = prev
        return prev_s * flops / prev_flops

    def record(self, case: Case, provider: str, mode: str, flops: float, seconds: float) -> None:
        self.seen[self.key(case, provider, mode)] = (flops, seconds)


def mode_callable(provider: Provider, mode: str, q, k, v) -> Callable[[], object]:
    """The zero-argument callable timed for ``mode``.

    fwd: a training forward (inputs require grad, so autograd saves what backward needs, as in
    FlashAttention's benchmarks). bwd: ``torch.autograd.grad`` through one retained graph.
    fwdbwd: both. Gradients are returned, not accumulated into ``.grad``, so no extra add is timed.
    """
    inputs = (q, k, v)
    if mode == "fwd":
        return lambda: provider.fn(q, k, v)
    out = provider.fn(q, k, v)
    dout = torch.randn_like(out)
    if mode == "bwd":
        return lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True)
    if mode == "fwdbwd":
        return lambda: torch.autograd.grad(provider.fn(q, k, v), inputs, dout)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _base_row(case: Case, name: str, mode: str, config: SweepConfig) -> dict:
    return {**case.to_dict(), "case": case.name, "provider": name, "label": name, "mode": mode,
            "dtype": str(config.dtype).replace("torch.", ""), "device": str(config.device),
            "median_ms": None, "min_ms": None, "flops": None, "flops_per_s": None, "speedup_vs_flash": None,
            "saved_bytes": None, "saved_tensors": None, "peak_bytes": None, "samples": None,
            "rel_iqr": None, "q1_ms": None, "q3_ms": None, "noisy": None, "skipped": None}


def _progress(config: SweepConfig, start: float, done: int, total: int, text: str) -> None:
    if config.progress:
        print(f"[{done:3d}/{total}] {time.perf_counter() - start:6.1f}s  {text}", file=sys.stderr, flush=True)


def run_sweep(cases: Sequence[Case], config: SweepConfig) -> list[dict]:
    """Measure every (case, provider, mode); a row that cannot or should not run gets ``skipped``."""
    budget = config.memory_budget if config.memory_budget is not None else memory_budget_bytes(config.device)
    history = _History()
    rows: list[dict] = []
    total = len(cases) * len(config.providers) * len(config.modes)
    start = time.perf_counter()
    for case in cases:
        labels_here: dict[str, str] = {}
        for name in config.providers:
            provider = make_provider(name, case, config.device, config.dtype, config.variant)
            reason = provider if isinstance(provider, str) else None
            if reason is None:
                # On a CPU "vicinity" is the torch backend: running it twice would only add noise.
                twin = next((n for n, lab in labels_here.items() if lab == provider.label), None)
                if twin is not None:
                    reason = f"same implementation as {twin!r} on this device ({provider.label})"
                elif provider.memory_estimate > budget:
                    reason = (f"needs ~{provider.memory_estimate / 2**30:.1f} GiB of working memory, "
                              f"over the budget of {budget / 2**30:.1f} GiB")
            if reason is not None:
                label = name if isinstance(provider, str) else provider.label
                for mode in config.modes:
                    rows.append({**_base_row(case, name, mode, config), "label": label, "skipped": reason})
                    _progress(config, start, len(rows), total, f"{case.name} {name} {mode}: skipped: {reason}")
                continue
            labels_here[name] = provider.label
            rows.extend(_run_provider(case, provider, config, history, start, len(rows), total))
    add_speedups(rows)
    return rows


def _run_provider(case: Case, provider: Provider, config: SweepConfig, history: _History,
                  start: float, done: int, total: int) -> list[dict]:
    rows = []
    q, k, v = make_inputs(provider, case, config.device, config.dtype, requires_grad=True)
    saved = None
    for mode in config.modes:
        row = _base_row(case, provider.name, mode, config)
        row["label"] = provider.label
        flops = mode_flops(provider.forward_flops, provider.kind, mode)
        row["flops"] = flops
        estimate = history.estimate(case, provider.name, mode, flops)
        if estimate is None and config.matmul_flops_per_s:
            # Nothing measured yet at a smaller size: assume half the machine's matmul rate.
            estimate = flops / (0.5 * config.matmul_flops_per_s)
        if estimate is not None and estimate > config.max_call_s:
            row["skipped"] = (f"estimated {estimate:.1f} s per call > --max-call-seconds {config.max_call_s:g}")
        else:
            try:
                if saved is None:
                    saved = saved_tensor_bytes(lambda: provider.fn(q, k, v))
                fn = mode_callable(provider, mode, q, k, v)
                timing = median_time(fn, config.device, budget_s=config.budget_s)
                row.update(median_ms=timing.median_s * 1e3, min_ms=timing.min_s * 1e3,
                           flops_per_s=flops / timing.median_s,
                           samples=timing.samples, rel_iqr=timing.rel_iqr, q1_ms=timing.q1_s * 1e3,
                           q3_ms=timing.q3_s * 1e3, noisy=timing.rel_iqr > NOISY_SPREAD,
                           saved_bytes=saved[0], saved_tensors=saved[1],
                           peak_bytes=peak_allocated_bytes(fn, config.device))
                history.record(case, provider.name, mode, flops, timing.median_s)
                del fn
            except (RuntimeError, ValueError, NotImplementedError) as exc:  # unsupported dtype, OOM, ...
                row["skipped"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        rows.append(row)
        result = row["skipped"] and f"skipped: {row['skipped']}" or f"{row['median_ms']:.3f} ms"
        _progress(config, start, done + len(rows), total, f"{case.name} {provider.label} {mode}: {result}")
    return rows


def add_speedups(rows: list[dict]) -> None:
    """Fill ``speedup_vs_flash`` = time(flash) / time(row) for rows whose case and mode flash measured."""
    flash = {(r["case"], r["mode"]): r["median_ms"] for r in rows
             if r["provider"] == "flash" and r["median_ms"] is not None}
    for r in rows:
        ref = flash.get((r["case"], r["mode"]))
        if ref is not None and r["median_ms"] is not None:
            r["speedup_vs_flash"] = ref / r["median_ms"]
