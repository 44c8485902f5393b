"""Output: the stdout table, the JSON result file and the log-log plot."""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from .flops import FLOP_FORMULA_TEXT

# A row whose spread (interquartile range / median of its samples) is above this is flagged as noisy.
NOISY_SPREAD = 0.25


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
            skipped.append(f"  {r['case']} {r['mode']} {r['label']}: {r['skipped']}")
            table.append((r["case"], r["mode"], r["label"], str(r["n"]), "skipped", "-", "-", "-", "-", "-"))
            continue
        spread = f"{100 * r['rel_iqr']:.0f}%" + (" noisy" if r.get("noisy") else "")
        table.append((r["case"], r["mode"], r["label"], str(r["n"]), f"{r['median_ms']:.3f}",
                      spread, _fmt_rate(r["flops_per_s"]), _fmt_ratio(r["speedup_vs_flash"]),
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
    n_noisy = sum(bool(r.get("noisy")) for r in rows)
    if n_noisy:
        lines.append(f"{n_noisy} row(s) marked noisy: spread above {100 * NOISY_SPREAD:.0f}%; their medians are "
                     "unreliable (other load, or too few samples): rerun, or raise --budget-seconds.")
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


MATPLOTLIB_MISSING = "matplotlib is not installed (pip install 'vicinity_attn[bench]'): no plot written"


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (never needs a display), or None when
    matplotlib, an optional dependency (the ``bench`` extra), is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def style_log_axes(ax, ticks: dict, xlabel: str) -> None:
    """Log-log axes whose x ticks sit at the measured sizes, labelled ``ticks[x]``."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sorted(ticks))
    ax.set_xticklabels([ticks[x] for x in sorted(ticks)], rotation=30)
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7)


def measured_on(env: dict) -> str:
    """Where a run measured, for plot titles: the GPU's name, else the CPU and its thread count."""
    if env.get("gpu_measured"):
        return env.get("device_name")
    return f"CPU ({env.get('cpu_model')}, {env.get('torch_threads')} threads), no GPU measured"


def save_figure(plt, fig, path: str | Path) -> Path:
    """Lays out (leaving a strip for a footnote), writes the PNG, closes the figure."""
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plot(path: str | Path, rows: Sequence[dict], env: dict) -> Path | str:
    """Log-log time against N per provider, one panel per mode, on one shared y scale; interquartile
    ranges as error bars, skipped points as crosses on the top edge, x ticks labelled with the grids.
    Returns the path, or a reason string when matplotlib is missing (it is an optional dependency:
    the ``bench`` extra)."""
    plt = pyplot()
    if plt is None:
        return MATPLOTLIB_MISSING
    measured = [r for r in rows if r["median_ms"] is not None]
    modes = [m for m in ("fwd", "bwd", "fwdbwd") if any(r["mode"] == m for r in rows)]
    if not measured:
        return "nothing was measured: no plot written"
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4.6), squeeze=False, sharey=True)
    ticks = {r["n"]: r["grid_text"] if "grid_text" in r else "x".join(str(g) for g in r["grid"]) for r in rows}
    labels = list(dict.fromkeys(r["label"] for r in rows))
    colors = {label: f"C{i}" for i, label in enumerate(labels)}
    y_top = max(r["q3_ms"] or r["median_ms"] for r in measured) * 2
    for ax, mode in zip(axes[0], modes):
        for i, label in enumerate(labels):
            pts = sorted((r["n"], r["median_ms"], r.get("q1_ms"), r.get("q3_ms"), bool(r.get("noisy")))
                         for r in measured if r["mode"] == mode and r["label"] == label)
            if pts:
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                lo = [max(0.0, y - (p[2] if p[2] is not None else y)) for y, p in zip(ys, pts)]
                hi = [max(0.0, (p[3] if p[3] is not None else y) - y) for y, p in zip(ys, pts)]
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, color=colors[label], label=label)
                noisy = [(x, y) for x, y, p in zip(xs, ys, pts) if p[4]]
                if noisy:
                    ax.plot(*zip(*noisy), linestyle="none", marker="o", markersize=11, markerfacecolor="none",
                            color=colors[label])
            skipped = [r["n"] for r in rows if r["mode"] == mode and r["label"] == label and r["skipped"]]
            if skipped:
                ax.plot(skipped, [y_top / 1.25 ** i] * len(skipped), linestyle="none", marker="x", markersize=9,
                        color=colors[label], label=f"{label}: skipped")
        style_log_axes(ax, ticks, "grid (tokens N = rows x columns)")
        ax.set_title(mode)
    axes[0][0].set_ylabel("median time [ms] (bars: interquartile range)")
    where = measured_on(env)
    dtypes = sorted({r["dtype"] for r in measured})
    shapes = sorted({(r["batch"], r["heads"], r["dim"]) for r in measured})
    shape = f"B={shapes[0][0]} H={shapes[0][1]} D={shapes[0][2]}, " if len(shapes) == 1 else "VVT-stage shapes, "
    title = f"vicinity attention vs softmax attention, {shape}{'/'.join(dtypes)}, {where}"
    notes = []
    if any(r.get("noisy") for r in measured):
        notes.append(f"circled: noisy (spread > {100 * NOISY_SPREAD:.0f}%)")
    if any(r["skipped"] for r in rows):
        notes.append("x on the top edge: skipped (reason in the table / JSON)")
    if not env.get("gpu_measured") and env.get("other_processes_cpu_warning"):
        title += (f"\nWARNING: other processes kept {env['other_processes_cpu_cores']:.2f} CPU cores busy during "
                  "this run: timings are disturbed")
    fig.suptitle(title, fontsize=9, color="black")
    if notes:
        fig.text(0.01, 0.01, "; ".join(notes), fontsize=7)
    return save_figure(plt, fig, path)


def fit_exponent(ns: Sequence[float], times: Sequence[float]) -> float:
    """Least-squares slope of log(time) against log(N): time ~ N^slope."""
    xs = [math.log(n) for n in ns]
    ys = [math.log(t) for t in times]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
