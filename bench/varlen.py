"""Packed batch of mixed resolutions: one ``vicinity_attention_varlen`` call against a loop of per-image calls.

    python -m bench.varlen                                     # 4 images, 3 sizes: 56x56 x2, 40x48, 28x28
    python -m bench.varlen --grids 56x56 56x56 40x48 28x28 --sr 2 --heads 2 --dim 32 --json out.json

One training step (forward + backward of a random dO) per provider, on the packed tokens [T, H, D]:
``varlen`` makes one packed call; ``loop`` slices the pack and calls ``vicinity_attention`` once per
image (layout "bnhd", batch 1), then concatenates, which is what a user without varlen writes. Both
use the same backend (``--backend``, default "auto": torch on a CPU). Median step time (the two steps
timed in alternation, bench.timing.interleaved_medians) and the peak memory a step allocates beyond
its inputs (CPU: the PyTorch profiler's allocation count, as bench.knn; GPU: max_memory_allocated).
The two results are checked to agree before timing.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import sys
from collections.abc import Callable

import torch

from vicinity_attn import vicinity_attention, vicinity_attention_varlen

from .cases import DTYPES
from .knn import cpu_peak_allocated_bytes
from .memory import peak_allocated_bytes
from .timing import interleaved_medians, timing_method

DEFAULT_GRIDS = ("56x56", "56x56", "40x48", "28x28")


def parse_grid(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.lower().split("x"))


def kv_grid_of(grid: tuple[int, ...], sr: int) -> tuple[int, ...]:
    """The key grid of a spatial-reduction conv of stride ``sr`` (VVT / PVT ``sr_ratio``)."""
    return tuple(max(1, s // sr) for s in grid)


def make_providers(grids, kv_grids, backend: str) -> dict[str, Callable]:
    nq = [math.prod(g) for g in grids]
    nk = [math.prod(g) for g in kv_grids]
    cq = [0, *itertools.accumulate(nq)]
    ck = [0, *itertools.accumulate(nk)]

    def varlen(q, k, v, cu_q, cu_k):
        return vicinity_attention_varlen(q, k, v, cu_q, cu_k, grids, kv_grids, backend=backend)

    def loop(q, k, v, cu_q, cu_k):
        outs = [vicinity_attention(q[cq[i]:cq[i + 1]][None], k[ck[i]:ck[i + 1]][None], v[ck[i]:ck[i + 1]][None],
                                   grids[i], kv_grids[i], layout="bnhd", backend=backend)[0]
                for i in range(len(grids))]
        return torch.cat(outs)
    return {"varlen": varlen, "loop": loop}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grids", nargs="+", default=list(DEFAULT_GRIDS), help="one HxW (or N, or DxHxW) per image")
    parser.add_argument("--sr", type=int, default=1, help="key grid = grid // sr per axis (VVT sr_ratio)")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=32, help="head dim (q, k and v)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget", type=float, default=10.0, help="seconds of timing")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    grids = [parse_grid(g) for g in args.grids]
    kv_grids = [kv_grid_of(g, args.sr) for g in grids]
    H, D = args.heads, args.dim
    nq = [math.prod(g) for g in grids]
    nk = [math.prod(g) for g in kv_grids]
    gen = torch.Generator().manual_seed(0)

    def rand(n, d):
        return torch.randn(n, H, d, generator=gen).to(device, dtype).requires_grad_(True)
    q, k, v = rand(sum(nq), D), rand(sum(nk), D), rand(sum(nk), D)
    do = torch.randn(sum(nq), H, D, generator=gen).to(device, dtype)
    cu_q = torch.tensor([0, *itertools.accumulate(nq)], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *itertools.accumulate(nk)], dtype=torch.int32, device=device)
    providers = make_providers(grids, kv_grids, args.backend)

    with torch.no_grad():
        outs = {name: fn(q, k, v, cu_q, cu_k) for name, fn in providers.items()}
    diff = (outs["varlen"].double() - outs["loop"].double()).abs().max().item()
    scale = outs["loop"].double().abs().max().item()
    print(f"max |varlen - loop| / max |loop| = {diff / scale:.2e}")

    def step_of(fn):
        def step():
            for t in (q, k, v):
                t.grad = None
            fn(q, k, v, cu_q, cu_k).backward(do)
        return step
    steps = {name: step_of(fn) for name, fn in providers.items()}
    peaks = {}
    for name, step in steps.items():
        step()   # warm-up: lazy initialisation is not the step's memory
        peaks[name] = (peak_allocated_bytes(step, device) if device.type == "cuda" else cpu_peak_allocated_bytes(step))
    times = interleaved_medians(steps, device, budget_s=args.budget)
    desc = " + ".join(f"{'x'.join(map(str, g))}" + (f" (kv {'x'.join(map(str, kg))})" if args.sr > 1 else "")
                      for g, kg in zip(grids, kv_grids))
    print(f"pack: {desc}; H{H} D{D} {args.dtype}, backend {args.backend}, device {device}; "
          f"Tq = {sum(nq)}, Tk = {sum(nk)}")
    print(f"{'provider':<8} {'step ms':>9} {'IQR':>5} {'samples':>7} {'peak MiB':>9}")
    rows = []
    for name in steps:
        t = times[name]
        print(f"{name:<8} {t.median_s * 1e3:>9.2f} {t.rel_iqr:>5.2f} {t.samples:>7} {peaks[name] / 2**20:>9.2f}")
        rows.append(dict(provider=name, median_s=t.median_s, min_s=t.min_s, rel_iqr=t.rel_iqr, samples=t.samples,
                         peak_bytes=peaks[name]))
    ratio = times["varlen"].median_s / times["loop"].median_s
    print(f"varlen / loop: time {ratio:.2f}, peak {peaks['varlen'] / peaks['loop']:.2f}")
    if args.json:
        env = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                   threads=torch.get_num_threads(), cpu_count=os.cpu_count(), device=str(device),
                   timing=timing_method(device),
                   command="python -m bench.varlen " + " ".join(sys.argv[1:] if argv is None else argv))
        with open(args.json, "w") as fh:
            json.dump(dict(env=env, grids=grids, kv_grids=kv_grids, heads=H, dim=D, dtype=args.dtype,
                           backend=args.backend, max_rel_diff=diff / scale, rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
