"""Output: the stdout table, the JSON result file and the log-log plot."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from .flops import FLOP_FORMULA_TEXT


def _fmt_bytes(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _fmt_rate(r: float | None) -> str:
    return "-" if r is None else f"{r / 1e9:.1f}"


def _fmt_ratio(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:.1f}x" if r >= 10 else f"{r:.2f}x"


def format_table(rows: Sequence[dict], env: dict) -> str:
    """A fixed-width table of all rows (skipped ones say why), with a header on what was measured."""
    lines = []
    if env.get("gpu_measured"):
        lines.append(f"Device: {env['device_name']} (GPU timings measured)")
    else:
        lines.append(f"Device: CPU, {env['cpu_model']}, {env['torch_threads']} threads. "
                     "No GPU timings are measured in this run.")
    lines.append(f"torch {env['torch']}, triton {env['triton']}, flash_attn {env['flash_attn'] or 'not installed'}")
    if not env.get("gpu_measured") and env.get("other_processes_cpu_warning"):
        lines.append(env["other_processes_cpu_warning"])
    head = ("case", "mode", "provider", "N", "median ms", "spread", "GFLOP/s", "vs flash", "saved MiB",
            "peak MiB")
    table = [head]
    skipped = []
    for r in rows:
        if r["skipped"]:
            skipped.append(f"  {r['case']} {r['mode']} {r['provider']}: {r['skipped']}")
            table.append((r["case"], r["mode"], r["provider"], str(r["n"]), "skipped", "-", "-", "-", "-", "-"))
            continue
        table.append((r["case"], r["mode"], r["label"], str(r["n"]), f"{r['median_ms']:.3f}",
                      f"{100 * r['rel_iqr']:.0f}%", _fmt_rate(r["flops_per_s"]), _fmt_ratio(r["speedup_vs_flash"]),
                      _fmt_bytes(r["saved_bytes"]), _fmt_bytes(r["peak_bytes"])))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    numeric = {3, 4, 5, 6, 7, 8, 9}
    for i, row in enumerate(table):
        cells = [c.rjust(w) if j in numeric else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    if skipped:
        lines.append("Skipped:")
        lines.extend(skipped)
    lines.append("spread = interquartile range / median of the timed samples. vs flash = time(flash) / "
                 "time(row), same case and mode. saved = bytes autograd keeps for backward (unique storages, "
                 "inputs included). peak = peak allocated memory beyond the inputs, GPU only.")
    lines.append(FLOP_FORMULA_TEXT)
    return "\n".join(lines)


def write_json(path: str | Path, rows: Sequence[dict], env: dict, extra: dict | None = None) -> Path:
    """Write ``{"environment", "flop_formula", "rows", ...extra}`` to ``path`` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"environment": env, "flop_formula": FLOP_FORMULA_TEXT, **(extra or {}), "rows": list(rows)}
    path.write_text(json.dumps(payload, indent=2, allow_nan=False, default=str) + "\n", encoding="utf-8")
    return path


def write_plot(path: str | Path, rows: Sequence[dict], env: dict) -> Path | str:
    """Log-log time against N per provider, one panel per mode. Returns the path, or a reason string
    when matplotlib is missing (it is an optional dependency: the ``bench`` extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'vicinity_attn[bench]'): no plot written"
    measured = [r for r in rows if r["median_ms"] is not None]
    modes = [m for m in ("fwd", "bwd", "fwdbwd") if any(r["mode"] == m for r in measured)]
    if not modes:
        return "nothing was measured: no plot written"
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        by_label: dict[str, list[tuple[int, float]]] = {}
        for r in measured:
            if r["mode"] == mode:
                by_label.setdefault(r["label"], []).append((r["n"], r["median_ms"]))
        for label, pts in by_label.items():
            pts.sort()
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_title(mode)
        ax.set_xlabel("tokens N")
        ax.set_ylabel("median time [ms]")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    where = (env["device_name"] if env.get("gpu_measured")
             else f"CPU ({env['cpu_model']}, {env['torch_threads']} threads), no GPU measured")
    dtypes = sorted({r["dtype"] for r in measured})
    shapes = sorted({(r["batch"], r["heads"], r["dim"]) for r in measured})
    shape = f"B={shapes[0][0]} H={shapes[0][1]} D={shapes[0][2]}, " if len(shapes) == 1 else "VVT-stage shapes, "
    fig.suptitle(f"vicinity attention vs softmax attention, {shape}{'/'.join(dtypes)}, {where}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def fit_exponent(ns: Sequence[float], times: Sequence[float]) -> float:
    """Least-squares slope of log(time) against log(N): time ~ N^slope."""
    xs = [math.log(n) for n in ns]
    ys = [math.log(t) for t in times]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
