"""k-NN attention benchmark: ours (``knn``) against the authors' dense formulation (``knn-authors``).

    python -m bench.knn                                   # N = 197, 1024, 4096; B1 H4 D64 fp32, topk = N/2
    python -m bench.knn --n 4096 --topk 2048 --json bench/results/knn-cpu.json

Per case and provider, one training step (forward + backward of a random dO): median time (the two
providers timed in alternation, so that their ratio is taken under the same background load), bytes
saved for backward, and the peak memory the step allocates beyond its inputs. On a GPU the peak is
``torch.cuda.max_memory_allocated``; on a CPU it is the peak of the "Total Allocated" count the
PyTorch profiler reports for CPU allocations (``profile_memory=True``), measured in a separate,
untimed step. Targets checked at N = 4096 (the issue's setting): ours' peak <= 0.25x theirs and
ours' time <= theirs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable

import torch

from .cases import DTYPES, Case
from .memory import peak_allocated_bytes, saved_tensor_bytes
from .providers import KNN_PROVIDERS, Provider, knn_topk, make_inputs, make_knn_provider
from .timing import interleaved_medians, timing_method

DEFAULT_NS = (197, 1024, 4096)
TARGET_N = 4096
TARGET_MEMORY_RATIO = 0.25


def cpu_peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of CPU tensor memory allocated during ``fn()`` beyond what was allocated before it,
    from the PyTorch profiler's memory events (each carries the running "Total Allocated" count of
    the allocations seen since profiling began)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
    if not memory:
        return 0
    # "Total Allocated" runs on across profiler sessions (tensors an earlier session saw allocated and not
    # freed stay in it): the baseline is the count just before this session's first event.
    baseline = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(0, max(m["Total Allocated"] for m in memory) - baseline)


def training_step(provider: Provider, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  do: torch.Tensor) -> Callable[[], None]:
    def step():
        for t in (q, k, v):
            t.grad = None
        provider.fn(q, k, v).backward(do)
    return step


def measure_case(case: Case, device: torch.device, dtype: torch.dtype, topk: int | None,
                 budget_s: float) -> list[dict]:
    """Rows (one per provider) for one case."""
    providers, rows = {}, []
    for name in KNN_PROVIDERS:
        p = make_knn_provider(name, case, device, dtype, topk)
        if isinstance(p, str):
            rows.append(dict(provider=name, skipped=p))
        else:
            providers[name] = p
    steps, saved = {}, {}
    for name, p in providers.items():
        q, k, v = make_inputs(p, case, device, dtype, requires_grad=True)
        gen = torch.Generator(device="cpu").manual_seed(1)
        do = torch.randn((case.batch, case.heads, case.n, case.dim_v), generator=gen).to(device, dtype)
        steps[name] = training_step(p, q, k, v, do)
        saved[name] = saved_tensor_bytes(lambda: p.fn(q, k, v))[0]
    peaks = {}
    for name, step in steps.items():
        step()   # warm-up: lazy initialisation must not count as the step's memory
        peaks[name] = (peak_allocated_bytes(step, device) if device.type == "cuda"
                       else cpu_peak_allocated_bytes(step))
    times = interleaved_medians(steps, device, budget_s=budget_s)
    for name, p in providers.items():
        t = times[name]
        rows.append(dict(provider=name, label=p.label, n=case.n, topk=knn_topk(case, topk), median_s=t.median_s,
                         min_s=t.min_s, rel_iqr=t.rel_iqr, samples=t.samples, saved_bytes=saved[name],
                         peak_bytes=peaks[name]))
    return rows


def ratios(rows: list[dict]) -> dict | None:
    """ours / theirs for time (median and fastest sample), peak and saved memory."""
    by = {r["provider"]: r for r in rows if "skipped" not in r}
    if set(by) != set(KNN_PROVIDERS):
        return None
    ours, theirs = by["knn"], by["knn-authors"]
    return dict(time=ours["median_s"] / theirs["median_s"], time_min=ours["min_s"] / theirs["min_s"],
                peak=ours["peak_bytes"] / theirs["peak_bytes"], saved=ours["saved_bytes"] / theirs["saved_bytes"])


def format_rows(results: list[dict]) -> str:
    head = (f"{'N':>5} {'topk':>5} {'provider':<30} {'step ms':>9} {'IQR':>5} {'peak MiB':>9} {'saved MiB':>9}"
            f"   ours/theirs: time  peak  saved")
    lines = [head, "-" * len(head)]
    for res in results:
        for r in res["rows"]:
            if "skipped" in r:
                lines.append(f"{res['n']:>5} {'':>5} {r['provider']:<30} skipped: {r['skipped']}")
                continue
            lines.append(f"{r['n']:>5} {r['topk']:>5} {r['label']:<30} {r['median_s'] * 1e3:>9.1f} "
                         f"{r['rel_iqr']:>5.2f} {r['peak_bytes'] / 2**20:>9.1f} {r['saved_bytes'] / 2**20:>9.1f}")
        rt = res.get("ratios")
        if rt:
            lines.append(f"{'':>5} {'':>5} {'':<30} {'':>9} {'':>5} {'':>9} {'':>9}   "
                         f"{rt['time']:>16.2f} {rt['peak']:>5.3f} {rt['saved']:>6.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=list(DEFAULT_NS), help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--topk", type=int, default=None, help="keys kept per query (default N/2)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timing per case")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    results = []
    for n in args.n:
        case = Case((n,), args.batch, args.heads, args.dim, args.dim, label="knn")
        rows = measure_case(case, device, dtype, args.topk, args.budget)
        results.append(dict(n=n, case=case.to_dict(), rows=rows, ratios=ratios(rows)))
        print(format_rows(results[-1:]), flush=True)
    targets = None
    target = next((r for r in results if r["n"] == TARGET_N and r["ratios"]), None)
    if target:
        rt = target["ratios"]
        targets = dict(n=TARGET_N, peak_ratio=rt["peak"], peak_ok=rt["peak"] <= TARGET_MEMORY_RATIO,
                       time_ratio=rt["time"], time_ok=rt["time"] <= 1.0)
        print(f"\ntargets at N={TARGET_N}: peak ours/theirs {rt['peak']:.3f} (<= {TARGET_MEMORY_RATIO}: "
              f"{'ok' if targets['peak_ok'] else 'MISSED'}), time ours/theirs {rt['time']:.2f} (<= 1: "
              f"{'ok' if targets['time_ok'] else 'MISSED'})")
    if args.json:
        env = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                   threads=torch.get_num_threads(), cpu_count=os.cpu_count(), device=str(device),
                   timing=timing_method(device) if device.type == "cuda" else
                   "CPU: the providers' steps timed in alternation (bench.timing.interleaved_medians), one "
                   "untimed warm-up each, median per provider; garbage collector paused",
        command="python -m bench.knn " + " ".join(sys.argv[1:] if argv is None else argv))
        with open(args.json, "w") as fh:
            json.dump(dict(env=env, dtype=args.dtype, results=results, targets=targets), fh, indent=1)
    return 0 if targets is None or (targets["peak_ok"] and targets["time_ok"]) else 1


if __name__ == "__main__":
    sys.exit(main())
