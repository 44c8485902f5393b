"""The CPU performance targets of the torch backend, all measured in one run (``python -m bench --target-check``
or ``python -m bench.targets``).

Shape: fp32, B=1, H=4, D=64, 112x112 grid, on this machine's CPU. Targets:

(a) forward + backward at least 3x faster than ``authors`` and at least 25x faster than ``flash``
    (SDPA's FlashAttention-style CPU kernel);
(b) training forward within 2x of the FLOP floor = forward FLOPs (4*N*F*D*Dv*B*H) / the machine's
    measured fp32 rate of one large ``torch.matmul``;
(c) saved-for-backward bytes at most 1.1x SDPA's;
(d) time of forward + backward growing no faster than N^1.05 from 28x28 to 224x224 (least-squares
    slope of log time against log N over 28, 56, 112, 224).

The machine is shared and noisy: the figures that matter are ratios taken within this one run.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from .cases import Case
from .env import OtherCpuUse, environment, matmul_timing
from .flops import mode_flops
from .memory import page_faults_per_call, saved_tensor_bytes
from .providers import make_inputs, make_provider
from .report import fit_exponent, write_json
from .runner import mode_callable
from .timing import interleaved_medians, median_time

TARGET_CASE = Case((112, 112), batch=1, heads=4, dim=64, dim_v=64)
SCALING_SIDES = (28, 56, 112, 224)


def _callable(name: str, case: Case, mode: str, device: torch.device):
    """The timed callable of ``mode`` for provider ``name`` at ``case`` (fp32)."""
    provider = make_provider(name, case, device, torch.float32)
    if isinstance(provider, str):
        raise RuntimeError(f"{name} cannot run: {provider}")
    q, k, v = make_inputs(provider, case, device, torch.float32, requires_grad=True)
    return mode_callable(provider, mode, q, k, v)


def _saved(name: str, case: Case, device: torch.device) -> int:
    provider = make_provider(name, case, device, torch.float32)
    q, k, v = make_inputs(provider, case, device, torch.float32, requires_grad=True)
    return saved_tensor_bytes(lambda: provider.fn(q, k, v))[0]


def measure_targets(device: torch.device, *, budget_s: float = 2.0, progress: bool = True) -> dict:
    """Measure every target figure; returns a dict of numbers, verdicts and the text lines printed."""
    def say(text: str) -> None:
        if progress:
            print(f"  measuring {text} ...", file=sys.stderr, flush=True)

    case = TARGET_CASE
    torch_provider = make_provider("vicinity-torch", case, device, torch.float32)
    fwd_flops = torch_provider.forward_flops
    # The FLOP floor: the machine's fp32 matmul rate measured just before and just after the forward
    # (the higher of the two: the floor must not be flattered by a slow moment). The forward is timed
    # on its own: interleaving it with a 4096^3 matmul was seen to slow it by 10-30%.
    say("fp32 matmul rate (4096^3), torch backend forward, matmul rate again")
    size = 4096
    t_mm_before = matmul_timing(device, size=size, budget_s=budget_s)
    fwd_fn = _callable("vicinity-torch", case, "fwd", device)
    tm_fwd = median_time(fwd_fn, device, budget_s=2 * budget_s)
    faults_fwd = page_faults_per_call(fwd_fn) if device.type == "cpu" else None
    del fwd_fn
    t_mm_after = matmul_timing(device, size=size, budget_s=budget_s)
    rate = 2.0 * size ** 3 / min(t_mm_before.median_s, t_mm_after.median_s)
    t_fwd = tm_fwd.median_s
    # Ratios of the fastest samples: a second opinion that load spikes disturb less than medians.
    best = {"b": tm_fwd.min_s * (2.0 * size ** 3) / min(t_mm_before.min_s, t_mm_after.min_s) / fwd_flops}
    # Each speed comparison is timed interleaved (A, B, A, B, ...) so that both sides see the same load.
    say("torch backend against authors, fwdbwd at 112x112, interleaved")
    ta = interleaved_medians({"torch": _callable("vicinity-torch", case, "fwdbwd", device),
                              "authors": _callable("authors", case, "fwdbwd", device)}, device,
                             budget_s=2 * budget_s, min_rounds=5)
    t_fb, t_auth = ta["torch"].median_s, ta["authors"].median_s
    best["a1"] = ta["authors"].min_s / ta["torch"].min_s
    say("torch backend against flash (SDPA), fwdbwd at 112x112, interleaved; seconds per flash call")
    tf = interleaved_medians({"torch": _callable("vicinity-torch", case, "fwdbwd", device),
                              "flash": _callable("flash", case, "fwdbwd", device)}, device, budget_s=budget_s)
    t_fb_f, t_flash = tf["torch"].median_s, tf["flash"].median_s
    best["a2"] = tf["flash"].min_s / tf["torch"].min_s
    say("saved-for-backward bytes")
    saved_torch = _saved("vicinity-torch", case, device)
    saved_flash = _saved("flash", case, device)
    times, fastest = [], []
    for side in SCALING_SIDES:
        say(f"torch backend fwdbwd at {side}x{side}")
        c = Case((side, side), case.batch, case.heads, case.dim, case.dim_v)
        tm = median_time(_callable("vicinity-torch", c, "fwdbwd", device), device, budget_s=budget_s)
        times.append(tm.median_s)
        fastest.append(tm.min_s)
    ns = [s * s for s in SCALING_SIDES]
    exponent = fit_exponent(ns, times)
    best["d"] = fit_exponent(ns, fastest)
    floor_s = fwd_flops / rate

    checks = [
        ("a1", "fwd+bwd speedup vs authors", t_auth / t_fb, ">=", 3.0,
         f"torch {t_fb * 1e3:.1f} ms, authors {t_auth * 1e3:.1f} ms"),
        ("a2", "fwd+bwd speedup vs flash (sdpa-cpu)", t_flash / t_fb_f, ">=", 25.0,
         f"torch {t_fb_f * 1e3:.1f} ms, flash {t_flash * 1e3:.1f} ms"),
        ("b", "forward time / FLOP floor", t_fwd / floor_s, "<=", 2.0,
         f"forward {t_fwd * 1e3:.2f} ms ({fwd_flops / t_fwd / 1e9:.1f} GFLOP/s) vs floor {floor_s * 1e3:.2f} ms = "
         f"{fwd_flops / 1e9:.2f} GFLOP / {rate / 1e9:.1f} GFLOP/s measured fp32 matmul (4096^3)"
         + (f"; {faults_fwd:.0f} minor page faults per forward call" if faults_fwd is not None else "")),
        ("c", "saved-for-backward bytes / SDPA's", saved_torch / saved_flash, "<=", 1.1,
         f"torch {saved_torch / 2**20:.2f} MiB, sdpa {saved_flash / 2**20:.2f} MiB"),
        ("d", "fitted exponent of fwd+bwd time vs N (28x28..224x224)", exponent, "<=", 1.05,
         "times " + ", ".join(f"{s}x{s}: {t * 1e3:.1f} ms" for s, t in zip(SCALING_SIDES, times))),
    ]
    results = []
    for key, what, value, op, bound, detail in checks:
        ok = value >= bound if op == ">=" else value <= bound
        results.append({"target": key, "what": what, "value": value, "op": op, "bound": bound,
                        "pass": ok, "detail": detail, "value_from_fastest_samples": best.get(key)})
    return {
        "case": case.to_dict(), "dtype": "float32",
        "matmul_flops_per_s": rate, "forward_flops": fwd_flops, "floor_ms": floor_s * 1e3,
        "fwdbwd_flops": mode_flops(fwd_flops, "linear", "fwdbwd"),
        "torch_fwd_ms": t_fwd * 1e3, "torch_fwd_page_faults_per_call": faults_fwd, "torch_fwdbwd_ms": t_fb * 1e3,
        "authors_fwdbwd_ms": t_auth * 1e3, "flash_fwdbwd_ms": t_flash * 1e3,
        "torch_fwdbwd_ms_beside_flash": t_fb_f * 1e3,
        "saved_bytes_torch": saved_torch, "saved_bytes_flash": saved_flash,
        "scaling": {"n": ns, "fwdbwd_ms": [t * 1e3 for t in times], "exponent": exponent},
        "targets": results,
    }


def format_targets(result: dict, env: dict) -> str:
    """The PASS/FAIL lines, one per target, with the numbers behind each."""
    lines = [f"Target check, torch backend, fp32, B=1 H=4 D=64, 112x112 grid, on {env['device_name']} "
             f"({env['torch_threads']} threads; CPU timings, no GPU measured)" if not env.get("gpu_measured")
             else f"Target check on {env['device_name']}"]
    if not env.get("gpu_measured") and env.get("other_processes_cpu_warning"):
        lines.append("  " + env["other_processes_cpu_warning"])
    if env.get("allocator_env"):
        lines.append("  allocator settings: " + " ".join(f"{k}={v}" for k, v in env["allocator_env"].items()))
    for r in result["targets"]:
        verdict = "PASS" if r["pass"] else "FAIL"
        lines.append(f"  [{verdict}] ({r['target']}) {r['what']}: {r['value']:.3f} (target {r['op']} {r['bound']:g})")
        lines.append(f"         {r['detail']}")
        if r.get("value_from_fastest_samples") is not None:
            lines.append(f"         (same figure from the fastest samples instead of medians: "
                         f"{r['value_from_fastest_samples']:.3f})")
    return "\n".join(lines)


def run_targets(device: str | None = None, threads: int | None = None, out: str | None = None,
                progress: bool = True) -> int:
    """Measure and print the targets; write JSON to ``out`` (default bench_results/targets-<device>.json).
    Returns 0 when every target passes, 1 otherwise."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device or "cpu")
    env = environment(dev)
    with OtherCpuUse() as other:
        result = measure_targets(dev, progress=progress)
    env.update(other_processes_cpu_cores=other.cores, other_processes_cpu_warning=other.warning())
    print(format_targets(result, env))
    path = out if out is not None else f"bench_results/targets-{dev.type}.json"
    if path:
        print(f"wrote {write_json(path, [], env, {'target_check': result})}")
    return 0 if all(r["pass"] for r in result["targets"]) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.targets [--device cpu] [--threads N] [--out PATH]``."""
    p = argparse.ArgumentParser(prog="python -m bench.targets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="the targets are stated for the CPU (default cpu)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--out", help="JSON path (default bench_results/targets-<device>.json; '' = none)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    return run_targets(args.device, args.threads, args.out, progress=not args.quiet)


if __name__ == "__main__":
    sys.exit(main())
