"""The command line: ``python -m bench [options]`` (``--help`` for everything)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import torch

from vicinity_attn.common.positions import VARIANTS

from .backbone import (
    ATTENTIONS,
    DEPTHS,
    EMBED_DIMS,
    MLP_RATIOS,
    NUM_HEADS,
    SR_RATIO,
    format_model_table,
    growth_exponent,
    run_model_sweep,
    write_model_plot,
)
from .backbone import RESOLUTIONS as MODEL_RESOLUTIONS
from .cases import DTYPES, PRESETS, build_cases, parse_grids
from .env import OtherCpuUse, environment, matmul_rate
from .flops import FLOP_FORMULA_TEXT, MODES
from .providers import DEFAULT_PROVIDERS, PROVIDERS, default_providers
from .report import NOISY_SPREAD, format_table, write_json, write_plot
from .runner import SweepConfig, run_sweep
from .timing import timing_method

# How long `--quick` takes; the README says the same.
QUICK_RUN_TIME = "1-2 minutes on an idle 2-core CPU"

EPILOG = f"""
providers: vicinity (the best backend for the device: the Triton kernels on a GPU, the pure-PyTorch
  backend elsewhere), vicinity-torch (the pure-PyTorch backend), authors (the released VVT code's
  formulation with 4x-expanded features), flash (flash_attn if it imports, else PyTorch SDPA restricted
  to its FlashAttention kernel; on a CPU that is PyTorch's flash-style CPU kernel, labelled
  'sdpa-cpu (flash-style)'), sdpa-math (SDPA's quadratic math kernel; optional).
modes: fwd (training forward: inputs require grad), bwd (backward only, through a retained graph),
  fwdbwd (both).
presets: square (grids 14x14 ... 224x224, B=1 H=4 D=64), vvt (the four VVT stage shapes),
  quick (28x28, 56x56, 112x112, B=1 H=4 D=64; every cell is measured):
  {QUICK_RUN_TIME}.
dtype: fp32 on a CPU, bf16 on a GPU by default (FlashAttention needs fp16/bf16 on a GPU).
{FLOP_FORMULA_TEXT}
Timing: {timing_method(torch.device('cuda'))}; {timing_method(torch.device('cpu'))}.
Rows whose spread (interquartile range / median) exceeds {100 * NOISY_SPREAD:.0f}% are flagged as noisy.
A provider whose single call is estimated (from its time at the previous size, or from the machine's
matmul rate) to exceed --max-call-seconds, or whose working memory is estimated over half the free
memory, is skipped with the reason in the table.
--model: one training step (forward, loss, backward, AdamW) of a VVT-tiny-shaped backbone (4 stages,
  dims 96/160/320/512, heads 1/2/5/8, key/value reduction 2) with vicinity, softmax (SDPA) or the
  authors' attention, at input resolutions 224x224 and up; step time and peak memory, each point in
  its own process; a resolution is skipped once its step is estimated over --max-step-seconds.
"""


class _Parser(argparse.ArgumentParser):
    """Errors as one line (no usage dump), pointing at --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _grids_arg(text: str) -> list[tuple[int, ...]]:
    try:
        return parse_grids(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def _resolutions_arg(text: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    bad = [r for r in values if r <= 0 or r % 32]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"resolutions must be positive multiples of 32, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m bench", description="Benchmark vicinity attention against FlashAttention-"
                "style softmax attention and the authors' formulation: time, FLOP/s, saved-for-backward bytes, "
                "peak memory; or, with --model, a whole backbone's training step against input resolution.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="square", help="which set of shapes (default: square)")
    p.add_argument("--quick", action="store_true", help=f"shorthand for --preset quick ({QUICK_RUN_TIME})")
    p.add_argument("--target-check", action="store_true",
                   help="check the torch backend's CPU performance targets (speed against authors and flash, "
                   "distance to the FLOP floor, saved bytes, growth in N; fp32, B=1 H=4 D=64, 112x112) and exit")
    p.add_argument("--host", action="store_true",
                   help="measure the host time of eager GPU calls on this CPU (python -m bench.host: launches "
                        "stubbed after Triton's binding) and exit; other arguments go to bench.host")
    p.add_argument("--model", action="store_true",
                   help="time a training step of a VVT-tiny-shaped backbone against input resolution (see below)")
    p.add_argument("--grids", type=_grids_arg,
                   help="square sides '14,28,56' or grids '56x56,32x64' (overrides the preset)")
    p.add_argument("--batch", type=_positive(int), help="batch size B (default 1)")
    p.add_argument("--heads", type=_positive(int), help="heads H (default 4; the vvt preset uses its own)")
    p.add_argument("--dim", type=_positive(int), help="head dim D (default 64; the vvt preset uses its own)")
    p.add_argument("--dim-v", type=_positive(int), help="value head dim Dv (default D)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp32 on a CPU, bf16 on a GPU")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--providers", help=f"comma-separated, from {','.join(PROVIDERS)} "
                   f"(default {','.join(DEFAULT_PROVIDERS)}; vicinity-torch only where vicinity is not torch)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, from fwd,bwd,fwdbwd (default all)")
    p.add_argument("--variant", default="sum", choices=VARIANTS, help="vicinity variant")
    p.add_argument("--max-call-seconds", type=_positive(float),
                   help="skip calls estimated longer (default 10; quick: 120, so that all its cells are measured)")
    p.add_argument("--budget-seconds", type=_positive(float), help="CPU timing budget per row (default 1; quick 0.3)")
    p.add_argument("--threads", type=_positive(int),
                   help="torch.set_num_threads, also in --model's workers (default: torch's choice; the "
                        "torch backend uses fewer threads for small calls and when other processes hold cores)")
    p.add_argument("--resolutions", type=_resolutions_arg,
                   help="--model: input resolutions, multiples of 32 "
                        f"(default {','.join(map(str, MODEL_RESOLUTIONS))})")
    p.add_argument("--attentions", help=f"--model: comma-separated, from {','.join(ATTENTIONS)} (default all)")
    p.add_argument("--max-step-seconds", type=_positive(float),
                   help="--model: skip resolutions whose training step is estimated longer (default 60)")
    p.add_argument("--out", help="JSON result path (default bench_results/<preset>-<device>.json, "
                   "bench_results/model-<device>.json for --model; '' = none)")
    p.add_argument("--plot", help="PNG plot path (default: the JSON path with .png; '' = none)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def _split(parser: argparse.ArgumentParser, text: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        parser.error(f"--{what} must be a comma-separated subset of {','.join(allowed)}, got {text!r}")
    return items


def _resolve_device(parser: argparse.ArgumentParser, text: str | None) -> torch.device:
    try:
        device = torch.device(text or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        parser.error(f"--device must be a torch device such as cpu or cuda, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but no CUDA device is available on this machine")
    return device


def _plot_path(args, out: str) -> str:
    return args.plot if args.plot is not None else (out[:-5] + ".png" if out.endswith(".json") else "")


def _measure(env: dict, sweep: Callable[[], list]) -> list:
    """Runs the sweep while watching other processes' CPU use, which goes into ``env``."""
    with OtherCpuUse() as other:
        rows = sweep()
    env.update(other_processes_cpu_cores=other.cores, other_processes_cpu_warning=other.warning())
    return rows


def _write_results(args, rows: list, env: dict, table: str, default_out: str, extra: dict,
                   plotter: Callable[[str, list, dict], object]) -> None:
    """Prints the table, then writes the JSON (--out, else ``default_out``) and the plot (--plot)."""
    print(table)
    out = args.out if args.out is not None else default_out
    if out:
        print(f"wrote {write_json(out, rows, env, extra)}")
    plot = _plot_path(args, out)
    if plot:
        result = plotter(plot, rows, env)
        print(f"wrote {result}" if not isinstance(result, str) else f"plot: {result}")


def _run_model(parser: argparse.ArgumentParser, args, device: torch.device, argv: list[str]) -> int:
    attentions = _split(parser, args.attentions or ",".join(ATTENTIONS), ATTENTIONS, "attentions")
    resolutions = args.resolutions or list(MODEL_RESOLUTIONS)
    env = environment(device)
    if args.threads:
        env["torch_threads"] = args.threads
    if device.type != "cuda":
        print("note: running on a CPU: no GPU timings are measured.", file=sys.stderr)
    rows = _measure(env, lambda: run_model_sweep(attentions, resolutions, str(device), batch=args.batch or 1,
                                                 max_step_s=args.max_step_seconds or 60.0,
                                                 threads=args.threads or 0, progress=not args.quiet))
    extra = {"what": "training step of a VVT-tiny-shaped backbone", "embed_dims": EMBED_DIMS,
             "num_heads": NUM_HEADS, "depths": DEPTHS, "mlp_ratios": MLP_RATIOS, "sr_ratio": SR_RATIO,
             "growth_exponents_in_pixels": {a: {k: growth_exponent(rows, a, k)
                                                for k in ("step_s", "cpu_step_s", "peak_bytes")}
                                            for a in attentions},
             "argv": argv}
    _write_results(args, rows, env, format_model_table(rows, env), f"bench_results/model-{device.type}.json",
                   extra, write_model_plot)
    return 0


def _run_host(argv: list[str]) -> int:
    """``python -m bench.host`` in a fresh interpreter: it needs triton imported without the interpreter."""
    import os
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-m", "bench.host", *argv], env=env, cwd=root).returncode


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark the arguments describe; print the table; write JSON and plot. Returns 0."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--host" in argv:
        return _run_host([a for a in argv if a != "--host"])
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.target_check:
        from .targets import run_targets
        return run_targets(device=args.device, out=args.out, progress=not args.quiet)
    device = _resolve_device(parser, args.device)
    if args.model:
        return _run_model(parser, args, device, argv)
    preset = "quick" if args.quick else args.preset
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    providers = _split(parser, args.providers or ",".join(default_providers(device)), PROVIDERS, "providers")
    modes = _split(parser, args.modes, MODES, "modes")
    cases = build_cases(preset, grids=args.grids, batch=args.batch, heads=args.heads, dim=args.dim,
                        dim_v=args.dim_v)
    quick = preset == "quick"
    rate = None
    if device.type == "cpu":
        # The first guess for sizes not yet measured. Half-precision matmuls are slow on most CPUs:
        # a smaller product keeps this calibration to a few seconds.
        size = 2048 if dtype in (torch.float32, torch.float64) else 512
        if not args.quiet:
            print(f"calibrating: timing a {size}^3 {str(dtype).replace('torch.', '')} matmul ...",
                  file=sys.stderr, flush=True)
        rate = matmul_rate(device, dtype, size=size, budget_s=0.3)
        if not args.quiet:
            print(f"calibrating: {rate / 1e9:.1f} GFLOP/s", file=sys.stderr, flush=True)
    config = SweepConfig(device=device, dtype=dtype, providers=providers, modes=modes, variant=args.variant,
                         max_call_s=args.max_call_seconds or (120.0 if quick else 10.0),
                         budget_s=args.budget_seconds or (0.3 if quick else 1.0),
                         matmul_flops_per_s=rate, progress=not args.quiet)
    env = environment(device)
    if device.type != "cuda":
        print("note: running on a CPU: no GPU timings are measured; 'flash' is PyTorch's FlashAttention-style "
              "CPU kernel and 'vicinity' is the torch backend.", file=sys.stderr)
    rows = _measure(env, lambda: run_sweep(cases, config))
    extra = {"preset": preset, "timing_method": timing_method(device), "matmul_flops_per_s": rate, "argv": argv}
    _write_results(args, rows, env, format_table(rows, env), f"bench_results/{preset}-{device.type}.json",
                   extra, write_plot)
    return 0
