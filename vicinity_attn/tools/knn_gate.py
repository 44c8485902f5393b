"""Ahead-of-time compile gate of the k-NN attention kernels (``vicinity_attn.kernels.knn``): no GPU needed.

    python -m vicinity_attn.tools.knn_gate            # every config a launch can pick
    python -m vicinity_attn.tools.knn_gate --quick    # covering subset (tests/test_knn_gate.py)

Compiles every k-NN kernel role (selection with the row recomputed / on chip, forward, row delta, dq,
dk+dv, dk only, dv only) for sm_80 and sm_90a, at every (dtype, head tile) config of
``kernels/knn/configs.py``, with the specialisation a real launch infers: 16-byte aligned pointers,
unit inner strides, and either "aligned" (head dims, token strides and lengths multiples of 16) or
"unaligned" (odd head dims: no divisibility) integer arguments. A row fails on a compile error,
any spill (stack bytes: the kernels have no local arrays) or a dot-bearing kernel without
tensor-core instructions. Kept apart from ``compile_gate`` (the vicinity kernels' gate) so either can
change alone; :func:`run_knn_gate` returns rows a combined gate can print.

Under TRITON_INTERPRET=1 the gate re-runs itself in a child process with the interpreter off.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

TARGETS = (80, 90)


@dataclass(frozen=True)
class KnnRole:
    name: str
    module: str
    kernel: str
    fixed: tuple = ()          # ((constexpr, value), ...)
    has_dot: bool = True


ROLES = (
    KnnRole("knn_select", "select", "knn_threshold_kernel", (("ROW_ON_CHIP", False),)),
    KnnRole("knn_select_chip", "select", "knn_threshold_kernel", (("ROW_ON_CHIP", True),)),
    KnnRole("knn_fwd", "forward", "knn_forward_kernel"),
    KnnRole("knn_delta", "backward", "row_delta_kernel", has_dot=False),
    KnnRole("knn_dq", "backward", "knn_dq_kernel"),
    KnnRole("knn_dkdv", "backward", "knn_dkdv_kernel", (("NEED_DK", True), ("NEED_DV", True))),
    KnnRole("knn_dk", "backward", "knn_dkdv_kernel", (("NEED_DK", True), ("NEED_DV", False))),
    KnnRole("knn_dv", "backward", "knn_dkdv_kernel", (("NEED_DK", False), ("NEED_DV", True))),
)
ROLE_BY_NAME = {r.name: r for r in ROLES}
STAT_PTRS = ("tau_ptr", "lse_ptr", "delta_ptr")     # the fp32 per-row state; other pointers: input dtype
UNIT_STRIDES = ("sqd", "skd", "svd", "sod", "sdd", "sgd", "skgd", "svgd")
UNSPECIALISED = ("n_heads", "topk")                 # arbitrary values: no divisibility assumed


@dataclass(frozen=True)
class KnnCase:
    role: str
    target: int
    dtype: str        # fp16 / bf16 / fp32
    tile: int         # head tile (D == Dv)
    aligned: bool

    def label(self) -> str:
        return f"{self.role} sm_{self.target}{'a' if self.target >= 90 else ''} {self.dtype} d{self.tile} " \
               f"{'aligned' if self.aligned else 'unaligned'}"


def _torch_dtype(name: str):
    import torch
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def build_cases(quick: bool) -> list[KnnCase]:
    """Full: every role x target x (dtype, head tile) x alignment. Quick: per role and target, fp16 at
    tile 64 (aligned), bf16 at 256 (unaligned) and fp32 at 128 (aligned; its 8-warp config)."""
    combos = ([("fp16", 64, True), ("bf16", 256, False), ("fp32", 128, True)] if quick else
              [(d, t, a) for d in ("fp16", "bf16", "fp32") for t in (16, 32, 64, 128, 256) for a in (True, False)])
    return [KnnCase(r.name, tg, d, t, a) for r in ROLES for tg in TARGETS for d, t, a in combos]


def _source(case: KnnCase):
    import importlib

    import triton
    from triton.compiler import ASTSource

    from ..kernels.knn.configs import gpu_config
    from ..kernels.knn.launch import selection_constexprs
    from ..kernels.runtime import pick_precision

    role = ROLE_BY_NAME[case.role]
    fn = getattr(importlib.import_module(f"vicinity_attn.kernels.knn.{role.module}"), role.kernel)
    if not isinstance(fn, triton.runtime.JITFunction):
        fn = triton.runtime.JITFunction(fn.fn)      # interpreted function: rebuild the jit object
    dtype = _torch_dtype(case.dtype)
    prec = pick_precision(dtype, interpret=False)
    cfg = gpu_config(case.tile, case.tile, dtype)
    constexprs = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, BLOCK_DV=cfg.block_dv, **cfg.chunks(),
                      ACC=prec.acc, DOT=prec.dot, PREC=prec.prec, **selection_constexprs(prec.acc), **dict(role.fixed))
    signature, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name], consts[(i,)] = "constexpr", constexprs[name]
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in STAT_PTRS else "*" + case.dtype
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "scale":
            signature[name] = "fp32"
        elif name in UNIT_STRIDES:
            signature[name], consts[(i,)] = "constexpr", 1
        else:
            signature[name] = "i32"
            if case.aligned and name not in UNSPECIALISED:
                attrs[(i,)] = [["tt.divisibility", 16]]
    missing = [n for n in fn.arg_names if n not in signature]
    assert not missing, missing
    stages = cfg.dkdv_num_stages if role.kernel == "knn_dkdv_kernel" else cfg.num_stages
    return ASTSource(fn, signature, consts, attrs), dict(num_warps=cfg.num_warps, num_stages=stages,
                                                         maxnreg=cfg.maxnreg)


def _nvidia_bin(tool: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def compile_case(case: KnnCase) -> dict:
    """Compile one case: registers, shared memory, spill bytes and tensor-core instruction counts."""
    import triton
    from triton.backends.compiler import GPUTarget

    row = dict(case=case, error=None)
    start = time.perf_counter()
    try:
        src, options = _source(case)
        triton.knobs.nvidia.dump_ptxas_log = True
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", case.target, 32), options=options)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a red row
        text = str(exc).strip()
        row["error"] = f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"
        return row
    row["seconds"] = time.perf_counter() - start
    row["smem"], row["warps"] = compiled.metadata.shared, options["num_warps"]
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log.getvalue())]
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        cubin = f.name
    try:
        usage = subprocess.run([_nvidia_bin("cuobjdump"), "--dump-resource-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_nvidia_bin("cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.remove(cubin)
    res = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
    row["regs"] = int(res.get("REG", -1))
    row["spill"] = max(spills + [int(res.get("STACK", 0)), int(res.get("LOCAL", 0))])
    row["hgmma"] = len(re.findall(r"\bHGMMA\.", sass))
    row["hmma"] = len(re.findall(r"\bHMMA\.", sass))
    return row


def row_failures(row: dict) -> list[str]:
    if row["error"]:
        return [row["error"]]
    problems = []
    if row["spill"] > 0:
        problems.append(f"{row['spill']} spill bytes")
    if ROLE_BY_NAME[row["case"].role].has_dot and row["hgmma"] + row["hmma"] == 0:
        problems.append("dots did not become tensor-core instructions")
    return problems


def format_table(rows: list[dict]) -> str:
    header = (f"{'kernel':<16} {'arch':<7} {'dtype':<5} {'tile':>4} {'ints':<9} {'warps':>5} {'regs':>4} "
              f"{'smem':>6} {'spill':>5} {'tensor-core (SASS)':<20} {'sec':>5}  status")
    lines = [header, "-" * len(header)]
    for row in rows:
        c = row["case"]
        arch = f"sm_{c.target}" + ("a" if c.target >= 90 else "")
        ints = "aligned" if c.aligned else "unaligned"
        if row["error"]:
            lines.append(f"{c.role:<16} {arch:<7} {c.dtype:<5} {c.tile:>4} {ints:<9} ERROR {row['error'][:120]}")
            continue
        tc = f"HGMMA x{row['hgmma']}" if row["hgmma"] else (f"HMMA x{row['hmma']}" if row["hmma"] else "-")
        if row["hgmma"] and row["hmma"]:
            tc += f" HMMA x{row['hmma']}"
        problems = row_failures(row)
        lines.append(f"{c.role:<16} {arch:<7} {c.dtype:<5} {c.tile:>4} {ints:<9} {row['warps']:>5} {row['regs']:>4} "
                     f"{row['smem']:>6} {row['spill']:>5} {tc:<20} {row['seconds']:>5.1f}  "
                     f"{'FAIL: ' + '; '.join(problems) if problems else 'ok'}")
    return "\n".join(lines)


def run_knn_gate(quick: bool = False, jobs: int | None = None, roles: tuple[str, ...] | None = None
                 ) -> tuple[list[dict], bool]:
    """Compile the matrix (in worker processes); returns the rows and whether all passed."""
    cases = [c for c in build_cases(quick) if roles is None or c.role in roles]
    jobs = jobs or max(1, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="knn_gate_cache_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache      # a private cache: ptxas really runs and reports
        if jobs == 1:
            rows = [compile_case(c) for c in cases]
        else:
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                rows = list(pool.map(compile_case, cases))
    return rows, all(not row_failures(r) for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="covering subset instead of the full matrix")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: all cores)")
    parser.add_argument("--roles", nargs="*", default=None, choices=[r.name for r in ROLES])
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "vicinity_attn.tools.knn_gate"] + (argv if argv is not None else sys.argv[1:])
        return subprocess.run(cmd, env=env).returncode
    start = time.perf_counter()
    rows, ok = run_knn_gate(args.quick, args.jobs, tuple(args.roles) if args.roles else None)
    print(format_table(rows))
    n_bad = sum(bool(row_failures(r)) for r in rows)
    print(f"\n{len(rows)} k-NN kernels compiled for sm_80 and sm_90a in {time.perf_counter() - start:.0f} s: "
          f"{'all ok (zero spills, tensor-core dots)' if ok else f'{n_bad} FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
