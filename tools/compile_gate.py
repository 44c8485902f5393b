"""Ahead-of-time compile gate for the Triton kernels: what a real launch compiles, read from its SASS.

    python -m tools.compile_gate                       # full matrix, every operation
    python -m tools.compile_gate --quick               # covering subset (tests/helpers.py)
    python -m tools.compile_gate --ops knn             # one operation's matrix (vicinity, knn,
                                                                     # vicinity_varlen, vicinity_causal)
    python -m tools.compile_gate --cases 'fp16 D40/40' # only the cases whose label matches
    python -m tools.compile_gate --roles 'output|keys' # only the kernels of the launch roles it matches
    python -m tools.compile_gate --json out.json --text out.txt

No GPU needed. One matrix per operation (MATRICES). Vicinity attention: dtype x head dims x layout x
aligned / unaligned strides at the base geometry; every geometry at one head dim; the clamp / floor
launches; the identity feature map; the GPU model's shapes. k-NN attention: dtype x head dims x layout x
strides at 197 tokens, 1024 tokens, the on-chip selection (16 keys) and the single-gradient dk / dv
passes (``knn_matrix``).
For every launch case the launchers themselves run on CPU tensors and Triton's own launch path binds
their arguments for sm_80 and sm_90a (``launch_capture``): the gate compiles exactly those
specialisations (the launchers' constexprs, num_warps / num_stages, the kernels'
``do_not_specialize``, and the divisibility / ==1 attributes Triton infers from the concrete pointers
and ints), each distinct one once.

Per compiled kernel it reports registers, shared memory, spill bytes, CTAs and warps per SM (sm_80 on
an A100, sm_90a on an H100, from registers, shared memory and warps against each chip's limits),
tensor-core instructions, the widths of global loads / stores and async copies (LDGSTS,
cp.async.bulk, TMA), and for the main loop (the innermost SASS loop, found from backward branches,
with the most tensor-core instructions) the SASS instructions per iteration and its memory forms.

Verdicts, per kernel:
  core       : compiles, zero spill bytes, dots became tensor-core instructions, fits on the chip.
  wide_tiles : only for kernels an aligned case launches (every pointer 16-byte aligned, every
               stride and head dim a multiple of 16): no global access narrower than 64 bits to a
               2-d tile (a tt.load / tt.store of rank >= 2 on that source line, per the TTGIR).
               1-d per-row vectors (den, row weights, z) are 32-bit by nature and not judged.
Exit status 0 when both verdicts pass everywhere, 1 otherwise; the table says which failed. Every
report says which kernels it describes (``source_stamp``: sha256 over kernels/**/*.py, the git commit,
whether the checkout had uncommitted changes).

Under TRITON_INTERPRET=1 interpreted kernels have no specialisation, so the gate re-runs itself in a
child process with the interpreter switched off. Fp64 is not built: the triton backend does not
run CUDA fp64 (backend "auto" sends it to the torch backend). Another operation joins the gate with a
matrix in MATRICES (its LaunchCases, ``op`` set) and its launchers and launch roles in
``launch_capture.OPERATIONS``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from .launch_capture import LaunchCase, capture, knn_settings

TARGETS = (80, 90)
ARCH_NAMES = {80: "sm_80", 90: "sm_90a"}
DTYPE_NAMES = ("fp16", "bf16", "fp32")
HEAD_DIMS = (16, 32, 40, 48, 64, 128, 256)
# Head dims that are not multiples of 16, beside 40 (every layout and stride mode above): the kernels
# specialise on a head dim only through its divisibility by 16 and the tile it picks, so with these any
# head dim 1..256 compiles to a kernel the gate builds (8: 16-wide tiles; 24: 32-wide at 4 warps; 56, 72,
# 200: the unaligned 32-wide tiles at 8 warps, one or several per head).
ODD_HEAD_DIMS = (8, 24, 56, 72, 200)
LAYOUTS = ("bhnd", "bnhd")
STRIDES = ("aligned", "unaligned")
BASE = LaunchCase()                       # bf16, D = Dv = 64, bhnd, aligned, B2 H2, sum on a 32 x 32 grid
# Every (variant, grid, prefix, feature map) whose code differs: number of axes, F, the prefix path.
GEOMETRIES = tuple(
    dict(variant=v, grid=g, n_prefix=p, feature_map="elu1" if p else "relu")
    for v in ("none", "sum", "product") for g in ((1024,), (32, 32), (8, 8, 16)) for p in (0, 1)
    if not (v == "none" and len(g) > 1))
# feature_map="identity" (FMAP 2: phi = x, phi' = 1) per dtype at the base case, and unaligned at D = 40 with a
# prefix; relu and elu1 are the GEOMETRIES' maps.
IDENTITY_CASES = tuple(LaunchCase(dtype=t, feature_map="identity") for t in ("fp16", "bf16", "fp32")) + (
    LaunchCase(dtype="fp16", d=40, dv=40, layout="bnhd", strides="unaligned", n_prefix=1, feature_map="identity"),)
# The most features a grid gives (product on a 3-d grid: F = 8; with prefix tokens F = 10, padded to 16), and the
# most the sum form gives (F = 6 on a 3-d grid: its dq pass holds other values), at every dtype x head dim x stride
# mode: the tiles and warps the configs pick for many features (fp32 state tiles, the dq pass's F state tiles,
# the resident passes).
WIDE_FEATURES = (dict(variant="sum", grid=(8, 8, 16)),
                 dict(variant="product", grid=(8, 8, 16)),
                 dict(variant="product", grid=(8, 8, 16), n_prefix=1, feature_map="elu1"))
# The GPU model's shapes (bench/gpu_model.py), so the model reads kernels the gate has built.
MODEL_CASES = (
    LaunchCase(dtype="bf16", d=48, dv=48, batch=32, heads=1, grid=(56, 56)),
    LaunchCase(dtype="bf16", d=64, dv=64, batch=1, heads=4, grid=(224, 224)),
    LaunchCase(dtype="bf16", d=32, dv=32, batch=8, heads=8, grid=(14, 14)),
)


@dataclass(frozen=True)
class Chip:
    """Per-SM limits used for occupancy (CUDA occupancy rules: registers allocated per warp in units
    of 256, shared memory per CTA plus 1 KB the runtime reserves)."""

    name: str
    sms: int
    regs: int = 65536
    max_warps: int = 64
    max_ctas: int = 32
    smem_per_sm: int = 0
    smem_per_cta: int = 0
    reserved_smem: int = 1024


CHIPS = {80: Chip("A100", 108, smem_per_sm=167936, smem_per_cta=166912),
         90: Chip("H100", 132, smem_per_sm=233472, smem_per_cta=232448)}


def occupancy(regs: int, smem: int, warps: int, chip: Chip) -> dict:
    """CTAs and warps per SM for a kernel using ``regs`` per thread, ``smem`` bytes per CTA."""
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (chip.regs // 4 // regs_per_warp) * 4 // warps     # 4 sub-partitions of 16K registers
    by_smem = chip.smem_per_sm // (smem + chip.reserved_smem) if smem <= chip.smem_per_cta else 0
    by_warps = chip.max_warps // warps
    ctas = min(by_regs, by_smem, by_warps, chip.max_ctas)
    limiter = min((("registers", by_regs), ("shared memory", by_smem), ("warps", by_warps),
                   ("CTA slots", chip.max_ctas)), key=lambda kv: kv[1])[0]
    return dict(chip=chip.name, ctas=ctas, warps=ctas * warps, limiter=limiter)


# ------------------------------------------------------------------------------------------------
# The matrix

# The VVT clamp and the L2ViT floor (their extra launches and the clamped output epilogue).
CLAMP_CASE = LaunchCase(op="vicinity_clamp", extra=(("den_floor", 1.0), ("clamp", (1e-4, 1e4))))
# No dq wanted: the row weights take their own launch (otherwise the dq pass computes them).
NO_DQ = (("grads", "kv"),)


def vicinity_matrix(quick: bool) -> list[LaunchCase]:
    """Full: every dtype x head dim (D = Dv) x layout x stride mode at the base geometry (and without
    dq, for the row-weights launch: every dtype x head dim x stride mode), every dtype x odd head dim
    (ODD_HEAD_DIMS) contiguous, every geometry at the base dtype / head dim, the most features (WIDE_FEATURES) at
    every dtype x head dim (odd ones too) x stride mode, and the GPU model's shapes
    (which reach the multi-chunk reduction and the single-chunk path), and the identity feature map
    (IDENTITY_CASES). Quick: three cases covering the three dtypes, the three feature maps, both layouts,
    both stride modes, an unaligned head dim and the geometry extremes, the clamp, and the base case
    without dq."""
    if quick:
        return [BASE, LaunchCase(extra=NO_DQ),
                LaunchCase(dtype="fp16", d=40, dv=40, layout="bnhd", strides="unaligned", grid=(8, 8, 16),
                           variant="product", feature_map="elu1", n_prefix=1),
                LaunchCase(dtype="fp32", d=32, dv=32, grid=(1024,), variant="none", feature_map="identity"),
                CLAMP_CASE]
    cases = [LaunchCase(dtype=t, d=d, dv=d, layout=lay, strides=st)
             for t in DTYPE_NAMES for d in HEAD_DIMS for lay in LAYOUTS for st in STRIDES]
    cases += [LaunchCase(dtype=t, d=d, dv=d) for t in DTYPE_NAMES for d in ODD_HEAD_DIMS]
    cases += [LaunchCase(dtype=t, d=d, dv=d, strides=st, extra=NO_DQ) for t in DTYPE_NAMES for d in HEAD_DIMS
              for st in STRIDES]
    cases += [LaunchCase(**g) for g in GEOMETRIES]
    cases += [LaunchCase(dtype=t, d=d, dv=d, strides=st, **g) for g in WIDE_FEATURES for t in DTYPE_NAMES
              for d in HEAD_DIMS + ODD_HEAD_DIMS for st in STRIDES]
    cases += [LaunchCase(dtype=t, op="vicinity_clamp", extra=CLAMP_CASE.extra) for t in DTYPE_NAMES]
    return cases + list(IDENTITY_CASES) + list(MODEL_CASES)


KNN_TOKENS = 197            # DeiT's token count (a typical k-NN call; not a multiple of 16, as most)
KNN_ALIGNED_TOKENS = 1024   # a multiple of 16: the token counts specialise (k-NN kernels are plain triton.jit)
KNN_ROW_ON_CHIP_KEYS = 16   # fits every config's key tile: the selection pass keeps the row on chip


def knn_case(**kw) -> LaunchCase:
    return LaunchCase(op="knn", variant="none", **{"grid": (KNN_TOKENS,), **kw})


def knn_matrix(quick: bool) -> list[LaunchCase]:
    """k-NN attention. Full: every dtype x head dim (D = Dv) x layout x stride mode at 197 tokens; at
    1024 tokens (token counts divisible by 16) per dtype x head dim; the selection pass with the row on
    chip (16 keys) and the single-gradient dk / dv passes (grads "qk", "v") per dtype x head dim x
    stride mode. Quick: four cases covering every role, the three dtypes, both stride modes, both
    selection paths, an unaligned head dim and 64- / 128- / 256-wide head tiles."""
    if quick:
        return [knn_case(dtype="fp16", d=64, dv=64),
                knn_case(dtype="bf16", d=256, dv=256, strides="unaligned", extra=(("grads", "qk"),)),
                knn_case(dtype="fp32", d=128, dv=128, extra=(("n_keys", KNN_ROW_ON_CHIP_KEYS), ("grads", "v"))),
                knn_case(dtype="fp32", d=40, dv=40, layout="bnhd", strides="unaligned")]
    cases = [knn_case(dtype=t, d=d, dv=d, layout=lay, strides=st)
             for t in DTYPE_NAMES for d in HEAD_DIMS for lay in LAYOUTS for st in STRIDES]
    cases += [knn_case(dtype=t, d=d, dv=d, grid=(KNN_ALIGNED_TOKENS,)) for t in DTYPE_NAMES for d in HEAD_DIMS]
    cases += [knn_case(dtype=t, d=d, dv=d, strides=st, extra=extra)
              for t in DTYPE_NAMES for d in HEAD_DIMS for st in STRIDES
              for extra in ((("n_keys", KNN_ROW_ON_CHIP_KEYS),), (("grads", "qk"),), (("grads", "v"),))]
    return cases


def varlen_matrix(quick: bool) -> list[LaunchCase]:
    """Packed sequences (``vicinity_attention_varlen``: the VARLEN=True launches of the vicinity kernels),
    three sequences of mixed sizes per case (launch_capture._run_vicinity_varlen). Full: the three
    dtypes, 40- / 48- / 64- / 128-wide heads, both stride modes, 1-d / 2-d / 3-d, every variant, prefix
    tokens, multi-chunk state passes, the clamp and floor, the identity feature map. Quick: none (not in
    CI's quick gate; run ``--ops vicinity_varlen``)."""
    if quick:
        return []
    varlen = lambda **kw: LaunchCase(op="vicinity_varlen", batch=3, **kw)  # noqa: E731
    return [varlen(),
            varlen(dtype="fp16", d=40, dv=40, strides="unaligned", grid=(8, 8, 16), variant="product",
                   feature_map="elu1", n_prefix=1),
            varlen(dtype="fp32", d=32, dv=32, grid=(4096,), variant="none"),
            varlen(dtype="bf16", d=128, dv=128, strides="unaligned", grid=(32, 32)),
            varlen(dtype="fp16", d=64, dv=64, grid=(16, 16, 4), n_prefix=4),
            varlen(dtype="fp32", d=48, dv=48, grid=(24, 40), variant="product"),
            varlen(dtype="fp16", d=64, dv=64, feature_map="identity"),
            varlen(extra=NO_DQ),
            varlen(dtype="fp16", d=40, dv=40, strides="unaligned", extra=NO_DQ),
            LaunchCase(op="vicinity_varlen_clamp", batch=3, extra=CLAMP_CASE.extra)]


CAUSAL_GRID = (4, 16, 16)           # frames along the first axis
CAUSAL_HEAD_DIMS = (16, 32, 40, 64, 128, 256)


def causal_matrix(quick: bool) -> list[LaunchCase]:
    """Frame-causal calls (``causal="frames"``, launch_capture._run_vicinity_causal), labelled "vicinity_causal"
    (``--cases causal`` selects them). Full: every dtype x head dim (40: bnhd, unaligned) on a 4 x 16 x 16 video
    grid; odd head dims; every variant, 2-d and 3-d grids, prefix tokens; the clamp and floor per dtype; no dq;
    a window from frame 2 (init and carry_grad); the GPU model's video shape (B1 H8 16 x 32 x 32 D64 bf16).
    Quick: none (not in CI's quick gate; run ``--ops vicinity_causal`` or ``--cases causal``)."""
    if quick:
        return []
    causal = lambda **kw: LaunchCase(op="vicinity_causal", **{"grid": CAUSAL_GRID, **kw})  # noqa: E731
    cases = [causal(dtype=t, d=d, dv=d, **(dict(layout="bnhd", strides="unaligned") if d == 40 else {}))
             for t in DTYPE_NAMES for d in CAUSAL_HEAD_DIMS]
    cases += [causal(dtype=t, d=d, dv=d) for t in DTYPE_NAMES for d in (8, 24, 72)]
    cases += [causal(variant="product", grid=(4, 8, 8), n_prefix=1, feature_map="elu1"),
              causal(variant="none", n_prefix=1, feature_map="elu1"),
              causal(grid=(8, 64), n_prefix=2, feature_map="identity"),
              causal(variant="product", grid=(8, 64))]
    cases += [causal(dtype=t, extra=CLAMP_CASE.extra) for t in DTYPE_NAMES]
    cases += [causal(dtype=t, extra=NO_DQ) for t in DTYPE_NAMES]
    cases += [causal(extra=(("start", 2),)), causal(dtype="fp32", d=32, dv=32, extra=(("start", 2),))]
    return cases + [causal(batch=1, heads=8, grid=(16, 32, 32))]


# Extension point: one matrix per operation (its launchers are registered in launch_capture.OPERATIONS).
MATRICES = {"vicinity": vicinity_matrix, "knn": knn_matrix, "vicinity_varlen": varlen_matrix,
            "vicinity_causal": causal_matrix}
MATRIX_OF_OP = {"vicinity": "vicinity", "vicinity_clamp": "vicinity", "knn": "knn",   # LaunchCase.op -> matrix
                "vicinity_varlen": "vicinity_varlen", "vicinity_varlen_clamp": "vicinity_varlen",
                "vicinity_causal": "vicinity_causal"}


def build_matrix(quick: bool, ops: tuple[str, ...] | None = None, pattern: str | None = None) -> list[LaunchCase]:
    """The launch cases of the matrices ``ops`` (default: all of MATRICES), duplicates dropped (order
    kept); with ``pattern`` (a regular expression) only the cases whose label it matches."""
    seen, out = set(), []
    for name in (ops or tuple(MATRICES)):
        for c in MATRICES[name](quick):
            if c not in seen and (pattern is None or re.search(pattern, c.label())):
                seen.add(c)
                out.append(c)
    return out


@dataclass
class Job:
    """One distinct specialisation of one kernel for one target, and every launch that uses it."""

    module: str
    kernel: str
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    roles: set = field(default_factory=set)
    cases: list = field(default_factory=list)

    @property
    def key(self) -> tuple:
        return (self.module, self.kernel, self.arch, repr(sorted(self.signature.items())),
                repr(sorted(self.constexprs.items())), repr(sorted(self.attrs.items())),
                repr(sorted((k, repr(v)) for k, v in self.options.items())))

    def constexpr(self, name: str):
        names = list(self.signature)
        return self.constexprs.get((names.index(name),)) if name in names else None

    def describe(self) -> dict:
        """Arguments the launch left as runtime values without a divisibility hint (the ones a
        specialisation would change), and the io dtype."""
        names = list(self.signature)
        hinted = {names[k[0]] for k, v in self.attrs.items() if v}
        ptr_types = [t for t in self.signature.values() if t.startswith("*") and t not in ("*fp32", "*i32")]
        return dict(dtype=(ptr_types[0][1:] if ptr_types else "fp32"),
                    unhinted=[n for n, t in self.signature.items() if t in ("i32", "i64") and n not in hinted],
                    unaligned_ptrs=[n for n, t in self.signature.items() if t.startswith("*") and n not in hinted])


def collect_jobs(cases: list[LaunchCase], archs=TARGETS) -> tuple[list[Job], dict]:
    """Capture every case's launches and group them into distinct compile jobs.
    Returns (jobs, {case label: [(role, job index, grid), ...]})."""
    jobs: dict[tuple, Job] = {}
    index: dict[tuple, int] = {}
    plan = {}
    for case in cases:
        entries = []
        for arch, launches in capture(case, archs).items():
            for launch in launches:
                sig, consts, attrs, opts = launch.spec[arch]
                job = Job(launch.module, launch.kernel, arch, sig, consts, attrs, opts)
                if job.key not in jobs:
                    jobs[job.key] = job
                    index[job.key] = len(index)
                job = jobs[job.key]
                job.roles.add(launch.role)
                if case not in job.cases:
                    job.cases.append(case)
                entries.append((launch.role, arch, index[job.key], launch.grid))
        plan[case] = entries
    return list(jobs.values()), plan


# ------------------------------------------------------------------------------------------------
# Compiling one job

def _jit_function(module: str, name: str):
    import importlib

    import triton
    fn = getattr(importlib.import_module(module), name)
    return fn if isinstance(fn, triton.runtime.JITFunction) else triton.runtime.JITFunction(fn.fn)


def compile_job(job: Job) -> dict:
    """Compile one job; returns its measurements (``error`` set on failure)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .sass import analyse, nvidia_bin

    row = dict(error=None)
    start = time.perf_counter()
    try:
        fn = _jit_function(job.module, job.kernel)
        triton.knobs.nvidia.dump_ptxas_log = True
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, job.signature, job.constexprs, job.attrs),
                                      target=GPUTarget("cuda", job.arch, 32), options=dict(job.options))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a red row
        msg = str(exc).strip()
        row["error"] = f"{type(exc).__name__}: {msg.splitlines()[-1] if msg else ''}"
        return row
    row["seconds"] = round(time.perf_counter() - start, 2)
    row["smem"] = int(compiled.metadata.shared)
    row["warps"] = int(job.options["num_warps"])
    row["stages"] = int(job.options["num_stages"])
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        path = f.name
    try:
        usage = subprocess.run([nvidia_bin("cuobjdump"), "--dump-resource-usage", path],
                               capture_output=True, text=True, check=True).stdout
    finally:
        os.remove(path)
    res = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
    row["regs"] = int(res.get("REG", -1))
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log.getvalue())]
    # The kernels use no local arrays or calls: any stack / local memory is a spill.
    row["spill"] = max(spills + [int(res.get("STACK", 0)), int(res.get("LOCAL", 0))])
    row["has_dot"] = bool(re.search(r"\btt\.dot\b", compiled.asm["ttir"]))
    row["sass"] = analyse(compiled.asm["cubin"], compiled.asm["ttgir"])
    row["occupancy"] = occupancy(row["regs"], row["smem"], row["warps"], CHIPS[job.arch])
    return row


def verdicts(job: Job, row: dict) -> dict:
    """{"core": [problems], "wide_tiles": [problems] or None when no aligned case uses the kernel}."""
    if row["error"]:
        return dict(core=[row["error"]], wide_tiles=None)
    core = []
    if row["spill"] > 0:
        core.append(f"{row['spill']} spill bytes")
    if row["has_dot"] and row["sass"]["kernel"]["tensor_core"] == 0:
        core.append("dots did not become tensor-core instructions")
    if row["occupancy"]["ctas"] < 1:
        core.append(f"does not fit on an {row['occupancy']['chip']} SM")
    wide = None
    if any(c.aligned for c in job.cases):
        narrow = row["sass"]["kernel"]["narrow_tile_accesses"]
        wide = [f"sub-64-bit tile access {a}" for a in narrow]
    return dict(core=core, wide_tiles=wide)


def run_gate(cases: list[LaunchCase], jobs_n: int | None = None,
             roles: str | None = None) -> tuple[list[Job], list[dict], dict]:
    """Capture, compile every distinct job (in parallel worker processes); returns jobs, rows, plan.
    ``roles`` (a regular expression): only the jobs with a launch role it matches (and their plan entries)."""
    jobs, plan = collect_jobs(cases)
    if roles is not None:
        kept = [i for i, j in enumerate(jobs) if any(re.search(roles, r) for r in j.roles)]
        new = {old: i for i, old in enumerate(kept)}
        jobs = [jobs[i] for i in kept]
        plan = {c: [(r, a, new[j], g) for r, a, j, g in entries if j in new] for c, entries in plan.items()}
    workers = jobs_n or max(1, os.cpu_count() or 1)
    # A private cache: every job really compiles, so ptxas runs and its spill report is complete.
    with tempfile.TemporaryDirectory(prefix="vicinity_gate_cache_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        if workers == 1:
            rows = [compile_job(j) for j in jobs]
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                rows = list(pool.map(compile_job, jobs, chunksize=1))
    for job, row in zip(jobs, rows):
        row["verdicts"] = verdicts(job, row)
    return jobs, rows, plan


# ------------------------------------------------------------------------------------------------
# Report

def _widths(d: dict) -> str:
    return " ".join(f"{k}x{v}" for k, v in sorted(d.items(), key=lambda kv: -int(kv[0].split(".")[-1]))) or "-"


def _cases_summary(cases: list[LaunchCase]) -> str:
    heads = sorted({c.d for c in cases})
    lay = "/".join(sorted({c.layout for c in cases}))
    st = "/".join(sorted({c.strides[0] for c in cases}))   # a(ligned) / u(naligned)
    if all(c.op == "knn" for c in cases):       # token / key counts instead of a geometry
        counts = sorted({(c.n_tokens, knn_settings(c)[0]) for c in cases})
        geo_s = ",".join(f"N{n}" + (f"k{nk}" if nk != n else "") for n, nk in counts)
        return f"D{','.join(map(str, heads))} {lay} {st} {geo_s}"
    geo = sorted({f"{c.variant}{len(c.grid)}d{'+p' if c.n_prefix else ''}" for c in cases})
    geo_s = geo[0] if len(geo) == 1 else f"{len(geo)} geoms"
    return f"D{','.join(map(str, heads))} {lay} {st} {geo_s}"


def _tile(job: Job) -> str:
    """The head tile of a kernel (BLOCK_D; a k-NN row-dot tile is BLOCK_K x N_K; BLOCK for the reduction)."""
    for name in ("BLOCK_D", "BLOCK"):
        if job.constexpr(name):
            return str(job.constexpr(name))
    if job.constexpr("BLOCK_K") and job.constexpr("N_K"):
        return str(job.constexpr("BLOCK_K") * job.constexpr("N_K"))
    return str(job.constexpr("BLOCK_DV") or "-")


def _status(v: dict) -> str:
    if v["core"]:
        return "FAIL core: " + "; ".join(v["core"])
    if v["wide_tiles"]:
        return f"FAIL wide_tiles: {len(v['wide_tiles'])} narrow ({v['wide_tiles'][0].split(' ')[-1]}...)"
    return "ok" if v["wide_tiles"] is not None else "ok (unaligned: wide_tiles not judged)"


def format_table(jobs: list[Job], rows: list[dict]) -> str:
    header = (f"{'roles':<26} {'arch':<6} {'dt':<4} {'tile':>5} {'w':>2} {'st':>2} {'cases':<34} {'reg':>3} "
              f"{'smem':>6} {'spl':>3} {'CTA/SM':>6} {'TC':>4} {'loads':<16} {'stores':<12} {'async':<18} "
              f"{'loop i/it':>9} {'loop loads':<14} {'loop TC':>7} {'loop STS':<12}  status")
    lines = [header, "-" * len(header)]
    order = sorted(range(len(jobs)), key=lambda i: (sorted(jobs[i].roles)[0], jobs[i].arch,
                                                    jobs[i].describe()["dtype"], str(jobs[i].constexpr("BLOCK_D"))))
    for i in order:
        job, row = jobs[i], rows[i]
        roles = ",".join(sorted(job.roles))
        desc = job.describe()
        tile = _tile(job)
        head = (f"{roles:<26.26} {ARCH_NAMES[job.arch]:<6} {desc['dtype']:<4} {tile:>5} "
                f"{job.options['num_warps']:>2} {job.options['num_stages']:>2} {_cases_summary(job.cases):<34.34}")
        if row["error"]:
            lines.append(f"{head} ERROR {row['error'][:150]}")
            continue
        k, m, occ = row["sass"]["kernel"], row["sass"]["main_loop"], row["occupancy"]
        if m:
            loads = _widths(m["loads"]) + (" +" + _widths(m["async_copies"]) if m["async_copies"] else "")
            loop = f"{m['instructions']:>9} {loads:<14.14} {m['tensor_core']:>7} {_widths(m['shared_stores']):<12.12}"
        else:
            loop = f"{'no loop':>9} {'':<14} {'':>7} {'':<12}"
        lines.append(f"{head} {row['regs']:>3} {row['smem']:>6} {row['spill']:>3} "
                     f"{str(occ['ctas']) + '/' + str(occ['warps']):>6} {k['tensor_core']:>4} "
                     f"{_widths(k['loads']):<16.16} {_widths(k['stores']):<12.12} "
                     f"{_widths(k['async_copies']):<18.18} {loop}  {_status(row['verdicts'])}")
    return "\n".join(lines)


def summary(rows: list[dict]) -> dict:
    core_bad = sum(bool(r["verdicts"]["core"]) for r in rows)
    judged = [r for r in rows if r["verdicts"]["wide_tiles"] is not None]
    wide_bad = sum(bool(r["verdicts"]["wide_tiles"]) for r in judged)
    return dict(kernels=len(rows), core_failures=core_bad, wide_tiles_judged=len(judged), wide_tiles_failures=wide_bad,
                core_ok=core_bad == 0, wide_tiles_ok=wide_bad == 0)


def _json_value(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (list, tuple, set)):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    return str(v)


def to_json(jobs, rows, plan, args_line: str, seconds: float, stamp: dict) -> dict:
    import torch
    import triton
    records = []
    for job, row in zip(jobs, rows):
        names = list(job.signature)
        records.append(dict(
            kernel=job.kernel, module=job.module, arch=ARCH_NAMES[job.arch], roles=sorted(job.roles),
            dtype=job.describe()["dtype"], num_warps=job.options["num_warps"], num_stages=job.options["num_stages"],
            constexprs={names[k[0]]: _json_value(v) for k, v in job.constexprs.items()},
            divisible_by_16=sorted(names[k[0]] for k, v in job.attrs.items() if v),
            unhinted_ints=job.describe()["unhinted"], unaligned_ptrs=job.describe()["unaligned_ptrs"],
            cases=[c.label() for c in job.cases], aligned=any(c.aligned for c in job.cases),
            **{k: _json_value(v) for k, v in row.items()}))
    return dict(command=f"python -m tools.compile_gate {args_line}".strip(),
                triton=triton.__version__, torch=torch.__version__, python=platform.python_version(), source=stamp,
                seconds=round(seconds, 1), summary=summary(rows), kernels=records,
                plan={c.label(): [dict(role=r, arch=ARCH_NAMES[a], kernel_index=j, grid=list(g))
                                  for r, a, j, g in entries] for c, entries in plan.items()})


def source_stamp() -> dict:
    """Which kernels a report describes: sha256 over the kernel sources (``kernels/**/*.py``, each file's
    path relative to ``kernels/`` and its bytes, in path order), the git commit of the checkout they
    were read from, and whether kernels/ or vicinity_attn/ differed from that commit."""
    import hashlib
    import pathlib

    from vicinity_attn import kernels
    root = pathlib.Path(kernels.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    stamp = dict(kernels_sha256=digest.hexdigest(), git_commit=None, git_dirty=None)
    repo = root.parent
    try:
        git = ["git", "-C", str(repo)]
        stamp["git_commit"] = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,
                                             check=True).stdout.strip()
        stamp["git_dirty"] = bool(subprocess.run(git + ["status", "--porcelain", "--", "kernels", "vicinity_attn"],
                                                 capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        pass    # not a git checkout (an installed wheel): the digest still identifies the kernels
    return stamp


def stamp_line(stamp: dict) -> str:
    commit = (stamp["git_commit"] or "unknown")[:12] + ("+uncommitted changes" if stamp["git_dirty"] else "")
    return f"kernels sha256 {stamp['kernels_sha256'][:16]} (sha256 over kernels/**/*.py), git {commit}"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="covering subset instead of the full matrix")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: all cores)")
    parser.add_argument("--json", default=None, help="write the full report as JSON here")
    parser.add_argument("--text", default=None, help="write the table here as well")
    parser.add_argument("--ops", nargs="+", choices=list(MATRICES), default=None,
                        help="operations whose matrices to build (default: all)")
    parser.add_argument("--cases", default=None, metavar="REGEX",
                        help="only the cases whose label matches (e.g. 'fp16 D40/40 .* unaligned')")
    parser.add_argument("--roles", default=None, metavar="REGEX",
                        help="only the kernels with a launch role it matches (re.search: 'state' matches "
                             "fwd_state and bwd_state)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if _interpreting():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "tools.compile_gate", *argv], env=env).returncode
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # triton 3.9's default, stated (silences a warning)
    import triton
    start = time.perf_counter()
    stamp = source_stamp()
    cases = build_matrix(args.quick, tuple(args.ops) if args.ops else None, args.cases)
    if not cases:
        parser.error(f"no case of {args.ops or list(MATRICES)} matches --cases {args.cases!r}")
    jobs, rows, plan = run_gate(cases, args.jobs, args.roles)
    if not jobs:
        parser.error(f"no kernel of those cases has a launch role matching --roles {args.roles!r}")
    seconds = time.perf_counter() - start
    s = summary(rows)
    table = format_table(jobs, rows)
    ops = ", ".join(sorted({MATRIX_OF_OP.get(c.op, c.op) for c in cases}))
    foot = (f"\ntriton {triton.__version__}: {len(cases)} launch cases ({ops}) -> {s['kernels']} distinct kernels "
            f"compiled for sm_80 / sm_90a in {seconds:.0f} s.\n{stamp_line(stamp)}\n"
            f"core       (compiles, zero spills, tensor-core dots, fits): "
            f"{'ok' if s['core_ok'] else str(s['core_failures']) + ' FAILED'}\n"
            f"wide_tiles (aligned cases: no sub-64-bit tile access): "
            f"{'ok' if s['wide_tiles_ok'] else str(s['wide_tiles_failures']) + ' FAILED'} "
            f"({s['wide_tiles_judged']} kernels judged)\n"
            "columns: tile = head tile (BLOCK_D; BLOCK for the reduction), w = warps, st = stages, cases = head dims / "
            "layouts / a(ligned) u(naligned) / geometries (k-NN: N query tokens, kM keys when not N) that launch it, "
            "CTA/SM = CTAs/warps per SM (sm_80 on A100, "
            "sm_90a on H100), TC = tensor-core instructions, loads/stores = global access width (bits) x count, "
            "loop = main loop: SASS instructions per iteration, its loads, its TC instructions, its shared stores "
            "(STS: bits x count)")
    print(table + "\n" + foot)
    arg_line = " ".join(argv)   # the command that reproduces this report (written into it)
    if args.text:
        with open(args.text, "w") as f:
            f.write(f"$ python -m tools.compile_gate {arg_line}".rstrip() + f"    # triton {triton.__version__}\n"
                    f"# {stamp_line(stamp)}\n" + table + "\n" + foot + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(jobs, rows, plan, arg_line, seconds, stamp), f, separators=(",", ":"))  # ~1 MB in full
    return 0 if s["core_ok"] and s["wide_tiles_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
