"""Ahead-of-time compile gate for the Triton kernels: no GPU needed.

    python -m vicinity_attn.tools.compile_gate            # full matrix (every config the launchers can pick)
    python -m vicinity_attn.tools.compile_gate --quick    # covering subset (used by tests/test_compile_gate.py)

Compiles every kernel role (forward state pass, output pass; backward row weights, dq, state
gradients, dv, dk; the chunk reduction) for sm_80 and sm_90a with the specialisation a real launch
infers (16-byte divisible pointers and outer strides, unit innermost strides), at every head tile
the launchers pick (16 / 32 / 64, with their warp counts), in fp16, bf16 and fp32, and over every
variant x number of axes x prefix-token combination. Prints one row per compiled kernel: registers,
shared memory, stack bytes (spills: the kernels use no local arrays, so any stack is a spill), and
the tensor-core instructions found in the SASS (HMMA on sm_80, HGMMA = wgmma on sm_90a). Exits 1 on
any compile error, any spill, or a dot-bearing kernel without tensor-core instructions.

Under TRITON_INTERPRET=1 ``triton.jit`` builds interpreted functions that cannot be compiled, so the
gate re-runs itself in a child process with the interpreter switched off.
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
DTYPES = ("fp16", "bf16", "fp32")
# (variant, n_axes) pairs whose code differs; "none" does not depend on the axes.
GEOMETRIES = (("none", 1), ("sum", 1), ("sum", 2), ("sum", 3), ("product", 1), ("product", 2), ("product", 3))
BASE_GEOMETRY = ("sum", 2, False, "relu")   # the paper's setting: 2-d grid, sum of cosines


@dataclass(frozen=True)
class Role:
    """One launch site: the kernel, its fixed constexprs, and which pointers hold the input dtype."""

    name: str
    module: str
    kernel: str
    fixed: tuple          # ((constexpr name, value), ...)
    io_ptrs: tuple        # pointer args in the input dtype; the others are fp32 (states, den, ...)
    has_dot: bool = True
    uses_geometry: bool = True
    all_geometries: bool = True   # False: the base geometry only (code that does not depend on it)


ROLES = (
    Role("fwd_state", "state", "state_partial_kernel", (("IS_QUERY", False), ("ROW_WEIGHTS", False)),
         ("x_ptr", "y_ptr")),
    Role("fwd_output", "contract", "contract_d_kernel", (("IS_QUERY", True), ("WITH_DEN", True), ("CLAMP", False)),
         ("x_ptr", "out_ptr")),
    Role("bwd_row_weights", "contract", "row_weights_kernel", (), ("do_ptr", "o_ptr"), has_dot=False,
         uses_geometry=False),
    Role("bwd_dq", "contract", "contract_dv_kernel", (("IS_QUERY", True), ("ROW_WEIGHTS", True)),
         ("x_ptr", "y_ptr", "out_ptr")),
    Role("bwd_state", "state", "state_partial_kernel", (("IS_QUERY", True), ("ROW_WEIGHTS", True)),
         ("x_ptr", "y_ptr")),
    Role("bwd_dv", "contract", "contract_d_kernel", (("IS_QUERY", False), ("WITH_DEN", False), ("CLAMP", False)),
         ("x_ptr", "out_ptr")),
    Role("bwd_dk", "contract", "contract_dv_kernel", (("IS_QUERY", False), ("ROW_WEIGHTS", False)),
         ("x_ptr", "y_ptr", "out_ptr")),
    Role("chunk_reduce", "state", "chunk_reduce_kernel", (), (), has_dot=False, uses_geometry=False),
    # The VVT clamp (clamp=...): the output pass's clamped epilogue, the clamped row weights and the
    # elementwise state kernels.
    Role("fwd_output_clamp", "contract", "contract_d_kernel", (("IS_QUERY", True), ("WITH_DEN", True), ("CLAMP", True)),
         ("x_ptr", "out_ptr"), all_geometries=False),
    Role("bwd_row_weights_clamp", "clamp", "clamped_row_weights_kernel", (), ("do_ptr", "g_ptr"), has_dot=False,
         uses_geometry=False),
    Role("clamp_states", "clamp", "state_clamp_kernel", (), (), has_dot=False, uses_geometry=False),
    Role("clamp_grad_mask", "clamp", "state_grad_mask_kernel", (), (), has_dot=False, uses_geometry=False),
)
ELEMENTWISE_ROLES = ("chunk_reduce", "clamp_states", "clamp_grad_mask")   # BLOCK-only, fp32, no head tile
ROLE_BY_NAME = {r.name: r for r in ROLES}
INNER_STRIDES = ("sxd", "syd", "sod", "sgd")   # unit strides: a real launch makes them constexpr 1


@dataclass(frozen=True)
class Case:
    role: str
    target: int
    dtype: str
    tile: int
    geometry: tuple = BASE_GEOMETRY   # (variant, n_axes, has_prefix, feature_map)

    def label(self) -> str:
        if not ROLE_BY_NAME[self.role].uses_geometry:
            return "-"
        variant, n_axes, prefix, fmap = self.geometry
        return f"{variant}-{n_axes}d{'+prefix' if prefix else ''}/{fmap}"


def build_cases(quick: bool) -> list[Case]:
    """The compile matrix. Full: every role x target x dtype x head tile the launchers can pick on the
    base geometry, plus every geometry (variant x axes x prefix; elu1 with prefix, relu without) at
    the largest tile in bf16. Quick: the smallest and largest tile per dtype family and the geometry
    extremes (the largest F, the smallest, the 3-d sum)."""
    from ..kernels.vicinity.configs import gpu_tiles

    if quick:
        dtype_tiles = [("fp16", 16), ("fp16", 64), ("bf16", 64), ("fp32", 32)]
        geometries = [("none", 1, False, "elu1"), ("product", 3, True, "elu1"), ("sum", 3, True, "relu")]
    else:
        dtype_tiles = [(d, t) for d in DTYPES for t in gpu_tiles(_torch_dtype(d))]
        geometries = [(v, a, p, "elu1" if p else "relu") for v, a in GEOMETRIES for p in (False, True)]
    cases = []
    for role in ROLES:
        for target in TARGETS:
            if role.name in ELEMENTWISE_ROLES:
                cases.append(Case(role.name, target, "fp32", 0))
                continue
            cases += [Case(role.name, target, d, t) for d, t in dtype_tiles]
            if role.uses_geometry and role.all_geometries:
                cases += [Case(role.name, target, "bf16", 64, g) for g in geometries if g != BASE_GEOMETRY]
    return cases


def _torch_dtype(name: str):
    """The torch dtype of a DTYPES name (torch is imported lazily: the parent process never needs it)."""
    import torch
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def _jit_function(fn):
    import triton
    if isinstance(fn, triton.runtime.JITFunction):
        return fn
    return triton.runtime.JITFunction(fn.fn)  # interpreted function: rebuild the jit object


def _source(case: Case):
    """ASTSource and compile options for a case, mirroring what the launchers pass."""
    import importlib

    from triton.compiler import ASTSource

    from ..kernels.vicinity.configs import dot_precision, gpu_config
    from ..kernels.vicinity.forward import REDUCE_BLOCK, REDUCE_WARPS
    from ..kernels.vicinity.launch import Geometry

    role = ROLE_BY_NAME[case.role]
    fn = _jit_function(getattr(importlib.import_module(f"vicinity_attn.kernels.vicinity.{role.module}"), role.kernel))
    prec = dot_precision(role.name, _torch_dtype(case.dtype), interpret=False)  # as the launchers pick it
    variant, n_axes, has_prefix, fmap = case.geometry
    if role.name in ELEMENTWISE_ROLES:
        constexprs = {"BLOCK": REDUCE_BLOCK}
        options = dict(num_warps=REDUCE_WARPS, num_stages=3)
    else:
        cfg = gpu_config(case.tile)
        constexprs = dict(BLOCK_N=cfg.block_n, BLOCK_DV=cfg.block_dv, ACC=prec.acc)
        if role.uses_geometry:
            # The geometry constexprs exactly as a launch derives them (grid sizes are runtime values).
            fixed = dict(role.fixed)
            geometry = Geometry.build((1,) * n_axes, (1,) * n_axes, variant, fmap, int(has_prefix))
            constexprs.update(geometry.constexprs(fixed["IS_QUERY"]), BLOCK_D=cfg.block_d, DOT=prec.dot,
                              PREC=prec.prec, **fixed)
        options = cfg.options(role.name)  # num_warps, num_stages, maxnreg: as the launchers pass them
    io_type = "*" + case.dtype
    signature, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        param = fn.params[i]
        if name in constexprs:
            signature[name], consts[(i,)] = "constexpr", constexprs[name]
        elif name.endswith("_ptr"):
            signature[name] = io_type if name in role.io_ptrs else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("eps", "out_scale", "scale", "den_floor", "clamp_lo", "clamp_hi", "state_scale", "lo", "hi"):
            signature[name] = "fp32"
        elif name in INNER_STRIDES:
            signature[name], consts[(i,)] = "constexpr", 1
        elif param.do_not_specialize:
            signature[name] = "i32"
        else:  # outer strides: multiples of 16 elements for the usual head dims
            signature[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    missing = [n for n in fn.arg_names if n not in signature]
    assert not missing, missing
    return ASTSource(fn, signature, consts, attrs), options


def _nvidia_bin(tool: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def compile_case(case: Case) -> dict:
    """Compile one case; returns a row for the table (``error`` set on failure)."""
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
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        return row
    row["seconds"] = time.perf_counter() - start
    row["smem"] = compiled.metadata.shared
    row["warps"] = options["num_warps"]
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log.getvalue())]
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        cubin = f.name
    try:
        usage = subprocess.run([_nvidia_bin("cuobjdump"), "--dump-resource-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_nvidia_bin("cuobjdump"), "-sass", cubin],
                              capture_output=True, text=True, check=True).stdout
    finally:
        os.remove(cubin)
    res = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
    row["regs"] = int(res.get("REG", -1))
    # ptxas 13 reports spills only as stack; the kernels have no local arrays or calls, so stack = spill.
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
    header = (f"{'kernel':<21} {'arch':<7} {'dtype':<5} {'tile':>4} {'warps':>5} {'geometry':<22} "
              f"{'regs':>4} {'smem':>6} {'spill':>5} {'tensor-core (SASS)':<20} {'sec':>5}  status")
    lines = [header, "-" * len(header)]
    for row in rows:
        c = row["case"]
        arch = f"sm_{c.target}" + ("a" if c.target >= 90 else "")
        if row["error"]:
            lines.append(f"{c.role:<21} {arch:<7} {c.dtype:<5} {c.tile:>4} {'':>5} {c.label():<22} ERROR "
                         f"{row['error'][:120]}")
            continue
        tc = f"HGMMA x{row['hgmma']}" if row["hgmma"] else (f"HMMA x{row['hmma']}" if row["hmma"] else "-")
        if row["hgmma"] and row["hmma"]:
            tc += f" HMMA x{row['hmma']}"
        problems = row_failures(row)
        lines.append(f"{c.role:<21} {arch:<7} {c.dtype:<5} {c.tile:>4} {row['warps']:>5} {c.label():<22} "
                     f"{row['regs']:>4} {row['smem']:>6} {row['spill']:>5} {tc:<20} {row['seconds']:>5.1f}  "
                     f"{'FAIL: ' + '; '.join(problems) if problems else 'ok'}")
    return "\n".join(lines)


def run_gate(quick: bool = False, jobs: int | None = None) -> tuple[list[dict], bool]:
    """Compile the matrix (in parallel worker processes); returns the rows and whether all passed."""
    cases = build_cases(quick)
    jobs = jobs or max(1, os.cpu_count() or 1)
    # A private cache: every case really compiles, so ptxas runs and its report is complete.
    with tempfile.TemporaryDirectory(prefix="vicinity_gate_cache_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        if jobs == 1:
            rows = [compile_case(c) for c in cases]
        else:
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                rows = list(pool.map(compile_case, cases))
    return rows, all(not row_failures(r) for r in rows)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vicinity_attn.tools.compile_gate",
        description="Compile every Triton kernel of this package ahead of time for NVIDIA sm_80 (A100) and "
        "sm_90a (H100/H200), with no GPU, and check the machine code: no compile errors, zero register "
        "spills, tensor-core instructions in every kernel that multiplies matrices.",
        epilog="It prints one row per compiled kernel (registers, shared memory, spill bytes, tensor-core "
        "instructions found in the SASS, seconds) and a summary line, and exits 0 when every kernel passes, "
        "1 otherwise. The full matrix (270 kernels: every kernel role x head tile x dtype x variant and axes x "
        "prefix tokens, for both GPUs) took about 2 minutes with 2 compile processes on an idle 2-core CPU; "
        "--quick compiles a covering subset in a fraction of that. Needs only triton (its bundled ptxas, "
        "cuobjdump); under TRITON_INTERPRET=1 it re-runs itself with the interpreter off.")
    parser.add_argument("--quick", action="store_true", help="covering subset instead of the full matrix")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: all cores)")
    args = parser.parse_args(argv)
    if _interpreting():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "vicinity_attn.tools.compile_gate"] + (argv if argv is not None else sys.argv[1:])
        return subprocess.run(cmd, env=env).returncode
    start = time.perf_counter()
    rows, ok = run_gate(args.quick, args.jobs)
    print(format_table(rows))
    n_bad = sum(bool(row_failures(r)) for r in rows)
    print(f"\n{len(rows)} kernels compiled for sm_80 and sm_90a in {time.perf_counter() - start:.0f} s: "
          f"{'all ok (zero spills, tensor-core dots)' if ok else f'{n_bad} FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
