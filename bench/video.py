"""Video: frame-causal vicinity attention over a clip, and streaming it frame by frame with the state cache.

    python -m bench.video                          # clip: B1 H8 16x32x32 D64 (the issue's video shape), fwd+bwd
    python -m bench.video --grid 8x16x16 --sdpa    # + SDPA with a block-causal mask (N x N: small clips only)
    python -m bench.video --stream                 # 256 frames of 16x16 tokens, one step per frame
    python -m bench.video --stream --json bench/results/video-stream-cpu.json

Clip: one training step (forward + backward of a random dO) of ``vicinity_attention(..., causal="frames")``
against the same call bidirectional, and (``--sdpa``) against ``scaled_dot_product_attention`` with a boolean
block-causal mask (the softmax model of the same structure, N x N scores); median step time (the providers
timed in alternation, bench.timing.interleaved_medians) and the peak memory a step allocates beyond its
inputs. The GPU side of the clip shape is modelled, not measured, in ``python -m bench.gpu_model``.

Stream: a :class:`vicinity_attn.FrameCache` over ``--frames`` frames; each frame is one ``step`` (q, k, v
of one frame, under ``torch.inference_mode``), timed alone. Reports the median step time over 32 frames after
8 warm-up frames and over the last 32, their ratio (1 = flat), a least-squares slope of time against the
frame index (warm-up frames left out), the
cache's bytes (constant by construction: F x D x Dv + F x D floats per head) and the peak memory a step
allocates at the first, middle and last frame. Measured on this machine's CPU unless ``--device cuda``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

from vicinity_attn import FrameCache, vicinity_attention

from .cases import DTYPES
from .knn import cpu_peak_allocated_bytes
from .memory import peak_allocated_bytes
from .timing import interleaved_medians, timing_method


def parse_grid(text: str) -> tuple[int, ...]:
    grid = tuple(int(s) for s in text.lower().split("x"))
    if len(grid) not in (2, 3) or min(grid) < 1:
        raise argparse.ArgumentTypeError(f"a grid is TxHxW or TxN, got {text!r}")
    return grid


def block_causal_mask(grid: tuple[int, ...], device) -> torch.Tensor:
    """[N, N] bool, True where query i may attend to key j: frame(j) <= frame(i)."""
    frame = torch.arange(grid[0], device=device).repeat_interleave(math.prod(grid[1:]))
    return frame[None, :] <= frame[:, None]


def _peak(step, device) -> int:
    step()   # warm-up: lazy initialisation is not the step's memory
    return peak_allocated_bytes(step, device) if device.type == "cuda" else cpu_peak_allocated_bytes(step)


def clip(args, device, dtype) -> dict:
    grid, B, H, D = args.grid, args.batch, args.heads, args.dim
    N = math.prod(grid)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=gen).to(device, dtype).requires_grad_(True) for _ in range(3))
    do = torch.randn(B, H, N, D, generator=gen).to(device, dtype)
    providers = {
        "causal": lambda: vicinity_attention(q, k, v, grid, causal="frames", backend=args.backend),
        "bidirectional": lambda: vicinity_attention(q, k, v, grid, backend=args.backend),
    }
    if args.sdpa:
        mask = block_causal_mask(grid, device)
        providers["sdpa-block-causal"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v,
                                                                                                  attn_mask=mask)

    def step_of(fn):
        def step():
            torch.autograd.grad(fn(), (q, k, v), do)
        return step
    steps = {name: step_of(fn) for name, fn in providers.items()}
    peaks = {name: _peak(step, device) for name, step in steps.items()}
    times = interleaved_medians(steps, device, budget_s=args.budget)
    print(f"clip {'x'.join(map(str, grid))} B{B} H{H} D{D} {args.dtype}, backend {args.backend}, device {device}: "
          f"forward + backward")
    print(f"{'provider':<18} {'step ms':>9} {'IQR':>5} {'samples':>7} {'peak MiB':>9}")
    rows = []
    for name in steps:
        t = times[name]
        print(f"{name:<18} {t.median_s * 1e3:>9.1f} {t.rel_iqr:>5.2f} {t.samples:>7} {peaks[name] / 2**20:>9.1f}")
        rows.append(dict(provider=name, median_s=t.median_s, rel_iqr=t.rel_iqr, samples=t.samples,
                         peak_bytes=peaks[name]))
    ratio = times["causal"].median_s / times["bidirectional"].median_s
    print(f"causal / bidirectional: time {ratio:.2f}, peak {peaks['causal'] / peaks['bidirectional']:.2f}")
    return dict(kind="clip", grid=grid, batch=B, heads=H, dim=D, rows=rows, causal_over_bidirectional=ratio)


def stream(args, device, dtype) -> dict:
    frames, frame_grid, B, H, D = args.frames, args.frame_grid, args.batch, args.heads, args.dim
    per = math.prod(frame_grid)
    cache = FrameCache((frames, *frame_grid), backend=args.backend)
    gen = torch.Generator().manual_seed(0)
    inputs = [tuple(torch.randn(B, H, per, D, generator=gen).to(device, dtype) for _ in range(3))
              for _ in range(8)]    # 8 frames of inputs, reused round-robin: the stream's index still advances
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, snapshots = [], {}
    probe = (1, frames // 2, frames - 1)
    with torch.inference_mode():
        for f in range(frames):
            q, k, v = inputs[f % len(inputs)]
            if f in probe:   # the cache before this step: its memory is measured after the timed stream
                snapshots[f] = (cache.frame, cache.states, cache._shape)
            sync()
            t0 = time.perf_counter()
            cache.step(q, k, v)
            sync()
            times.append(time.perf_counter() - t0)
        peaks = {}
        for f, (frame, states, shape) in snapshots.items():
            q, k, v = inputs[f % len(inputs)]
            again = FrameCache((frames, *frame_grid), backend=args.backend)
            again.frame, again.states, again._shape = frame, states, shape
            step = lambda: again.step(q, k, v)  # noqa: E731
            peaks[f] = peak_allocated_bytes(step, device) if device.type == "cuda" else cpu_peak_allocated_bytes(step)
    warm = min(8, frames // 8)        # first steps: lazy initialisation, caches warming up
    window = min(32, frames // 4)
    first, last = statistics.median(times[warm:warm + window]), statistics.median(times[-window:])
    xs = range(warm, frames)
    mean_x, mean_t = statistics.fmean(xs), statistics.fmean(times[warm:])
    slope = sum((x - mean_x) * (t - mean_t) for x, t in zip(xs, times[warm:])) / sum((x - mean_x) ** 2 for x in xs)
    state_bytes = sum(t.numel() * t.element_size() for t in cache.states)
    print(f"stream: {frames} frames of {'x'.join(map(str, frame_grid))} tokens, B{B} H{H} D{D} {args.dtype}, "
          f"backend {args.backend}, device {device}")
    print(f"step ms: median of frames {warm}-{warm + window - 1} {first * 1e3:.2f}, "
          f"of the last {window} {last * 1e3:.2f} "
          f"(last / first {last / first:.2f}); slope {slope * 1e6:+.3f} us per frame index")
    print(f"cache: {state_bytes / 2**10:.1f} KiB (constant); step peak MiB at frames "
          + ", ".join(f"{f}: {b / 2**20:.2f}" for f, b in sorted(peaks.items())))
    return dict(kind="stream", frames=frames, frame_grid=frame_grid, batch=B, heads=H, dim=D,
                step_s=times, first_median_s=first, last_median_s=last, last_over_first=last / first,
                slope_s_per_frame=slope, cache_bytes=state_bytes, step_peak_bytes={str(f): b for f, b in peaks.items()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stream", action="store_true", help="stream frames through a FrameCache")
    parser.add_argument("--grid", type=parse_grid, default=(16, 32, 32), help="clip grid TxHxW (default 16x32x32)")
    parser.add_argument("--frames", type=int, default=256, help="stream length (default 256)")
    parser.add_argument("--frame-grid", type=lambda s: tuple(int(x) for x in s.split("x")), default=(16, 16),
                        help="stream: tokens of one frame, HxW (default 16x16)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64, help="head dim (q, k and v)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--sdpa", action="store_true", help="clip: add SDPA with a block-causal mask (N x N)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget", type=float, default=10.0, help="clip: seconds of timing")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.frames < 8:
        parser.error("--frames must be at least 8")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    result = stream(args, device, dtype) if args.stream else clip(args, device, dtype)
    if args.json:
        env = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                   threads=torch.get_num_threads(), cpu_count=os.cpu_count(), device=str(device),
                   timing=timing_method(device) if not args.stream else "one perf_counter interval per step",
                   command="python -m bench.video " + " ".join(sys.argv[1:] if argv is None else argv))
        with open(args.json, "w") as fh:
            json.dump(dict(env=env, dtype=args.dtype, backend=args.backend, **result), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
