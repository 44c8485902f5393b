"""One command on a real GPU: the test suite on the device, kernel timings against FlashAttention,
peak memory, and the GPU model's prediction beside every measurement.

    python -m bench.gpu_check                     # on a CUDA machine (no network needed)
    python -m bench.gpu_check --skip-tests        # timings only
    python -m bench.gpu_check --dry-run           # no GPU: writes the files with the model side only

Writes ``gpu-check.json`` and ``gpu-check.png`` into ``--out-dir`` (default bench/results/):

1. ``pytest tests`` with ``TRITON_INTERPRET=0``: tests/vicinity/test_triton_backend.py runs on the CUDA device
   (tests/conftest.py); the summary line and exit status go into the JSON.
2. For the GPU model's shapes (bench/gpu_model.py, bf16) and fwd / fwdbwd: median time with
   ``triton.testing.do_bench`` of the triton backend and of FlashAttention (flash_attn when it
   imports, else SDPA restricted to its FLASH_ATTENTION backend), peak memory of one call beyond the
   inputs, and from bench/results/gpu-model.json the modelled times of both.

Without CUDA it prints why and exits with status 2 (``--dry-run`` exists to check the output files).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

from .gpu_model import RESULTS as MODEL_PATH
from .gpu_model import SHAPES
from .report import MATPLOTLIB_MISSING, pyplot, save_figure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "bench", "results")
PROVIDERS = ("vicinity", "flash")       # bench.providers names: triton backend on CUDA, FlashAttention
DIRECTIONS = ("fwd", "fwdbwd")
NO_CUDA = ("python -m bench.gpu_check needs a CUDA GPU, and torch {torch} sees none: nothing was run or "
           "measured. (Use --dry-run to write the model-only JSON/PNG.)")


def run_tests(timeout_s: int) -> dict:
    """``pytest tests`` on the device (TRITON_INTERPRET=0); the summary, not the whole log."""
    import importlib.util
    if importlib.util.find_spec("pytest") is None:
        return dict(ok=False, returncode=None, counts={}, error="pytest is not installed: the suite did not run")
    env = dict(os.environ, TRITON_INTERPRET="0")
    cmd = [sys.executable, "-m", "pytest", "tests", "-q", "-rfEs", "-p", "no:cacheprovider"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, rc = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""), "timeout"
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", out)}
    return dict(command="TRITON_INTERPRET=0 " + " ".join(cmd[1:]), returncode=rc, counts=counts,
                seconds=round(time.perf_counter() - start, 1), ok=rc == 0,
                failures=[line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))][:50],
                tail=out[-3000:])


def _bench_case(name: str):
    from .cases import Case
    s = SHAPES[name]
    return Case(tuple(s["grid"]), s["batch"], s["heads"], s["d"], s["dv"], label=f"({name})")


def measure(names: list[str]) -> dict:
    """Median do_bench times and peak memory per shape, provider and direction (CUDA only)."""
    import torch

    from .cases import DTYPES
    from .memory import peak_allocated_bytes
    from .providers import make_inputs, make_provider
    from .timing import gpu_median

    device = torch.device("cuda")
    results = {}
    for name in names:
        case = _bench_case(name)
        dtype = DTYPES[SHAPES[name]["dtype"]]
        per = {}
        for pname in PROVIDERS:
            provider = make_provider(pname, case, device, dtype)
            if isinstance(provider, str):
                per[pname] = dict(skipped=provider)
                continue
            entry = dict(label=provider.label)
            for direction in DIRECTIONS:
                grad = direction == "fwdbwd"
                q, k, v = make_inputs(provider, case, device, dtype, requires_grad=grad)
                do = torch.randn_like(provider.fn(q, k, v).detach())

                def call(q=q, k=k, v=v, do=do, grad=grad, fn=provider.fn):
                    out = fn(q, k, v)
                    if grad:
                        torch.autograd.grad(out, (q, k, v), do)
                    return out
                try:
                    t = gpu_median(call)
                    entry[direction] = dict(median_us=round(t.seconds * 1e6, 2), spread=t.spread,
                                            peak_bytes=peak_allocated_bytes(call, device))
                except Exception as exc:  # noqa: BLE001 - a provider that cannot run is reported, not fatal
                    entry[direction] = dict(error=f"{type(exc).__name__}: {exc}"[:300])
                del q, k, v, do
                torch.cuda.empty_cache()
            per[pname] = entry
        results[name] = per
    return results


def load_model(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def assemble(names: list[str], model: dict | None, measured: dict | None, tests: dict | None, env: dict) -> dict:
    rows = []
    for name in names:
        m = (model or {}).get("shapes", {}).get(name, {})
        for direction in DIRECTIONS:
            md = m.get(direction, {})
            row = dict(shape=name, title=(m.get("title") or str(SHAPES[name])), direction=direction,
                       vicinity_modelled_us=md.get("modelled_us"), vicinity_hbm_floor_us=md.get("hbm_floor_us"),
                       fa2_modelled_us=md.get("fa2_modelled_us"))
            for pname in PROVIDERS:
                got = (measured or {}).get(name, {}).get(pname, {})
                d = got.get(direction, {})
                row[f"{pname}_label"] = got.get("label") or got.get("skipped")
                row[f"{pname}_measured_us"] = d.get("median_us")
                row[f"{pname}_peak_bytes"] = d.get("peak_bytes")
                if "error" in d:
                    row[f"{pname}_error"] = d["error"]
            rows.append(row)
    return dict(measured=measured is not None,
                note=("times measured with triton.testing.do_bench (median) on this device; *_modelled_us are "
                      "the MODEL of bench/results/gpu-model.json") if measured is not None else
                     "NOT MEASURED (dry run, no GPU): only the model's predictions are filled in",
                environment=env, tests=tests, model_source=MODEL_PATH if model else None, rows=rows)


def plot(result: dict, path: str) -> str:
    """The bar chart of measurements beside the model; returns the path written, or why none was."""
    plt = pyplot()
    if plt is None:
        return MATPLOTLIB_MISSING
    rows = result["rows"]
    series = (("vicinity_measured_us", "vicinity (triton), measured", "tab:blue", None),
              ("vicinity_modelled_us", "vicinity (triton), MODEL", "tab:blue", "//"),
              ("flash_measured_us", "FlashAttention, measured", "tab:orange", None),
              ("fa2_modelled_us", "FlashAttention-2, MODEL", "tab:orange", "//"))
    fig, ax = plt.subplots(figsize=(11, 4.8))
    width = 0.2
    for i, (key, label, color, hatch) in enumerate(series):
        xs = [j + (i - 1.5) * width for j in range(len(rows))]
        vals = [r.get(key) for r in rows]
        ax.bar([x for x, v in zip(xs, vals) if v], [v for v in vals if v], width, label=label, color=color,
               alpha=0.45 if hatch else 0.9, hatch=hatch, edgecolor=color)
        for x, v in zip(xs, vals):
            if not v:
                ax.annotate("n/m", (x, 0.02), xycoords=("data", "axes fraction"), ha="center", fontsize=7,
                            rotation=90)
    ax.set_xticks(range(len(rows)), [f"({r['shape']}) {r['direction']}" for r in rows])
    if any(r.get(key) for r in rows for key, *_ in series):
        ax.set_yscale("log")
    ax.set_ylabel("microseconds (log)")
    title = "GPU check: measured beside the model" if result["measured"] else \
        "GPU check DRY RUN: no GPU, model only (n/m = not measured)"
    ax.set_title(f"{title} - {result['environment'].get('device_name', '')}")
    ax.legend(fontsize=8)
    return str(save_figure(plt, fig, path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default=OUT_DIR, help="where gpu-check.json / gpu-check.png go")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    parser.add_argument("--model", default=MODEL_PATH, help="the GPU model's JSON (python -m bench.gpu_model)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the test suite on the device")
    parser.add_argument("--test-timeout", type=int, default=3600, help="seconds for the test suite")
    parser.add_argument("--dry-run", action="store_true", help="no GPU needed: write the files with the model only")
    args = parser.parse_args(argv)
    names = [n for n in args.shapes.split(",") if n]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {', '.join(SHAPES)}")

    import torch
    try:
        import vicinity_attn.kernels  # noqa: F401  (kernels/ is mapped into the package by setup.py)
    except ImportError as exc:
        print(f"vicinity_attn is not installed ({exc}): run `pip install --no-deps --no-build-isolation -e .` "
              "in the repository first (works offline)")
        return 2
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print(NO_CUDA.format(torch=torch.__version__))
        return 2
    from .env import environment
    env = environment(torch.device("cuda" if cuda and not args.dry_run else "cpu"))
    model = load_model(args.model)
    if model is None:
        print(f"warning: no model at {args.model} (run python -m bench.gpu_model): model columns left empty")
    tests = measured = None
    if not args.dry_run:
        if not args.skip_tests:
            print("running the test suite on the device (TRITON_INTERPRET=0) ...", flush=True)
            tests = run_tests(args.test_timeout)
            print(f"tests: {tests['counts']} (exit {tests['returncode']}) {tests.get('error', '')}", flush=True)
        measured = measure(names)
    result = assemble(names, model, measured, tests, env)
    os.makedirs(args.out_dir, exist_ok=True)
    json_path, png_path = os.path.join(args.out_dir, "gpu-check.json"), os.path.join(args.out_dir, "gpu-check.png")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    plotted = plot(result, png_path)
    for r in result["rows"]:
        fmt = lambda v: "   n/m" if v is None else f"{v:8.1f}"  # noqa: E731
        print(f"({r['shape']}) {r['direction']:<6} vicinity measured {fmt(r['vicinity_measured_us'])} us, model "
              f"{fmt(r['vicinity_modelled_us'])} | flash measured {fmt(r['flash_measured_us'])} us, FA2 model "
              f"{fmt(r['fa2_modelled_us'])}")
    print(f"wrote {json_path}" + (f" and {png_path}" if plotted == png_path else f"; plot: {plotted}")
          + ("" if measured else " (DRY RUN: nothing measured)"))
    if tests is not None and not tests["ok"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
