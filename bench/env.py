"""The environment a benchmark ran in, and this machine's dense-matmul rate (the FLOP floor's denominator)."""
from __future__ import annotations

import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from vicinity_attn.vicinity.cpu_threads import machine_busy_seconds as _busy_cpu_seconds
from vicinity_attn.vicinity.cpu_threads import own_cpu_seconds as _own_cpu_seconds

from .timing import Timing, median_time


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # not installed, or fails to load its extension: report as absent
        return None
    return getattr(mod, "__version__", "unknown")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(device: torch.device) -> dict:
    """Device, versions, threads, CPU model, date: everything needed to read a result file later."""
    env = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "gpu_measured": device.type == "cuda",
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # For the record only: the load average counts the benchmark's own threads too, so the
        # warnings use OtherCpuUse, measured over the run, instead.
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "flash_attn": _version("flash_attn"),
        "vicinity_attn": _version("vicinity_attn"),
        "git_commit": _git_commit(),
        # Allocator settings change CPU timings a lot (page faults of fresh buffers; see README).
        "allocator_env": {k: v for k, v in os.environ.items()
                          if k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD", "THP_MEM_ALLOC_ENABLE")},
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
    return env


class OtherCpuUse:
    """Measures how many cores other processes kept busy while the ``with`` block ran.

    The busy time of the whole machine (from /proc/stat, including time stolen by a hypervisor)
    minus this process's own CPU time, over the wall time: unlike the load average, it does not count
    the benchmark itself. ``cores`` is None where /proc/stat is unavailable."""

    WARN_CORES = 0.25

    def __init__(self) -> None:
        self.cores: float | None = None

    def __enter__(self) -> OtherCpuUse:
        self._start = (_busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter())
        return self

    def __exit__(self, *exc) -> None:
        busy0, own0, wall0 = self._start
        busy1, own1, wall1 = _busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
        if busy0 is not None and busy1 is not None and wall1 > wall0:
            self.cores = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0)

    def warning(self) -> str | None:
        """A warning line when other work shared the cores enough to disturb CPU timings."""
        if self.cores is None or self.cores <= self.WARN_CORES:
            return None
        return (f"WARNING: other processes kept {self.cores:.2f} CPU cores busy on average during this run: "
                "the timings are disturbed; rerun on an idle machine.")


def matmul_timing(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048,
                  budget_s: float = 1.5) -> Timing:
    """Timing of one large square ``torch.matmul`` (2 * size^3 FLOPs) on ``device``."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    return median_time(lambda: torch.matmul(a, b), device, budget_s=budget_s)


def matmul_rate(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048,
                budget_s: float = 1.5) -> float:
    """Measured FLOP/s (median) of one large square ``torch.matmul`` on ``device``."""
    return 2.0 * size ** 3 / matmul_timing(device, dtype, size, budget_s).median_s
