"""A MODEL (arithmetic, not a measurement) of context parallelism for the VVT-tiny-shaped backbone.

    python -m bench.cp_model            # markdown tables (the README's "Context parallelism" section)
    python -m bench.cp_model --json out.json
    python -m bench.cp_model --resolutions 224 1024 --gpus 8 64   # the README's table

Shapes are those of :mod:`bench.backbone` (stage dims 96 / 160 / 320 / 512, heads 1 / 2 / 5 / 8, depth 2,
sr_ratio 2, MLP ratios 8 / 8 / 4 / 4; stage s runs on a (R / 2^(s+2))^2 grid for an R x R image),
variant "sum" on a 2-d grid (F = 4 position features), one image per data-parallel replica.

Per attention layer and image:
- all-reduced bytes: S and z, H * (F * D * Dv + F * D) fp32 numbers, once forward and once backward
  (the same whatever the number of tokens or ranks);
- activation bytes per rank: q, k, v, o as saved for backward (bf16), N / p query and N / (4 p) key
  tokens (sr_ratio 2 reduces the key grid 4x);
- all-reduce time: a ring all-reduce moves 2 (p - 1) / p of the buffer through each rank's link, plus a
  fixed latency per call. ASSUMED links (not measured here): NVLink 4 (H100 SXM node, up to 8 GPUs):
  360 GB/s bus bandwidth, 10 us per all-reduce; InfiniBand NDR 400 Gb/s per GPU (p > 8, across nodes):
  45 GB/s, 30 us.
- compute time a rank saves: the block's training FLOPs (forward + backward = 3x forward: q / k / v /
  output projections, the sr_ratio convolution, the MLP and the attention's state and output passes)
  times (1 - 1/p), at an ASSUMED sustained 400 TFLOP/s bf16 per GPU (H100 SXM: 989 dense peak).
CP pays in time where a block's all-reduce time is below the compute it takes off a rank. CP is
needed for memory where one image's activations (the whole backbone's, a per-token estimate, in
bf16) exceed what one GPU holds: ASSUMED 80 GB less 10 GB for weights, optimizer and workspace.
"""
from __future__ import annotations

import argparse
import json

from .backbone import DEPTHS, EMBED_DIMS, MLP_RATIOS, NUM_HEADS, SR_RATIO

N_FEATURES = 4                  # variant "sum", 2-d grid, no prefix tokens
STATE_BYTES = 4                 # fp32 states
ACT_BYTES = 2                   # bf16 activations
RESOLUTIONS = (224, 512, 768, 1024)
GPU_COUNTS = (8, 16, 32, 64)
LINKS = {"NVLink": (360e9, 10e-6), "InfiniBand": (45e9, 30e-6)}   # ASSUMED (bus bytes/s, latency s)
FLOPS = 400e12                  # ASSUMED sustained bf16 FLOP/s per GPU
GPU_MEMORY = 70e9               # ASSUMED bytes for activations on an 80 GB GPU


def stage_shapes(resolution: int) -> list[dict]:
    """Tokens, heads and head dim of each stage's attention for an R x R image."""
    out = []
    for s, (dim, heads, depth, mlp) in enumerate(zip(EMBED_DIMS, NUM_HEADS, DEPTHS, MLP_RATIOS)):
        side = resolution // 2 ** (s + 2)
        out.append(dict(stage=s + 1, side=side, tokens=side * side, key_tokens=(side // SR_RATIO) ** 2,
                        dim=dim, heads=heads, head_dim=dim // heads, depth=depth, mlp=mlp))
    return out


def allreduce_bytes(st: dict) -> int:
    """S and z of one attention layer, one direction (forward or backward)."""
    D = st["head_dim"]
    return st["heads"] * (N_FEATURES * D * D + N_FEATURES * D) * STATE_BYTES


def qkvo_bytes_per_rank(st: dict, p: int) -> float:
    """q, o over the rank's N / p queries and k, v over its N / (4 p) keys, bf16."""
    return (2 * st["tokens"] + 2 * st["key_tokens"]) * st["dim"] * ACT_BYTES / p


def block_flops(st: dict) -> float:
    """Training FLOPs (forward + backward) of one block over the whole image."""
    N, Nk, C, D, H = st["tokens"], st["key_tokens"], st["dim"], st["head_dim"], st["heads"]
    proj = 2 * N * C * C * 2 + 2 * Nk * C * C * 2          # q and output projections; k and v
    conv = 2 * N * C * C                                     # sr_ratio x sr_ratio conv, stride sr_ratio
    mlp = 2 * N * C * C * st["mlp"] * 2
    attn = 2 * H * N_FEATURES * D * D * (N + Nk)             # state pass (keys) + output pass (queries)
    return 3 * (proj + conv + mlp + attn)


def block_activation_bytes(st: dict) -> float:
    """Saved activations of one block per image (a per-token estimate, bf16): LN inputs / outputs, q, o,
    the projection output, k, v on the reduced grid, the MLP's hidden layer before and after GELU."""
    N, Nk, C = st["tokens"], st["key_tokens"], st["dim"]
    return (N * C * (6 + 2 * st["mlp"]) + 2 * Nk * C) * ACT_BYTES


def allreduce_seconds(nbytes: float, p: int) -> float:
    bandwidth, latency = LINKS["NVLink" if p <= 8 else "InfiniBand"]
    return 2 * (p - 1) / p * nbytes / bandwidth + latency


def table(resolutions=RESOLUTIONS, gpu_counts=GPU_COUNTS) -> list[dict]:
    rows = []
    for R in resolutions:
        for st in stage_shapes(R):
            ar = allreduce_bytes(st)
            for p in gpu_counts:
                if st["tokens"] < p:
                    continue
                # one layer, forward + backward: two all-reduces
                t_ar = 2 * allreduce_seconds(ar, p)
                t_saved = block_flops(st) / FLOPS * (1 - 1 / p)
                rows.append(dict(resolution=R, **st, gpus=p, allreduce_bytes_per_layer=2 * ar,
                                 qkvo_bytes_per_rank=qkvo_bytes_per_rank(st, p),
                                 allreduce_us=t_ar * 1e6, compute_saved_us=t_saved * 1e6,
                                 pays_in_time=t_ar < t_saved))
    return rows


def memory_rows(resolutions=(224, 1024, 2048, 4096, 8192, 12288)) -> list[dict]:
    out = []
    for R in resolutions:
        total = sum(block_activation_bytes(st) * st["depth"] for st in stage_shapes(R))
        out.append(dict(resolution=R, activation_bytes=total, gpus_needed=max(1, -(-int(total) // int(GPU_MEMORY)))))
    return out


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def markdown(rows: list[dict], mem: list[dict]) -> str:
    lines = ["| image | stage | tokens | heads x D | GPUs | all-reduced / layer (fwd+bwd) | q,k,v,o / rank / layer "
             "| ratio | all-reduce | compute saved / block | CP pays in time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["allreduce_bytes_per_layer"] / r["qkvo_bytes_per_rank"]
        lines.append(f"| {r['resolution']}^2 | {r['stage']} | {r['side']}^2 | {r['heads']} x {r['head_dim']} "
                     f"| {r['gpus']} | {_fmt_bytes(r['allreduce_bytes_per_layer'])} "
                     f"| {_fmt_bytes(r['qkvo_bytes_per_rank'])} | {ratio:.2f} | {r['allreduce_us']:.0f} us "
                     f"| {r['compute_saved_us']:.0f} us | {'yes' if r['pays_in_time'] else 'no'} |")
    lines += ["", "| image | activations of one image (whole backbone, bf16, model) | GPUs for memory alone |",
              "|---|---|---|"]
    for m in mem:
        lines.append(f"| {m['resolution']}^2 | {_fmt_bytes(m['activation_bytes'])} | {m['gpus_needed']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Context-parallelism MODEL for the VVT-tiny-shaped backbone")
    parser.add_argument("--json", help="write the rows here as JSON")
    parser.add_argument("--resolutions", type=int, nargs="+", default=RESOLUTIONS, help="image sides")
    parser.add_argument("--gpus", type=int, nargs="+", default=GPU_COUNTS, help="context-parallel group sizes")
    args = parser.parse_args(argv)
    rows, mem = table(args.resolutions, args.gpus), memory_rows()
    print(markdown(rows, mem))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": True, "assumptions": {"links": LINKS, "flops": FLOPS, "gpu_memory": GPU_MEMORY},
                       "rows": rows, "memory": mem}, f, indent=1)


if __name__ == "__main__":
    main()
