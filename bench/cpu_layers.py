"""Layer-level CPU ratios of the per-call-cost targets, forward + backward, one thread, interleaved runs.

    python -m bench.cpu_layers                  # table + bench/results/cpu-layers.json
    python -m bench.cpu_layers --json ''        # table only

(1) small layers: ``VicinityAttention(backend="torch")`` against the same layer (same projections, same
    weights) with an SDPA softmax core (``bench.backbone.SwappedCoreAttention``), at a small ViT's 8x8
    tokens (B=64, C=64, 4 heads) and VVT's last stage at 224x224 input (7x7, B=32, C=512, 8 heads);
    target: vicinity / softmax <= 1.1.
(2) VVT's clamped layer: ``VicinityVisionAttention(clip=True)`` against ``clip=False`` (same weights) at
    112x112 tokens (B=1, C=64, 1 head, sr_ratio 1); target: clip / no clip <= 1.3.

Each step is ``torch.autograd.grad`` of the layer's output with respect to its input and parameters
(no gradient accumulation timed), timed by the thread's CPU time in alternating rounds so that both
sides of a ratio see the same background load.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu-layers.json")
SMALL = {"vit-8x8": dict(batch=64, dim=64, heads=4, side=8), "vvt-7x7": dict(batch=32, dim=512, heads=8, side=7)}
CLIP = dict(batch=1, dim=64, heads=1, side=112, sr_ratio=1)
TARGETS = {"small": 1.1, "clip": 1.3}


def step(layer, x, side: int) -> Callable[[], object]:
    import torch
    params = [x, *layer.parameters()]

    def run():
        y = layer(x, side, side)
        return torch.autograd.grad(y, params, torch.ones_like(y), allow_unused=True)
    return run


def interleaved_ms(fns: dict[str, Callable[[], object]], rounds: int, inner: int) -> dict[str, float]:
    """Median thread CPU milliseconds per call of each callable over ``rounds`` alternating rounds."""
    for fn in fns.values():
        fn()
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    gc.disable()
    try:
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = time.thread_time()
                for _ in range(inner):
                    fn()
                samples[name].append((time.thread_time() - t0) / inner * 1e3)
    finally:
        gc.enable()
    return {name: statistics.median(s) for name, s in samples.items()}


def measure(rounds: int) -> dict:
    """The three ratios on one thread (the caller's thread count restored afterwards)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = _rows(rounds)
    finally:
        torch.set_num_threads(threads)
    for row in rows.values():
        row["meets_target"] = row["ratio"] <= row["target"]
    return {"torch": torch.__version__, "python": sys.version.split()[0], "threads": 1,
            "load_average": os.getloadavg()[0], "rows": rows}


def _rows(rounds: int) -> dict:
    import torch

    from bench.backbone import SwappedCoreAttention
    from vicinity_attn import VicinityAttention
    from vicinity_attn.layers import VicinityVisionAttention
    torch.manual_seed(0)
    rows = {}
    for name, s in SMALL.items():
        x = torch.randn(s["batch"], s["side"] ** 2, s["dim"], requires_grad=True)
        vicinity = VicinityAttention(s["dim"], s["heads"], backend="torch")
        softmax = SwappedCoreAttention(s["dim"], s["heads"], 1, "softmax")
        softmax.load_state_dict(vicinity.state_dict())
        ms = interleaved_ms({"vicinity": step(vicinity, x, s["side"]), "softmax": step(softmax, x, s["side"])},
                            rounds, 3)
        rows[name] = dict(s, kind="small", **{f"{k}_ms": v for k, v in ms.items()},
                          ratio=ms["vicinity"] / ms["softmax"], target=TARGETS["small"])
    c = CLIP
    x = torch.randn(c["batch"], c["side"] ** 2, c["dim"], requires_grad=True)
    clipped = VicinityVisionAttention(c["dim"], c["heads"], sr_ratio=c["sr_ratio"], clip=True, backend="torch")
    plain = VicinityVisionAttention(c["dim"], c["heads"], sr_ratio=c["sr_ratio"], clip=False, backend="torch")
    plain.load_state_dict(clipped.state_dict())
    ms = interleaved_ms({"clip": step(clipped, x, c["side"]), "no_clip": step(plain, x, c["side"])},
                        max(3, rounds // 3), 1)
    rows["vvt-clip-112x112"] = dict(c, kind="clip", **{f"{k}_ms": v for k, v in ms.items()},
                                    ratio=ms["clip"] / ms["no_clip"], target=TARGETS["clip"])
    return rows


def format_table(result: dict) -> str:
    lines = [f"CPU forward + backward of a layer, ms per step (torch {result['torch']}, one thread, interleaved)",
             f"{'case':<18} {'ours':>9} {'baseline':>9} {'ratio':>6} {'target':>7}"]
    for name, row in result["rows"].items():
        ours, base = (row["vicinity_ms"], row["softmax_ms"]) if row["kind"] == "small" else (row["clip_ms"],
                                                                                             row["no_clip_ms"])
        lines.append(f"{name:<18} {ours:>9.2f} {base:>9.2f} {row['ratio']:>6.2f} "
                     f"{'met' if row['meets_target'] else 'MISSED':>7}")
    lines.append("small rows: VicinityAttention(backend='torch') / the same layer with an SDPA core (target <= 1.1); "
                 "clip row: VicinityVisionAttention(clip=True) / clip=False (target <= 1.3)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_layers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30, help="alternating rounds per comparison (default 30)")
    parser.add_argument("--json", default=RESULTS, help="where to write the result ('' = nowhere)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    result = measure(args.rounds)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
