"""The environment a benchmark ran in, and this machine's dense-matmul rate (the FLOP floor's denominator)."""
from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

from .timing import median_time


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
        # Other work on the machine makes CPU timings noisy (threads get descheduled); keep the
        # 1-minute load average at the start so a reader of the file can tell.
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "flash_attn": _version("flash_attn"),
        "vicinity_attn": _version("vicinity_attn"),
        "git_commit": _git_commit(),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
    return env


def matmul_rate(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048,
                budget_s: float = 1.5) -> float:
    """Measured FLOP/s of one large square ``torch.matmul`` (2 * size^3 FLOPs) on ``device``."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    t = median_time(lambda: torch.matmul(a, b), device, budget_s=budget_s)
    return 2.0 * size ** 3 / t.median_s
