"""A whole backbone: one training step of a VVT-tiny-shaped network against input resolution.

The network (:func:`build_backbone`) has the shape of VVT-tiny: four stages with embedding dims
96 / 160 / 320 / 512, heads 1 / 2 / 5 / 8, depth 2 each, key/value reduction ``sr_ratio`` 2 in every
stage, MLP ratios 8 / 8 / 4 / 4, as in PVT / VVT: a non-overlapping patch embedding (Conv2d with
kernel = stride = 4 for the first stage, 2 after, then LayerNorm), pre-norm blocks
``x + attn(LN(x))`` and ``x + MLP(LN(x))`` (Linear, GELU, Linear), a final LayerNorm, mean pooling
and a 1000-class linear head. No position embeddings (VVT's vicinity weighting carries position; the
softmax model gets none either, so that the three differ in the attention core only).

The attention of every block is one of
- ``vicinity``: this package's :class:`vicinity_attn.VicinityAttention` (backend "auto");
- ``softmax``: the same projections and reduction, scaled dot-product softmax attention through
  ``torch.nn.functional.scaled_dot_product_attention`` (PyTorch picks its fastest kernel);
- ``authors``: the same projections and reduction, vicinity attention as the authors' released
  code computes it (:mod:`bench.authors`: 4x-expanded features, plain autograd).

Each (attention, resolution) point runs in a fresh subprocess (``python -m bench.backbone --worker``),
so that its peak memory is its own and a point that runs out of memory cannot take the sweep down:
a warm-up step, then timed training steps (forward, cross-entropy loss, backward, AdamW step) on one
random image; the median is reported. Peak memory is what a step adds on top of the model and the
input: on a GPU ``torch.cuda.max_memory_allocated`` minus the allocation before the first step; on a
CPU (where PyTorch keeps no allocation statistics) the process's peak resident set size
(``getrusage``) minus its resident size before the first step.

``python -m bench --model`` runs the sweep (see ``--help``); it prints a table and writes JSON and a
plot of step time and peak memory against resolution.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vicinity_attn import VicinityAttention
from vicinity_attn.modules import spatial_reduction

from .authors import authors_vicinity_attention
from .report import MATPLOTLIB_MISSING, measured_on, pyplot, save_figure, style_log_axes

EMBED_DIMS = (96, 160, 320, 512)
NUM_HEADS = (1, 2, 5, 8)
DEPTHS = (2, 2, 2, 2)
MLP_RATIOS = (8, 8, 4, 4)
SR_RATIO = 2
ATTENTIONS = ("vicinity", "softmax", "authors")
RESOLUTIONS = (224, 320, 448, 640, 896, 1024, 1280, 1536)
NUM_CLASSES = 1000


class SwappedCoreAttention(VicinityAttention):
    """:class:`~vicinity_attn.VicinityAttention`'s projections and key/value reduction around another
    attention core: ``"softmax"`` (SDPA) or ``"authors"`` (the released code's formulation)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, core: str) -> None:
        super().__init__(dim, num_heads, sr_ratio=sr_ratio)
        if core not in ("softmax", "authors"):
            raise ValueError(f"core must be 'softmax' or 'authors', got {core!r}")
        self.core = core

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        heads, hd = self.num_heads, self.head_dim
        q = self.q(x).view(B, N, heads, hd).transpose(1, 2)
        kv_input, kv_grid = x, (H, W)
        if self.sr_ratio > 1:
            kv_input, kv_grid = spatial_reduction(x, H, W, self.sr_ratio, self.sr, self.norm)
        Nk = kv_input.shape[1]
        k = self.k(kv_input).view(B, Nk, heads, hd).transpose(1, 2)
        v = self.v(kv_input).view(B, Nk, heads, hd).transpose(1, 2)
        if self.core == "softmax":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = authors_vicinity_attention(q, k, v, (H, W), kv_grid)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class PatchEmbed(nn.Module):
    """Non-overlapping patches (PVT): [B, C, H, W] -> tokens [B, H/p * W/p, dim] and the grid."""

    def __init__(self, in_chans: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        H, W = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), H, W


class Block(nn.Module):
    """Pre-norm transformer block with the PVT / VVT calling convention ``forward(x, H, W)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, attention: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = (VicinityAttention(dim, num_heads, sr_ratio=SR_RATIO) if attention == "vicinity"
                     else SwappedCoreAttention(dim, num_heads, SR_RATIO, attention))
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), H, W)
        return x + self.mlp(self.norm2(x))


class Backbone(nn.Module):
    """The VVT-tiny-shaped classifier (see the module docstring): images [B, 3, R, R] (R divisible by
    32) -> logits [B, 1000]."""

    def __init__(self, attention: str) -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        dims = (3,) + EMBED_DIMS
        self.embeds = nn.ModuleList(PatchEmbed(dims[i], dims[i + 1], 4 if i == 0 else 2) for i in range(4))
        self.stages = nn.ModuleList(
            nn.ModuleList(Block(EMBED_DIMS[i], NUM_HEADS[i], MLP_RATIOS[i], attention) for _ in range(DEPTHS[i]))
            for i in range(4))
        self.norm = nn.LayerNorm(EMBED_DIMS[-1])
        self.head = nn.Linear(EMBED_DIMS[-1], NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        for i, (embed, blocks) in enumerate(zip(self.embeds, self.stages)):
            x, H, W = embed(x)
            for block in blocks:
                x = block(x, H, W)
            if i < 3:
                x = x.transpose(1, 2).reshape(x.shape[0], -1, H, W)
        return self.head(self.norm(x).mean(dim=1))


def build_backbone(attention: str) -> Backbone:
    """The VVT-tiny-shaped backbone with ``attention`` ("vicinity", "softmax" or "authors") in every block."""
    return Backbone(attention)


# ----------------------------------------------------------------------------------------------------
# one point, in a worker process
# ----------------------------------------------------------------------------------------------------

def _rss_bytes() -> int:
    """This process's resident set size now (Linux), else 0."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _peak_rss_bytes() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # kilobytes on Linux


def measure_point(attention: str, resolution: int, device: torch.device, *, batch: int = 1,
                  budget_s: float = 10.0, max_steps: int = 5) -> dict:
    """Median seconds of one training step and the step's peak memory (see the module docstring)."""
    torch.manual_seed(0)
    model = build_backbone(attention).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, resolution, resolution, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        return loss.item()   # .item() waits for the device: the step is complete when it returns

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base = _rss_bytes()
    t0 = time.perf_counter()
    loss = step()
    first = time.perf_counter() - t0
    n_steps = int(min(max_steps, max(2, budget_s // max(first, 1e-9))))
    times, cpu_times = [], []
    for _ in range(n_steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss_bytes()) - base
    if not math.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss}")
    return {"attention": attention, "resolution": resolution, "batch": batch, "device": str(device),
            "step_s": statistics.median(times), "min_step_s": min(times), "first_step_s": first,
            "cpu_step_s": statistics.median(cpu_times),
            "steps": len(times), "peak_bytes": peak, "threads": torch.get_num_threads(),
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": "bf16 autocast" if device.type == "cuda" else "fp32"}


# ----------------------------------------------------------------------------------------------------
# the sweep
# ----------------------------------------------------------------------------------------------------

def _run_worker(attention: str, resolution: int, device: str, batch: int, budget_s: float, threads: int,
                timeout_s: float) -> dict:
    """One point in a fresh interpreter; a dict with ``skipped`` when it failed or timed out."""
    cmd = [sys.executable, "-m", "bench.backbone", "--worker", attention, str(resolution), device,
           str(batch), str(budget_s), str(threads)]
    root = Path(__file__).resolve().parent.parent
    try:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"skipped": f"did not finish within {timeout_s:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        if proc.returncode < 0:
            err = f"killed by signal {-proc.returncode} (out of memory?)"
        return {"skipped": f"failed: {err[:160]}"}
    return json.loads(lines[-1])


def _available_bytes(device: str) -> float:
    if device.startswith("cuda"):
        return float(torch.cuda.mem_get_info(torch.device(device))[0])
    from .memory import memory_budget_bytes
    return 2 * memory_budget_bytes(torch.device("cpu"))


def _extrapolate(points: list[tuple[int, float]], resolution: int) -> float | None:
    """The next value from the last two measured ones, growing at least linearly in pixels."""
    if not points:
        return None
    if len(points) == 1:
        (r0, v0), slope = points[0], 1.0
    else:
        (r1, v1), (r0, v0) = points[-2], points[-1]
        slope = max(1.0, math.log(v0 / v1) / math.log((r0 / r1) ** 2)) if v0 > 0 and v1 > 0 else 1.0
    return v0 * ((resolution / r0) ** 2) ** slope


def run_model_sweep(attentions: Sequence[str], resolutions: Sequence[int], device: str, *, batch: int = 1,
                    max_step_s: float = 60.0, budget_s: float = 10.0, threads: int = 0,
                    progress: bool = True) -> list[dict]:
    """Every (attention, resolution) point, each measured in a worker process or skipped with a reason:
    once a point is estimated (from the last two measured ones) to exceed ``max_step_s`` per step or
    80% of the device's available memory, that attention's larger resolutions are skipped.
    ``threads``: torch.set_num_threads in the workers (0: torch's default)."""
    rows = []
    start = time.perf_counter()
    memory_limit = 0.8 * _available_bytes(device)
    times: dict[str, list[tuple[int, float]]] = {a: [] for a in attentions}
    peaks: dict[str, list[tuple[int, float]]] = {a: [] for a in attentions}
    stop_reason: dict[str, str | None] = {a: None for a in attentions}
    # Resolution by resolution, the attentions one after the other: on a shared machine the load
    # drifts over minutes, and neighbours in time see similar load, so ratios at one resolution hold up.
    for res in resolutions:
        for attention in attentions:
            row = {"attention": attention, "resolution": res, "batch": batch, "device": device, "skipped": None}
            if stop_reason[attention] is None:
                t_est, m_est = _extrapolate(times[attention], res), _extrapolate(peaks[attention], res)
                if t_est is not None and t_est > max_step_s:
                    stop_reason[attention] = f"estimated {t_est:.0f} s per step > --max-step-seconds {max_step_s:g}"
                elif m_est is not None and m_est > memory_limit:
                    stop_reason[attention] = (f"estimated {m_est / 2**30:.1f} GiB peak > 80% of the "
                                              f"{memory_limit / 0.8 / 2**30:.1f} GiB available")
            if stop_reason[attention] is not None:
                row["skipped"] = stop_reason[attention]
            else:
                # A step that takes 3x its allowance (plus start-up) is given up on.
                result = _run_worker(attention, res, device, batch, budget_s, threads,
                                     timeout_s=120 + 3 * max_step_s * 6)
                row.update(result)
                if row.get("skipped"):
                    stop_reason[attention] = "a smaller resolution failed"
                else:
                    times[attention].append((res, row["step_s"]))
                    peaks[attention].append((res, row["peak_bytes"]))
            rows.append(row)
            if progress:
                what = (f"skipped: {row['skipped']}" if row["skipped"] else
                        f"{row['step_s'] * 1e3:.0f} ms/step (CPU time {row['cpu_step_s'] * 1e3:.0f} ms), "
                        f"peak {row['peak_bytes'] / 2**20:.0f} MiB")
                print(f"[{time.perf_counter() - start:7.1f}s] {attention} {res}x{res}: {what}",
                      file=sys.stderr, flush=True)
    return rows


def growth_exponent(rows: Sequence[dict], attention: str, key: str) -> float | None:
    """Least-squares exponent a of ``key`` ~ pixels^a over the measured points of ``attention``."""
    from .report import fit_exponent
    pts = [(r["resolution"] ** 2, r[key]) for r in rows
           if r["attention"] == attention and not r.get("skipped") and r.get(key)]
    return fit_exponent([p[0] for p in pts], [p[1] for p in pts]) if len(pts) >= 2 else None


def format_model_table(rows: Sequence[dict], env: dict) -> str:
    """One line per resolution: wall and CPU seconds per step and peak MiB per attention, and the other
    attentions' times over vicinity's; skipped points say why below."""
    attentions = list(dict.fromkeys(r["attention"] for r in rows))
    resolutions = sorted({r["resolution"] for r in rows})
    by = {(r["attention"], r["resolution"]): r for r in rows}
    ok = lambda r: bool(r) and not r.get("skipped")  # noqa: E731
    lines = [f"Training step of a VVT-tiny-shaped backbone (batch {rows[0]['batch'] if rows else '?'}), "
             f"{env.get('device_name', env.get('device'))}, {env.get('torch_threads')} threads"
             + ("" if env.get("gpu_measured") else "; no GPU measured")]
    if env.get("other_processes_cpu_warning"):
        lines.append(env["other_processes_cpu_warning"])
    head = ["resolution"]
    for a in attentions:
        head += [f"{a} s/step", f"{a} CPU s", f"{a} MiB"]
    others = [a for a in attentions if a != "vicinity"] if "vicinity" in attentions else []
    head += [f"{a} / vicinity (wall, CPU)" for a in others]
    table = [head]
    for res in resolutions:
        cells = [f"{res}x{res}"]
        for a in attentions:
            r = by.get((a, res))
            cells += ([f"{r['step_s']:.2f}", f"{r['cpu_step_s']:.2f}", f"{r['peak_bytes'] / 2**20:.0f}"] if ok(r)
                      else ["skipped", "-", "-"])
        base = by.get(("vicinity", res))
        for a in others:
            r = by.get((a, res))
            cells.append(f"{r['step_s'] / base['step_s']:.2f}x, {r['cpu_step_s'] / base['cpu_step_s']:.2f}x"
                         if ok(r) and ok(base) else "-")
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for i, row in enumerate(table):
        lines.append("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    for a in attentions:
        te, ce, me = (growth_exponent(rows, a, k) for k in ("step_s", "cpu_step_s", "peak_bytes"))
        if te is not None:
            lines.append(f"{a}: step time ~ pixels^{te:.2f} (CPU time ^{ce:.2f}), peak memory ~ pixels^{me:.2f} "
                         "(least squares over the measured resolutions)")
    skipped = [r for r in rows if r.get("skipped")]
    if skipped:
        lines.append("Skipped:")
        lines.extend(f"  {r['attention']} {r['resolution']}x{r['resolution']}: {r['skipped']}" for r in skipped)
    lines.append("s/step: median wall time of a training step (forward, cross-entropy, backward, AdamW); CPU s: "
                 "the process's CPU time in that step (with one thread, a measure of the work that other "
                 "processes' load barely disturbs); MiB: peak memory a step adds to the model and input.")
    return "\n".join(lines)


def write_model_plot(path: str | Path, rows: Sequence[dict], env: dict) -> Path | str:
    """Step time (wall and CPU) and peak memory against resolution (log-log), skipped points marked.
    Returns the path, or a reason string when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return MATPLOTLIB_MISSING
    from matplotlib.ticker import FuncFormatter, LogLocator
    resolutions = sorted({r["resolution"] for r in rows})
    attentions = list(dict.fromkeys(r["attention"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    panels = ((axes[0], "step_s", 1.0, "training step, wall time [s] (median)"),
              (axes[1], "cpu_step_s", 1.0, "training step, CPU time [s] (median)"),
              (axes[2], "peak_bytes", 2.0 ** -20, "peak memory of a step [MiB]"))
    for ax, key, scale, ylabel in panels:
        measured = [r[key] * scale for r in rows if not r.get("skipped") and r.get(key)]
        for i, attention in enumerate(attentions):
            pts = sorted((r["resolution"], r[key] * scale) for r in rows
                         if r["attention"] == attention and not r.get("skipped") and r.get(key))
            color = f"C{i}"
            if pts:
                exp = growth_exponent(rows, attention, key)
                label = attention + (f" (~pixels^{exp:.2f})" if exp is not None else "")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, label=label)
            skipped = [r["resolution"] for r in rows if r["attention"] == attention and r.get("skipped")]
            if skipped and measured:
                ax.plot(skipped, [max(measured) * 1.5 / 1.2 ** i] * len(skipped), linestyle="none", marker="x",
                        markersize=9, color=color, label=f"{attention}: skipped")
        style_log_axes(ax, {r: f"{r}x{r}" for r in resolutions}, "input resolution")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.set_ylabel(ylabel)
    where = measured_on(env)
    title = f"VVT-tiny-shaped backbone, one training step (batch {rows[0]['batch']}), {where}"
    if env.get("other_processes_cpu_warning"):
        title += (f"\nWARNING: other processes kept {env['other_processes_cpu_cores']:.2f} CPU cores busy during "
                  "the run: wall times are disturbed")
    fig.suptitle(title, fontsize=9)
    fig.text(0.01, 0.01, "x on the top edge: skipped (estimated over the step-time limit, or failed; reasons "
             "in the table / JSON)", fontsize=7)
    return save_figure(plt, fig, path)


def _worker_main(argv: Sequence[str]) -> int:
    attention, resolution, device, batch, budget, threads = argv
    if int(threads) > 0:
        torch.set_num_threads(int(threads))
    row = measure_point(attention, int(resolution), torch.device(device), batch=int(batch), budget_s=float(budget))
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.backbone",
                                     description="Worker of python -m bench --model (one point); use that.")
    parser.add_argument("--worker", nargs=6,
                        metavar=("ATTENTION", "RESOLUTION", "DEVICE", "BATCH", "BUDGET_S", "THREADS"),
                        required=True)
    sys.exit(_worker_main(parser.parse_args().worker))
