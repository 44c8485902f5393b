"""The command line: ``python -m bench [options]`` (``--help`` for everything)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

from vicinity_attn.positions import VARIANTS

from .cases import DTYPES, PRESETS, build_cases, parse_grids
from .env import OtherCpuUse, environment, matmul_rate
from .flops import FLOP_FORMULA_TEXT, MODES
from .providers import DEFAULT_PROVIDERS, PROVIDERS, default_providers
from .report import format_table, write_json, write_plot
from .runner import SweepConfig, run_sweep
from .timing import timing_method

EPILOG = f"""
providers: vicinity (best backend for the device: triton on a GPU, torch elsewhere), vicinity-torch,
  authors (the released code's 4x-expanded formulation), flash (flash_attn if it imports, else SDPA
  restricted to FLASH_ATTENTION; on a CPU PyTorch's flash-style CPU kernel), sdpa-math (quadratic, optional).
modes: fwd (training forward: inputs require grad), bwd (backward only, through a retained graph),
  fwdbwd (both).
presets: square (grids 14x14 ... 224x224, B=1 H=4 D=64), vvt (the four VVT stage shapes),
  quick (28x28, 56x56, 112x112; 0.3 s timing budget per row; under two minutes on an idle 2-core CPU).
dtype: fp32 on a CPU, bf16 on a GPU by default (FlashAttention needs fp16/bf16 on a GPU).
{FLOP_FORMULA_TEXT}
Timing: {timing_method(torch.device('cuda'))}; {timing_method(torch.device('cpu'))}.
A provider whose single call is estimated (from its time at the previous size, or from the machine's
matmul rate) to exceed --max-call-seconds, or whose working memory is estimated over half the free
memory, is skipped with the reason printed.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description="Benchmark vicinity attention against "
                                "FlashAttention: time, FLOP/s, saved-for-backward bytes, peak memory.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="square", help="which set of shapes (default: square)")
    p.add_argument("--quick", action="store_true", help="shorthand for --preset quick")
    p.add_argument("--target-check", action="store_true",
                   help="measure the issue-4 targets of the torch backend (fp32, B=1 H=4 D=64, 112x112) and exit")
    p.add_argument("--grids", help="square sides '14,28,56' or grids '56x56,32x64' (overrides the preset)")
    p.add_argument("--batch", type=int, help="batch size B (default 1)")
    p.add_argument("--heads", type=int, help="heads H (default 4; the vvt preset uses its own)")
    p.add_argument("--dim", type=int, help="head dim D (default 64; the vvt preset uses its own)")
    p.add_argument("--dim-v", type=int, help="value head dim Dv (default D)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp32 on a CPU, bf16 on a GPU")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--providers", help=f"comma-separated, from {','.join(PROVIDERS)} "
                   f"(default {','.join(DEFAULT_PROVIDERS)}; vicinity-torch only where vicinity is not torch)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, from fwd,bwd,fwdbwd (default all)")
    p.add_argument("--variant", default="sum", choices=VARIANTS, help="vicinity variant")
    p.add_argument("--max-call-seconds", type=float, help="skip calls estimated longer (default 10; quick 4)")
    p.add_argument("--budget-seconds", type=float, help="CPU timing budget per row (default 1; quick 0.3)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", help="JSON result path (default bench_results/<preset>-<device>.json; '' = none)")
    p.add_argument("--plot", help="PNG plot path (default: the JSON path with .png; '' = none)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def _split(text: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise SystemExit(f"error: --{what} must be a comma-separated subset of {','.join(allowed)}, got {text!r}")
    return items


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark the arguments describe; print the table; write JSON and plot. Returns 0."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.target_check:
        from .targets import run_targets
        return run_targets(device=args.device, out=args.out, progress=not args.quiet)
    preset = "quick" if args.quick else args.preset
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but no CUDA device is available on this machine")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    providers = _split(args.providers or ",".join(default_providers(device)), PROVIDERS, "providers")
    modes = _split(args.modes, MODES, "modes")
    cases = build_cases(preset, grids=parse_grids(args.grids) if args.grids else None, batch=args.batch,
                        heads=args.heads, dim=args.dim, dim_v=args.dim_v)
    quick = preset == "quick"
    rate = matmul_rate(device, dtype if dtype != torch.bfloat16 or device.type == "cuda" else torch.float32,
                       size=2048, budget_s=0.3) if device.type == "cpu" else None
    config = SweepConfig(device=device, dtype=dtype, providers=providers, modes=modes, variant=args.variant,
                         max_call_s=args.max_call_seconds or (4.0 if quick else 10.0),
                         budget_s=args.budget_seconds or (0.3 if quick else 1.0),
                         matmul_flops_per_s=rate, progress=not args.quiet)
    env = environment(device)
    if device.type != "cuda":
        print("note: running on a CPU: no GPU timings are measured; 'flash' is PyTorch's FlashAttention-style "
              "CPU kernel and 'vicinity' is the torch backend.", file=sys.stderr)
    with OtherCpuUse() as other:
        rows = run_sweep(cases, config)
    env.update(other_processes_cpu_cores=other.cores, other_processes_cpu_warning=other.warning())
    print(format_table(rows, env))
    out = args.out if args.out is not None else f"bench_results/{preset}-{device.type}.json"
    extra = {"preset": preset, "timing_method": timing_method(device),
             "matmul_flops_per_s": rate, "argv": list(sys.argv[1:] if argv is None else argv)}
    if out:
        print(f"wrote {write_json(out, rows, env, extra)}")
    plot = args.plot if args.plot is not None else (out[:-5] + ".png" if out.endswith(".json") else "")
    if plot:
        result = write_plot(plot, rows, env)
        print(f"wrote {result}" if not isinstance(result, str) else f"plot: {result}")
    return 0
