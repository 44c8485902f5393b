"""Memory figures: saved-for-backward bytes (every device), peak allocated memory (GPU), budgets."""
from __future__ import annotations

import os
from collections.abc import Callable

import torch


def saved_tensor_bytes(forward: Callable[[], object]) -> tuple[int, int]:
    """Bytes autograd keeps for the backward of ``forward()``, and how many tensors it saved.

    Counts every tensor packed through ``torch.autograd.graph.saved_tensors_hooks`` (that includes
    ``ctx.save_for_backward`` of custom Functions), each underlying storage once: the inputs q, k, v
    are usually saved by several nodes and must not be counted twice. Tensors a custom Function
    stashes as plain ``ctx`` attributes bypass the hooks and are not seen.
    """
    storages: dict[tuple, int] = {}
    count = 0

    def pack(t: torch.Tensor):
        nonlocal count
        count += 1
        try:
            st = t.untyped_storage()
            storages[(t.device.type, st.data_ptr())] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some wrappers)
            storages[("id", id(t))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(storages.values()), count


def peak_allocated_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak GPU memory allocated during one ``fn()`` beyond what was allocated before it; None on a CPU
    (PyTorch keeps no allocation statistics for CPU tensors)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return peak - before


def memory_budget_bytes(device: torch.device) -> float:
    """Working memory a single benchmark call may use: half of the free memory of ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.5 * free
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return 0.5 * int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def page_faults_per_call(fn: Callable[[], object], calls: int = 3) -> float | None:
    """Minor page faults per ``fn()`` of this process (None where getrusage is unavailable).

    A large count means every call gets fresh pages from the OS: glibc hands big freed buffers back
    (munmap / trim) and the next call faults them in again, zero-filled, which can cost as much
    as the arithmetic. Run after a warm-up.
    """
    try:
        import resource
    except ImportError:
        return None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls
