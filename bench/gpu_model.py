"""A GPU time model of the Triton kernels, computed from their launch plan and their SASS (a MODEL).

    python -m bench.gpu_model                      # writes bench/results/gpu-model.json and docs/gpu-model.md's table
    python -m bench.gpu_model --out x.json --no-doc

Nothing here is typed in per kernel. For each shape (``SHAPES``, bf16: vicinity attention, and k-NN
attention at the bench's k-NN shapes) and direction:

1. Launch plan (child process, interpreter off): the launchers run on CPU tensors of the real shape and
   Triton's own launch path records every launch (``tools.launch_capture``): kernel,
   grid, arguments, specialisation. The compile gate's functions compile each for sm_90a and read
   its SASS: instructions outside / inside each loop, tensor-core FLOPs per main-loop iteration,
   warps, registers, CTAs per SM, and per loop (nested loops taken out) the latency readouts of
   ``tools.sass.latency_chain``: exposed dependent global round trips, BAR.SYNC barriers, wgmma
   waits and shared stores by width per iteration (the round-trip rule is defined there).
2. Traffic (child process, Triton interpreter): the same launchers run again with the GPU launch
   configuration; for every launch, program (0, 0, 0) runs in the interpreter with the full grid's
   dimensions, and its loads, stores and dots are counted per tensor argument (bytes with the mask
   applied, FLOPs of each tl.dot), and each loop's trips (a trace hook counts the back edges at each
   kernel source line; the SASS names a loop by its back branch's line). A grid's programs do the
   same work up to tails, so per launch: L2 bytes = program bytes x programs (every request goes
   through L2), HBM bytes = per tensor min(L2 bytes, the tensor's size) (repeated reads of one tensor
   served by L2: the 50 MB L2 holds a block of tokens while the F features and head tiles of it run
   side by side), tensor FLOPs = program FLOPs x programs.
3. The old model (kept beside the new one, ``old_modelled_us``): time per kernel = max(HBM bytes /
   (0.85 x HBM bandwidth), L2 bytes / L2 bandwidth, FLOPs / tensor peak, issued warp-instructions /
   (4 per SM per cycle)) + launch overhead, where issued instructions = warps x (SASS instructions +
   main-loop body x (trips - 1)) per program, trips = program FLOPs / main-loop FLOPs per iteration
   (or, without dots, program load bytes / main-loop load bytes per iteration), and the busiest SM
   runs ceil(programs / SMs) programs. No latency.
4. Direction: "fwd" sums the launches the operation makes in its forward phase (the phase its launcher
   run reports), "fwdbwd" every launch.
5. The new, latency-aware model (``modelled_us``; ``latency_time``). Per program, with loop trips from
   step 2 and readouts from step 1 (the code outside loops counted once):
   - instructions I (per warp) = sum over loops of trips x the loop's own instructions, plus the rest;
   - serial stall S (cycles) = sum over loops of trips x (the exposed part of each round trip +
     barriers x barrier cost + wgmma waits x wgmma latency) + the program's tensor-core cycles at its
     SM's share of the peak (a program alone waits for its own dots at each wgmma wait). A round
     trip's latency is the L2 hit latency plus the kernel's L2 miss ratio (HBM bytes / L2 bytes)
     times the extra HBM latency; the instructions its warp issued between the load and the consumer
     (``cover``) hide part of it, at the program's own cycles per warp-instruction;
   - shared-store cycles = sum of trips x STS per warp x wavefronts (a 16-bit STS of a warp moves 64
     bytes but costs a whole 128-byte wavefront; a 128-bit STS costs 4 for 512 bytes) x warps.
   The busiest SM runs n = ceil(programs / SMs) programs, C at a time (C = CTAs per SM from registers
   and shared memory), in ceil(n / C) waves. Its time is the largest of
   - issue: n x warps x I at the sustained issue rate of all its resident warps;
   - chain: ceil(n / C) x (one program's own issue time + S): resident programs hide each other's
     stalls, so the serial path is paid once per wave; with C = 1 (one CTA of 8 warps) nothing hides
     a program's chain, and its stalls add to its own issue time, since its warps meet at barriers;
   - shared stores: n x the program's shared-store cycles.
   Kernel time = max(that SM time, HBM bytes / (0.85 x HBM bandwidth), L2 bytes / L2 bandwidth, FLOPs
   / tensor peak) + launch overhead: bandwidth is shared by the whole device and overlaps the SMs'
   serial work (a roofline bound per kernel), the SM terms are each SM's own and bound it from below.
   More CTAs per SM never increase the time (fewer waves, a higher shared issue rate) and the H200
   is never slower than the H100 (only its HBM bandwidth differs).
6. The stall-free floor (``stall_free_us``): each launch at the largest of its issue, shared-store,
   bandwidth and tensor times plus its launch, as if every stall were hidden. No kernel with the same
   instructions beats it on this model; for issue 27's time targets the JSON also gives it at other
   issue rates and the instruction cut a target needs (``instruction_cut_for``).

Constants (``LATENCY``; cycles at the model's 1.83 GHz):
- L2 hit 270 cycles and HBM 600: the ranges published by pointer-chasing microbenchmarks of Hopper
  (Luo et al., "Benchmarking and Dissecting the Nvidia Hopper GPU Architecture", arXiv:2402.13499,
  and its 2025 extension arXiv:2501.12084: ~260-300 cycles for an L2 hit, ~500-700 for HBM).
- Barrier 30 cycles, wgmma pipeline latency 64 cycles: estimates (no published Hopper figure was at
  hand); ``sensitivity`` in the JSON gives each shape's totals at the ends of every range.
- Issue 0.625 warp-instructions per scheduler per cycle (2.5 per SM) with at least 2 resident warps per
  scheduler, proportionally less below: one scheduler issues at most one instruction per cycle, and
  with two warps to choose from, dependent FP32 chains (4+ cycles), shared-memory and shuffle
  latency and barrier skew leave it idle part of the time. 2.5 per SM is the low end of the 2.5-3
  that the project's kernel review took as sustained (an estimate, not a measurement); the peak 4
  needs many ready warps per scheduler.

FlashAttention-2 beside it (dense softmax attention over the same N tokens: k-NN attention with
topk = N): 4 N^2 D B H FLOPs forward, 2.5x that backward. The new model runs them at the rates the
FlashAttention-3 paper publishes for FlashAttention-2 at head dim 64 on an H100 SXM5 (Shah et al. 2024,
arXiv:2407.08608, benchmark figures: forward 282-324 TFLOP/s, backward 198-291 TFLOP/s for sequence
lengths 512-16k; ``FA2_HDIM64_TFLOPS``), the old model at FA2_FRACTION of the tensor peak; either
bounded below by its HBM floor, plus its launches. Beside a frame-causal shape, FA2 with a block-causal mask:
its FLOPs are the dense ones times ``fa2_work_fraction`` ((F + 1) / (2 F) for F frames: the masked frame blocks
skipped whole) at the same rates; ``fa2_dense_modelled_us`` is dense FA2 over the same tokens.

Frame-causal launches (``causal="frames"``) give each slot (prefix tokens, then one per frame) its own
programs; the traffic stage traces the first program of the first frame instead of program (0, 0, 0) (the
prefix slot's, empty without prefix tokens) and counts the programs that do work
(``representative_program``).
"""
from __future__ import annotations

import argparse
import inspect
import json
import linecache
import math
import os
import subprocess
import sys
import tempfile

H100_SXM = dict(
    name="H100 SXM (model)",
    sms=132,
    clock_hz=1.83e9,              # the clock at which 132 SMs x 4 tensor cores give the dense peak below
    schedulers_per_sm=4,          # one warp-instruction issued per scheduler per cycle
    hbm_bytes_per_s=3.35e12,
    hbm_efficiency=0.85,
    l2_bytes_per_s=5.5e12,        # sustained L2 read bandwidth reported by microbenchmarks (~5.5 TB/s)
    tensor_flops_per_s=989e12,    # dense bf16 / fp16
    launch_overhead_s=2.5e-6,     # per kernel launch in a stream (latency of back-to-back small launches)
)
# The H200: the same GH100 die and 132 SMs at the same clocks and tensor peak, HBM3e at 4.8 TB/s
# (NVIDIA's H200 announcement). Its L2 is modelled as the H100's 50 MB: no larger figure could be
# sourced, and the model uses the L2 only through its bandwidth.
H200 = dict(H100_SXM, name="H200 (model)", hbm_bytes_per_s=4.8e12)
CHIPS = {"H100 SXM": H100_SXM, "H200": H200}
# Latency model constants (cycles at clock_hz). See the module docstring for what each is and its source.
LATENCY = dict(
    l2_hit_cycles=270,           # L2 hit, dependent load (P-chase microbenchmarks of Hopper: ~260-300)
    hbm_cycles=600,              # L2 miss to HBM (the same papers: ~500-700)
    barrier_cycles=30,           # BAR.SYNC: release after the last warp arrives (estimate)
    wgmma_wait_cycles=64,        # WARPGROUP.DEPBAR: pipeline latency beyond the chain's tensor time (estimate)
    issue_per_scheduler=0.625,   # sustained warp-instructions per scheduler per cycle with >= 2 warps on it
    saturating_warps=2,          # resident warps per scheduler below which issue falls proportionally
    smem_bytes_per_cycle=128,    # shared-memory store bandwidth per SM (32 banks x 4 bytes)
)
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
FA2_FRACTION = 0.35               # the old model's FlashAttention-2: ~35 % of the H100 dense peak
# FlashAttention-2 at head dim 64 on an H100 SXM5, bf16, no causal mask, as published in the
# FlashAttention-3 paper's benchmark figures (Shah et al. 2024, arXiv:2407.08608: forward and backward
# speed, head dim 64): TFLOP/s by sequence length (total tokens 16k, hidden 2048).
FA2_HDIM64_TFLOPS = dict(
    seqlens=(512, 1024, 2048, 4096, 8192, 16384),
    fwd=(282, 306, 318, 321, 322, 324),
    bwd=(198, 238, 264, 279, 287, 291),
)
FA2_LAUNCHES = dict(fwd=1, bwd=3)  # forward; backward = dO.o preprocess, main kernel, dq conversion



def _knn_shape(batch: int, heads: int, n: int, topk: int) -> dict:
    """A k-NN attention LaunchCase (bf16, D = Dv = 64): n queries and keys, each query keeping topk."""
    return dict(op="knn", dtype="bf16", d=64, dv=64, batch=batch, heads=heads, grid=(n,), extra=(("topk", topk),))


SHAPES = {   # name -> (LaunchCase keyword arguments); the compile gate builds the same cases
    "a": dict(dtype="bf16", d=48, dv=48, batch=32, heads=1, grid=(56, 56)),
    "b": dict(dtype="bf16", d=64, dv=64, batch=1, heads=4, grid=(224, 224)),
    "c": dict(dtype="bf16", d=32, dv=32, batch=8, heads=8, grid=(14, 14)),
    # k-NN attention: the bench's shapes (python -m bench.knn: B1 H4 D64, topk = N/2) and DeiT-S's layer
    # (KVT's topk 100 of 197 tokens, 6 heads of 64) at a per-GPU training batch of 64.
    "knn197": _knn_shape(1, 4, 197, 98),
    "knn1024": _knn_shape(1, 4, 1024, 512),
    "knn4096": _knn_shape(1, 4, 4096, 2048),
    "knn-deits": _knn_shape(64, 6, 197, 100),
    # Video (issue 28): 16 frames of 32 x 32 tokens, frame-causal (causal="frames": each frame attends to itself
    # and every earlier frame) and the same shape bidirectional.
    "video": dict(op="vicinity_causal", dtype="bf16", d=64, dv=64, batch=1, heads=8, grid=(16, 32, 32)),
    "video-bidir": dict(dtype="bf16", d=64, dv=64, batch=1, heads=8, grid=(16, 32, 32)),
}
SHAPE_TITLES = {"a": "B=32, H=1, 56x56, D=Dv=48 (VVT stage 1)", "b": "B=1, H=4, 224x224, D=Dv=64",
                "c": "B=8, H=8, 14x14, D=Dv=32",
                "knn197": "k-NN B=1, H=4, N=197, D=64, topk=98", "knn1024": "k-NN B=1, H=4, N=1024, D=64, topk=512",
                "knn4096": "k-NN B=1, H=4, N=4096, D=64, topk=2048",
                "knn-deits": "k-NN DeiT-S layer: B=64, H=6, N=197, D=64, topk=100",
                "video": "video B=1, H=8, 16x32x32, D=Dv=64, frame-causal",
                "video-bidir": "video B=1, H=8, 16x32x32, D=Dv=64, bidirectional"}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu-model.json")
# The host time of eager calls (python -m bench.host), measured under the pinned triton.
HOST_RESULTS = os.path.join(os.path.dirname(RESULTS), "host-cpu-triton3.9.0.json")


def _case(name: str):
    from tools.launch_capture import LaunchCase
    return LaunchCase(**SHAPES[name])


# ------------------------------------------------------------------------------------------------
# Stage 1: launch plan + SASS (interpreter off)

def stage_plan(names: list[str]) -> dict:
    from tools.compile_gate import collect_jobs, compile_job
    from tools.sass import cta_mma_flops

    out = {}
    for name in names:
        jobs, plan = collect_jobs([_case(name)], archs=(90,))
        rows = [compile_job(j) for j in jobs]
        launches = []
        for role, arch, idx, grid in plan[_case(name)]:
            row, job = rows[idx], jobs[idx]
            if row["error"]:
                raise RuntimeError(f"{job.kernel} does not compile for sm_90a: {row['error']}")
            s = row["sass"]
            main = s["main_loop"]
            loops = [dict(start=lp["start"], parent=lp["parent"], back_edge=lp["back_edge"],
                          own_instructions=lp["own_instructions"], chain=lp["chain"],
                          main=main is not None and lp["start"] == main["start"]) for lp in s["loops"]]
            launches.append(dict(
                role=role, kernel=job.kernel, grid=list(grid), num_warps=row["warps"], regs=row["regs"],
                smem=row["smem"], ctas_per_sm=row["occupancy"]["ctas"], sass_instructions=s["kernel"]["instructions"],
                outside_instructions=s["outside_loops"], outside_chain=s["outside_chain"], loops=loops,
                main_loop=None if main is None else dict(
                    instructions=main["instructions"], tensor_core=main["tensor_core"], load_bits=main["load_bits"],
                    cta_flops_per_iter=cta_mma_flops(main, row["warps"]))))
        out[name] = launches
    return out


# ------------------------------------------------------------------------------------------------
# Stage 2: traffic of one program per launch (Triton interpreter, GPU launch configuration)

def _back_edge_tracer(counts: dict, kernel_dir: str):
    """A sys.settrace hook counting, per loop header (a kernel source line starting with ``for`` or
    ``while``), the line events reached from a later line of the same frame: the header's back
    edges, i.e. the loop's trips (summed over entries).
    The SASS names each loop by its back branch's source line, which is the loop header's."""
    last = {}

    def local(frame, event, arg):
        if event == "line":
            line, prev = frame.f_lineno, last.get(id(frame))
            if prev is not None and prev > line and linecache.getline(
                    frame.f_code.co_filename, line).lstrip().startswith(("for ", "while ")):
                key = f"{os.path.basename(frame.f_code.co_filename)}:{line}"
                counts[key] = counts.get(key, 0) + 1
            last[id(frame)] = line
        elif event == "return":
            last.pop(id(frame), None)
        return local

    def hook(frame, event, arg):
        return local if frame.f_code.co_filename.startswith(kernel_dir) else None
    return hook


def representative_program(kernel: str, grid: tuple, kwargs: dict) -> tuple[tuple | None, int | None]:
    """(the program to trace instead of (0, 0, 0), or None; the programs that do work, or None: all of the
    grid) for a launch of ``kernel`` over ``grid`` with keyword arguments ``kwargs``.

    Frame-causal launches (FRAMES, kernels/vicinity/frames.py) give each slot its own programs, and slot 0 holds
    the prefix tokens: none (its programs return at once) or a few. Their program (0, 0, 0) is slot 0's, so the
    traced program is the first one of slot 1 (the window's first frame, always whole): program (blocks_per_slot,
    0, 0) of a per-token pass (axis 0: slot x blocks_per_slot + block), (0, 1, 0) of the state pass (axis 1: the
    slot). The programs doing work: slot 0's blocks that hold prefix tokens and every frame's blocks (a frame's
    partial last block counted whole, as a grid's tails are). Other launches: (None, None)."""
    if not kwargs.get("FRAMES"):
        return None, None
    slot0, frame = int(kwargs["slot0_len"]), int(kwargs["frame_len"])
    if "blocks_per_slot" in kwargs:
        per_slot, block_n = int(kwargs["blocks_per_slot"]), int(kwargs["BLOCK_N"])
        n_slots = grid[0] // per_slot
        active = (math.ceil(slot0 / block_n) + (n_slots - 1) * math.ceil(frame / block_n)) * grid[1] * grid[2]
        return (per_slot, 0, 0), active
    n_slots = grid[1]
    return (0, 1, 0), grid[0] * (n_slots - (slot0 == 0)) * grid[2]


def stage_traffic(names: list[str]) -> dict:
    import numpy as np
    import torch
    from triton.runtime import interpreter as interp

    import vicinity_attn.kernels.knn  # noqa: F401
    import vicinity_attn.kernels.vicinity  # noqa: F401  (built as interpreted functions: TRITON_INTERPRET=1 here)
    from tools.launch_capture import OPERATIONS
    from vicinity_attn.kernels import runtime

    # The kernel sources as imported (the package's own mapping decides where they live).
    kernel_dir = os.path.dirname(os.path.abspath(sys.modules["vicinity_attn.kernels"].__file__)) + os.sep
    builder_cls = type(interp.interpreter_builder)
    state = dict(full=None, ranges=None, counts=None, program=None)
    orig = dict(getitem=interp.InterpretedFunction.__getitem__, set_grid_dim=builder_cls.set_grid_dim,
                set_grid_idx=builder_cls.set_grid_idx,
                load=builder_cls.create_masked_load, store=builder_cls.create_masked_store,
                dot=builder_cls.create_dot, init=interp.GridExecutor._init_args_hst)

    def tally(kind, ptrs, mask):
        addr = np.asarray(ptrs.data).reshape(-1)
        m = np.broadcast_to(np.asarray(mask.data), np.asarray(ptrs.data).shape).reshape(-1)
        addr = addr[m]
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        for name, lo, hi in state["ranges"]:
            n = int(np.count_nonzero((addr >= lo) & (addr < hi)))
            if n:
                key = f"{kind}:{name}"
                state["counts"]["bytes"][key] = state["counts"]["bytes"].get(key, 0) + n * size

    def load(self, ptrs, mask, other, *a, **k):
        if state["counts"] is not None:
            tally("read", ptrs, mask)
        return orig["load"](self, ptrs, mask, other, *a, **k)

    def store(self, ptrs, value, mask, *a, **k):
        if state["counts"] is not None:
            tally("write", ptrs, mask)
        return orig["store"](self, ptrs, value, mask, *a, **k)

    def dot(self, a, b, d, *args, **kw):
        if state["counts"] is not None:
            M, K = np.asarray(a.data).shape[-2:]
            N = np.asarray(b.data).shape[-1]
            state["counts"]["flops"] += 2 * M * N * K
        return orig["dot"](self, a, b, d, *args, **kw)

    def set_grid_dim(self, nx, ny, nz):
        return orig["set_grid_dim"](self, *(state["full"] or (nx, ny, nz)))

    def set_grid_idx(self, x, y, z):
        return orig["set_grid_idx"](self, *(state["program"] or (x, y, z)))

    def init(self, args_dev, kwargs):
        args_hst, kwargs_hst = orig["init"](self, args_dev, kwargs)
        names = list(inspect.signature(self.fn).parameters)
        storages = {}   # one range per storage, named by every argument that points into it
        for name, t in list(zip(names, args_hst)) + list(kwargs_hst.items()):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                entry = storages.setdefault(st.data_ptr(), [[], st.data_ptr(), st.data_ptr() + st.nbytes()])
                entry[0].append(name)
        ranges = [("=".join(n), lo, hi) for n, lo, hi in storages.values()]
        state["ranges"] = ranges
        state["sizes"] = {n: hi - lo for n, lo, hi in ranges}
        return args_hst, kwargs_hst

    def getitem(self, grid):
        executor = orig["getitem"](self, (1, 1, 1))
        full = tuple(grid) + (1,) * (3 - len(grid))

        def call(*args, **kwargs):
            state["full"], state["counts"] = full, dict(bytes={}, flops=0)
            state["program"], active = representative_program(self.fn.__name__, full, kwargs)
            os.environ["TRITON_INTERPRET"] = "1"   # Triton itself reads it while interpreting
            runtime._INTERPRET = True
            back_edges = {}
            sys.settrace(_back_edge_tracer(back_edges, kernel_dir))
            try:
                executor(*args, **kwargs)
            finally:
                sys.settrace(None)
                os.environ["TRITON_INTERPRET"] = "0"
                runtime._INTERPRET = False
                record = dict(kernel=self.fn.__name__, phase=state["phase"], grid=list(full),
                              program=list(state["program"] or (0, 0, 0)), program_bytes=state["counts"]["bytes"],
                              program_flops=state["counts"]["flops"], tensor_bytes=state["sizes"],
                              back_edges=back_edges)
                if active is not None:
                    record["active_programs"] = active
                state["launches"].append(record)
                state["full"], state["counts"], state["program"] = None, None, None
        return call

    saved_env, saved_flag = os.environ.get("TRITON_INTERPRET"), runtime._INTERPRET
    interp.InterpretedFunction.__getitem__ = getitem
    builder_cls.set_grid_dim, builder_cls.create_masked_load = set_grid_dim, load
    builder_cls.set_grid_idx = set_grid_idx
    builder_cls.create_masked_store, builder_cls.create_dot = store, dot
    interp.GridExecutor._init_args_hst = init
    # The launchers pick their GPU configuration (block sizes, warps, chunking, dot dtype) when they
    # do not see the interpreter (the variable is set again only while a kernel program runs); the
    # kernels themselves were already built as interpreted functions.
    os.environ["TRITON_INTERPRET"] = "0"
    runtime._INTERPRET = False
    # One program per launch leaves most of each output unwritten: later launches read garbage there.
    saved_np = np.seterr(all="ignore")
    out = {}
    try:
        for name in names:
            case = _case(name)
            state["launches"], state["phase"] = [], ""
            OPERATIONS[case.op].run(case, lambda phase: state.update(phase=phase),
                                    fill=lambda shape, dtype: torch.randn(shape, dtype=torch.float32).to(dtype))
            out[name] = state["launches"]
    finally:
        np.seterr(**saved_np)
        os.environ["TRITON_INTERPRET"] = saved_env if saved_env is not None else "1"
        runtime._INTERPRET = saved_flag
        interp.InterpretedFunction.__getitem__ = orig["getitem"]
        builder_cls.set_grid_dim, builder_cls.create_masked_load = orig["set_grid_dim"], orig["load"]
        builder_cls.set_grid_idx = orig["set_grid_idx"]
        builder_cls.create_masked_store, builder_cls.create_dot = orig["store"], orig["dot"]
        interp.GridExecutor._init_args_hst = orig["init"]
    return out


# ------------------------------------------------------------------------------------------------
# Combining: the model

def kernel_time(plan: dict, traffic: dict, chip: dict = H100_SXM) -> dict:
    programs = traffic.get("active_programs") or math.prod(plan["grid"])
    l2_bytes = sum(traffic["program_bytes"].values()) * programs
    hbm = 0
    for key, per_program in traffic["program_bytes"].items():
        hbm += min(per_program * programs, traffic["tensor_bytes"][key.split(":", 1)[1]])
    flops = traffic["program_flops"] * programs
    main = plan["main_loop"]
    trips = 1.0
    if main is not None:
        if main["tensor_core"] and main.get("cta_flops_per_iter"):
            trips = max(1.0, traffic["program_flops"] / main["cta_flops_per_iter"])
        elif main["load_bits"]:
            read = sum(v for k, v in traffic["program_bytes"].items() if k.startswith("read:"))
            trips = max(1.0, read / (main["load_bits"] / 8 * 32 * plan["num_warps"]))
    per_program = plan["sass_instructions"] + (main["instructions"] * (trips - 1) if main else 0)
    busiest_sm = math.ceil(programs / chip["sms"]) * plan["num_warps"] * per_program
    t = dict(
        hbm_us=hbm / (chip["hbm_efficiency"] * chip["hbm_bytes_per_s"]) * 1e6,
        l2_us=l2_bytes / chip["l2_bytes_per_s"] * 1e6,
        tensor_us=flops / chip["tensor_flops_per_s"] * 1e6,
        issue_us=busiest_sm / (chip["schedulers_per_sm"] * chip["clock_hz"]) * 1e6,
    )
    bound = max(t, key=t.get)
    return dict(role=plan["role"], kernel=plan["kernel"], grid=plan["grid"], programs=programs,
                num_warps=plan["num_warps"], regs=plan["regs"], ctas_per_sm=plan["ctas_per_sm"],
                hbm_bytes=hbm, l2_bytes=l2_bytes, tensor_flops=flops, main_loop_trips=round(trips, 2),
                instructions_per_program=round(per_program), **{k: round(v, 3) for k, v in t.items()},
                bound=bound.replace("_us", ""), launch_us=chip["launch_overhead_s"] * 1e6,
                modelled_us=round(t[bound] + chip["launch_overhead_s"] * 1e6, 3))


def loop_trips(plan: dict, traffic: dict) -> list[float]:
    """Trips per program of each SASS loop in ``plan["loops"]``: the interpreted program's back edges
    at the loop's source line. Several SASS loops with one line are an unrolled loop and its
    remainder: each copy's unroll factor is its global loads (else instructions) over the smallest
    copy's, and the source trips go to the most unrolled copy first (whole trips), the rest to the
    next. A loop the interpreter did not see (a line outside the kernel sources) takes the old
    model's main-loop trips when it is the main loop, else 1."""
    edges = traffic.get("back_edges", {})
    old_trips = kernel_time(plan, traffic)["main_loop_trips"]
    out = [old_trips if lp["main"] else 1.0 for lp in plan["loops"]]
    by_line = {}
    for i, lp in enumerate(plan["loops"]):
        by_line.setdefault(lp["back_edge"], []).append(i)
    for line, idx in by_line.items():
        if line not in edges:
            continue
        size = [plan["loops"][i]["chain"]["loads"] or plan["loops"][i]["own_instructions"] for i in idx]
        unroll = [max(1, round(x / max(1, min(size)))) for x in size]
        left = float(edges[line])
        order = sorted(range(len(idx)), key=lambda j: -unroll[j])
        for rank, j in enumerate(order):
            trips = left / unroll[j] if rank == len(order) - 1 else math.floor(left / unroll[j])
            out[idx[j]] = trips
            left -= trips * unroll[j]
    return out


def issue_rate(warps_per_scheduler: float, lat: dict = LATENCY) -> float:
    """Sustained warp-instructions per scheduler per cycle with that many resident warps on it."""
    return lat["issue_per_scheduler"] * min(1.0, warps_per_scheduler / lat["saturating_warps"])


def _sts_cycles(stores: dict, lat: dict) -> float:
    """Shared-memory cycles one warp's stores take: each STS moves 32 x width bits, at least one
    wavefront (a 16-bit store costs a whole wavefront for 64 bytes; bank conflicts not modelled)."""
    return sum(n * max(1.0, 32 * int(w) / 8 / lat["smem_bytes_per_cycle"]) for w, n in stores.items())


def latency_time(plan: dict, traffic: dict, chip: dict = H100_SXM, lat: dict = LATENCY,
                 ctas_per_sm: int | None = None) -> dict:
    """The latency-aware model of one launch (a MODEL): see the module docstring, step 5."""
    old = kernel_time(plan, traffic, chip)
    programs, warps = old["programs"], plan["num_warps"]
    ctas = max(1, plan["ctas_per_sm"] if ctas_per_sm is None else ctas_per_sm)
    trips = loop_trips(plan, traffic)
    miss = old["hbm_bytes"] / old["l2_bytes"] if old["l2_bytes"] else 0.0
    mem = lat["l2_hit_cycles"] + miss * (lat["hbm_cycles"] - lat["l2_hit_cycles"])

    # Cycles per instruction of one warp while its program runs alone (the CTA's warps share the SM's
    # schedulers): the instructions between a load and its consumer cover that much of its latency.
    cpi = warps / (chip["schedulers_per_sm"] * issue_rate(warps / chip["schedulers_per_sm"], lat))

    def stall(chain):
        cover = chain.get("cover", [0] * (chain["round_trips"] + chain["pipelined"]))
        return (sum(max(0.0, mem - c * cpi) for c in cover) + chain["barriers"] * lat["barrier_cycles"]
                + chain["wgmma_waits"] * lat["wgmma_wait_cycles"])
    parts = [(1.0, plan["outside_instructions"], plan["outside_chain"])]
    parts += [(t, lp["own_instructions"], lp["chain"]) for t, lp in zip(trips, plan["loops"])]
    instr = sum(t * n for t, n, _ in parts)                       # per warp, per program
    # A program alone on its SM waits for its own tensor-core work at each wgmma wait: its FLOPs at
    # the SM's share of the tensor peak join its serial path.
    tensor_p = traffic["program_flops"] / (chip["tensor_flops_per_s"] / chip["sms"] / chip["clock_hz"])
    stall_p = sum(t * stall(c) for t, _, c in parts) + tensor_p  # cycles, per program
    round_trips = sum(t * c["round_trips"] for t, _, c in parts)
    barriers = sum(t * c["barriers"] for t, _, c in parts)
    sts_p = sum(t * _sts_cycles(c["shared_stores"], lat) for t, _, c in parts) * warps
    per_sm = math.ceil(programs / chip["sms"])                   # the busiest SM's programs
    resident = min(ctas, per_sm)
    waves = math.ceil(per_sm / ctas)
    alone = warps * instr / (chip["schedulers_per_sm"] * issue_rate(warps / chip["schedulers_per_sm"], lat))
    shared = chip["schedulers_per_sm"] * issue_rate(resident * warps / chip["schedulers_per_sm"], lat)
    cycles = dict(issue=per_sm * warps * instr / shared,       # all the SM's warps issuing, overlapped
                  chain=waves * (alone + stall_p),             # each resident program's own serial path
                  smem=per_sm * sts_p)                         # shared-store wavefronts
    sm_bound = max(cycles, key=cycles.get)
    t = dict(hbm_us=old["hbm_us"], l2_us=old["l2_us"], tensor_us=old["tensor_us"],
             **{f"{k}_us": v / chip["clock_hz"] * 1e6 for k, v in cycles.items()})
    bound = max(t, key=t.get)
    launch = chip["launch_overhead_s"] * 1e6
    return dict(kernel=plan["kernel"], role=plan["role"], ctas_per_sm=ctas, waves=waves, loop_trips=trips,
                round_trips_per_program=round(round_trips, 1), barriers_per_program=round(barriers, 1),
                instructions_per_program=round(instr), stall_cycles_per_program=round(stall_p),
                memory_latency_cycles=round(mem), **{k: round(v, 3) for k, v in t.items()},
                bound=bound.replace("_us", ""), sm_bound=sm_bound,
                modelled_us=round(t[bound] + launch, 3))


SENSITIVITY = (("l2_hit_cycles", (230, 300)), ("hbm_cycles", (500, 700)), ("barrier_cycles", (15, 60)),
               ("wgmma_wait_cycles", (32, 128)), ("issue_per_scheduler", (0.5, 0.75)))


def sensitivity(plan: list[dict], traffic: list[dict], first_bwd: int) -> dict:
    """Forward and forward + backward H100 totals with each latency constant at the ends of its range
    (the others at their values): how much each uncertain figure moves the model."""
    out = {}
    for key, values in SENSITIVITY:
        for v in values:
            lat = dict(LATENCY, **{key: v})
            times = [latency_time(p, t, H100_SXM, lat)["modelled_us"] for p, t in zip(plan, traffic)]
            out[f"{key}={v}"] = dict(fwd=round(sum(times[:first_bwd]), 1), fwdbwd=round(sum(times), 1))
    return out


def main_loop_readout(plan: dict) -> dict:
    """The main loop's per-iteration SASS readouts (round trips, barriers, wgmma waits, STS per
    thread by width), or zeros for a kernel without loops."""
    main = next((lp for lp in plan["loops"] if lp["main"]), None)
    if main is None:
        return dict(round_trips=0, pipelined=0, barriers=0, wgmma_waits=0, shared_stores={}, loads=0)
    return main["chain"]


def fa2_hdim64_tflops(n_tokens: int, direction: str) -> float:
    """FlashAttention-2's published head-dim-64 H100 rate at sequence length ``n_tokens`` (log-linear
    between the published lengths, the end values beyond them)."""
    xs, ys = FA2_HDIM64_TFLOPS["seqlens"], FA2_HDIM64_TFLOPS[direction]
    if n_tokens <= xs[0]:
        return ys[0]
    if n_tokens >= xs[-1]:
        return ys[-1]
    i = next(j for j in range(1, len(xs)) if n_tokens <= xs[j])
    f = math.log(n_tokens / xs[i - 1]) / math.log(xs[i] / xs[i - 1])
    return ys[i - 1] + f * (ys[i] - ys[i - 1])


def fa2_work_fraction(case) -> float:
    """The share of dense attention's query-key pairs FlashAttention-2 computes for ``case`` (a MODEL input):
    1 for a bidirectional call. Frame-causal (op "vicinity_causal": F frames of L tokens along the grid's first
    axis, no prefix tokens): frame t attends to frames 0..t, so sum_t (t + 1) L^2 of the (F L)^2 pairs,
    (F + 1) / (2 F) (17 / 32 at 16 frames): FA2 with a block-causal mask that skips the masked frame blocks
    whole (frames of 32 x 32 = 1024 tokens are multiples of its 128-token tiles; no partially masked tile), at
    its dense rate: the optimistic end for FA2 (its causal kernels run below their dense rate on short
    sequences)."""
    if case.op != "vicinity_causal":
        return 1.0
    assert case.n_prefix == 0, "the block-causal count has no prefix tokens"
    frames = case.grid[0]
    return (frames + 1) / (2 * frames)


def fa2_published_time(case, direction: str, chip: dict = H100_SXM, dense: bool = False) -> dict:
    """FlashAttention-2 at its published head-dim-64 Hopper rate (forward and backward separately),
    or its HBM floor on ``chip``, whichever is longer, plus its launches (a MODEL). Its FLOPs: dense attention's
    times ``fa2_work_fraction`` (``dense``: all of them)."""
    B, H, N, D, Dv = case.batch, case.heads, case.n_tokens, case.d, case.dv
    fwd_flops = 4 * N * N * D * B * H * (1.0 if dense else fa2_work_fraction(case))
    elem = 2
    fwd_bytes = B * H * N * (2 * D + 2 * Dv) * elem + B * H * N * 4
    bwd_bytes = B * H * N * (2 * D + 3 * Dv + 2 * D + Dv) * elem + B * H * N * 8
    compute = fwd_flops / (fa2_hdim64_tflops(N, "fwd") * 1e12) * 1e6
    memory = fwd_bytes / (chip["hbm_efficiency"] * chip["hbm_bytes_per_s"]) * 1e6
    t = max(compute, memory) + FA2_LAUNCHES["fwd"] * chip["launch_overhead_s"] * 1e6
    if direction != "fwd":
        compute_b = 2.5 * fwd_flops / (fa2_hdim64_tflops(N, "bwd") * 1e12) * 1e6
        memory_b = bwd_bytes / (chip["hbm_efficiency"] * chip["hbm_bytes_per_s"]) * 1e6
        t += max(compute_b, memory_b) + FA2_LAUNCHES["bwd"] * chip["launch_overhead_s"] * 1e6
    return dict(modelled_us=round(t, 3), tflops_fwd=round(fa2_hdim64_tflops(N, "fwd"), 1),
                tflops_bwd=round(fa2_hdim64_tflops(N, "bwd"), 1))


def fa2_time(case, direction: str, chip: dict = H100_SXM) -> dict:
    B, H, N, D, Dv = case.batch, case.heads, case.n_tokens, case.d, case.dv
    fwd_flops = 4 * N * N * D * B * H * fa2_work_fraction(case)
    elem = 2  # bf16
    fwd_bytes = B * H * N * (2 * D + 2 * Dv) * elem + B * H * N * 4   # q, k, v, o + logsumexp
    bwd_bytes = B * H * N * (2 * D + 3 * Dv + 2 * D + Dv) * elem + B * H * N * 8
    flops = fwd_flops * (1 if direction == "fwd" else 3.5)
    nbytes = fwd_bytes + (0 if direction == "fwd" else bwd_bytes)
    launches = FA2_LAUNCHES["fwd"] + (0 if direction == "fwd" else FA2_LAUNCHES["bwd"])
    compute = flops / (FA2_FRACTION * chip["tensor_flops_per_s"]) * 1e6
    memory = nbytes / (chip["hbm_efficiency"] * chip["hbm_bytes_per_s"]) * 1e6
    return dict(flops=flops, bytes=nbytes, compute_us=round(compute, 3), hbm_us=round(memory, 3), launches=launches,
                modelled_us=round(max(compute, memory) + launches * chip["launch_overhead_s"] * 1e6, 3))


def io_floor(case, direction: str, chip: dict = H100_SXM) -> dict:
    """The HBM time of the bytes any implementation of the operation must move (self-attention, N tokens):
    forward reads q, k, v and writes o plus one fp32 statistic per query row (den / logsumexp, saved
    for the backward); the backward reads q, k, v, dO and that statistic and writes dq, dk, dv. This
    is issue 10's "HBM byte floor"; the ``hbm_floor_us`` beside it sums each kernel's own HBM bytes
    (repeated and intermediate traffic included)."""
    rows = case.batch * case.heads * case.n_tokens
    elem = DTYPE_BYTES[case.dtype]
    fwd = rows * (2 * case.d + 2 * case.dv) * elem + rows * 4
    bwd = rows * (2 * case.d + 2 * case.dv) * elem + rows * 4 + rows * (2 * case.d + case.dv) * elem
    nbytes = fwd + (0 if direction == "fwd" else bwd)
    return dict(bytes=nbytes, us=round(nbytes / (chip["hbm_efficiency"] * chip["hbm_bytes_per_s"]) * 1e6, 3))


def combine(plan: dict, traffic: dict) -> dict:
    shapes = {}
    for name in plan:
        p, t = plan[name], traffic[name]
        if [x["kernel"] for x in p] != [x["kernel"] for x in t] or [x["grid"] + [1] * (3 - len(x["grid"])) for x in p] \
                != [x["grid"] for x in t]:
            raise RuntimeError(f"shape {name}: the interpreter run launched differently from the GPU plan: "
                               f"{[(x['kernel'], x['grid']) for x in p]} vs {[(x['kernel'], x['grid']) for x in t]}")
        kernels = []
        for pp, tt in zip(p, t):
            row = kernel_time(pp, tt)
            row["old_modelled_us"] = row.pop("modelled_us")
            row["old_bound"] = row.pop("bound")
            new = {chip: latency_time(pp, tt, spec) for chip, spec in CHIPS.items()}
            row.update(modelled_us=new["H100 SXM"]["modelled_us"], h200_modelled_us=new["H200"]["modelled_us"],
                       bound=new["H100 SXM"]["bound"], main_loop=main_loop_readout(pp),
                       latency=new["H100 SXM"], latency_h200=new["H200"])
            kernels.append(row)
        case = _case(name)
        entry = dict(title=SHAPE_TITLES[name], op=case.op, shape=SHAPES[name] | dict(grid=list(SHAPES[name]["grid"])),
                     n_tokens=case.n_tokens, sensitivity=sensitivity(p, t, _first_bwd(t)))
        for direction in ("fwd", "fwdbwd"):
            ks = kernels if direction == "fwdbwd" else kernels[:_first_bwd(t)]
            fa2 = fa2_time(case, direction)
            io = io_floor(case, direction)
            io200 = io_floor(case, direction, H200)
            modelled = round(sum(k["modelled_us"] for k in ks), 2)
            h200 = round(sum(k["h200_modelled_us"] for k in ks), 2)
            old = round(sum(k["old_modelled_us"] for k in ks), 2)
            fa2_new = fa2_published_time(case, direction)
            entry[direction] = dict(
                modelled_us=modelled, h200_modelled_us=h200, old_modelled_us=old,
                io_floor_us=io["us"], io_bytes=io["bytes"], vs_io_floor=round(modelled / io["us"], 2),
                h200_io_floor_us=io200["us"], h200_vs_io_floor=round(h200 / io200["us"], 2),
                old_vs_io_floor=round(old / io["us"], 2),
                hbm_floor_us=round(sum(k["hbm_us"] for k in ks), 2),
                tensor_floor_us=round(sum(k["tensor_us"] for k in ks), 3),
                issue_floor_us=round(sum(k["issue_us"] for k in ks), 2),
                chain_us=round(sum(k["latency"]["chain_us"] for k in ks), 2),
                stall_free_us=round(stall_free_floor(ks), 2),
                launches=len(ks),
                fa2_modelled_us=fa2_new["modelled_us"], fa2_published=fa2_new,
                fa2_h200_modelled_us=fa2_published_time(case, direction, H200)["modelled_us"],
                fa2_old_modelled_us=fa2["modelled_us"], fa2=fa2, fa2_work_fraction=fa2_work_fraction(case),
                fa2_dense_modelled_us=fa2_published_time(case, direction, dense=True)["modelled_us"], kernels=ks)
        shapes[name] = entry
    return shapes


# Sustained issue rates (warp-instructions per scheduler per cycle) at which the stall-free floor is also
# reported: the top of the estimate's range, and the peak (one a cycle, the old model's rate).
FLOOR_ISSUE_RATES = (0.75, 1.0)


def stall_free_us(kernel: dict, issue_scale: float = 1.0, chip: dict = H100_SXM) -> float:
    """One launch's new-model time with every stall hidden, from its latency readout ``kernel["latency"]``
    (the H100 SXM's; ``latency_h200`` for the H200): its busiest SM only issues its warps' instructions
    (``issue_us``, times ``issue_scale``) and stores to shared memory, bounded below by the device's HBM,
    L2 and tensor floors, plus ``chip``'s launch. No kernel of these instructions can beat it on the
    model, however its latency is hidden (more CTAs per SM, pipelining)."""
    lat = kernel["latency"]
    return (max(lat["issue_us"] * issue_scale, lat["smem_us"], lat["hbm_us"], lat["l2_us"], lat["tensor_us"])
            + chip["launch_overhead_s"] * 1e6)


def stall_free_floor(kernels: list[dict], issue_per_scheduler: float = LATENCY["issue_per_scheduler"]) -> float:
    """The stall-free time of a direction's launches at a sustained issue rate (issue time scales as
    1 / rate at every occupancy: see ``issue_rate``)."""
    return sum(stall_free_us(k, LATENCY["issue_per_scheduler"] / issue_per_scheduler) for k in kernels)


def instruction_cut_for(kernels: list[dict], target_us: float) -> float | None:
    """The smallest fraction of every launch's issued instructions that would have to go for the
    stall-free floor to reach ``target_us`` (0: it already does; None: not even with none left)."""
    def floor(cut):
        return sum(stall_free_us(k, 1.0 - cut) for k in kernels)
    if floor(0.0) <= target_us:
        return 0.0
    if floor(1.0) > target_us:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if floor(mid) <= target_us else (mid, hi)
    return hi


def _reach(e: dict, target_us: float) -> dict:
    """What a target of ``target_us`` (forward + backward entry ``e``) needs on the new model: the
    stall-free floor at the model's issue rate and at FLOOR_ISSUE_RATES, and the instruction cut."""
    if not all("latency" in k for k in e["kernels"]):
        return {}
    cut = instruction_cut_for(e["kernels"], target_us)
    return dict(target_us=round(target_us, 1), issue_per_scheduler=LATENCY["issue_per_scheduler"],
                stall_free_us=round(stall_free_floor(e["kernels"]), 1),
                stall_free_at_issue={str(r): round(stall_free_floor(e["kernels"], r), 1) for r in FLOOR_ISSUE_RATES},
                instruction_cut=None if cut is None else round(cut, 3))


def issue27_targets(shapes: dict) -> dict:
    """Where the modelled kernels stand on issue 27's GPU-time targets (new model, H100 SXM, bf16);
    a target whose shape was not modelled is left out. The two time targets also say what they need
    (``_reach``): the stall-free floor of the current instructions and the cut that would meet them."""
    out = {}
    if "b" in shapes:
        e = shapes["b"]["fwdbwd"]
        out["224x224 fwd+bwd <= 1.5x the I/O floor"] = dict(value=e["vs_io_floor"], old=e["old_vs_io_floor"],
                                                           met=e["vs_io_floor"] <= 1.5,
                                                           **_reach(e, 1.5 * e["io_floor_us"]))
    if "a" in shapes:
        e = shapes["a"]["fwdbwd"]
        ratio = round(e["fa2_modelled_us"] / e["modelled_us"], 2)
        out["VVT stage 1 fwd+bwd >= 10x faster than FlashAttention-2"] = dict(
            value=ratio, old=round(e["fa2_old_modelled_us"] / e["old_modelled_us"], 2), met=ratio >= 10,
            **_reach(e, e["fa2_modelled_us"] / 10))
    if "c" in shapes:
        e = shapes["c"]
        most = max(e["fwd"]["launches"], e["fwdbwd"]["launches"] - e["fwd"]["launches"])
        out["B8 H8 14x14 D32: at most 3 launches per direction"] = dict(value=most, old=most, met=most <= 3)
    heavy = sorted({(k["kernel"], k["ctas_per_sm"]) for name in ("a", "b") if name in shapes
                    for k in shapes[name]["fwdbwd"]["kernels"] if k["ctas_per_sm"] < 2})
    out["at least 2 CTAs per SM (shapes a, b)"] = dict(value=[f"{k}: {c}" for k, c in heavy], old=None,
                                                      met=not heavy)
    return out


def eager_timeline(host_us: float, kernel_us: list[float]) -> float:
    """Modelled wall time of an eager call whose host work takes ``host_us`` and launches kernels of
    ``kernel_us``: the host issues launch i after (i + 1) / n of its work (spread evenly), the GPU runs
    each kernel once it is issued and the previous one has finished; the call ends when both are done."""
    n = len(kernel_us)
    end = 0.0
    for i, t in enumerate(kernel_us):
        end = max(host_us * (i + 1) / n, end) + t
    return max(end, host_us)


def add_host_term(shapes: dict, host: dict) -> None:
    """Beside each shape's GPU-only time, the modelled eager time with the measured host time of the
    public function (``python -m bench.host``), where that run measured the shape."""
    for name, entry in shapes.items():
        measured = host.get("shapes", {}).get(name)
        if measured is None:
            continue
        for direction in ("fwd", "fwdbwd"):
            e, h = entry[direction], measured["modes"][direction]
            e["host_us"] = round(h["public_us"], 1)
            e["eager_us"] = round(eager_timeline(h["public_us"], [k["modelled_us"] for k in e["kernels"]]), 1)
            e["host_bound"] = e["eager_us"] > 1.05 * e["modelled_us"]


def _first_bwd(traffic: list[dict]) -> int:
    """Index of the first launch after the forward phase (the phases the launcher run reported)."""
    return next((i for i, x in enumerate(traffic) if x.get("phase", "fwd") != "fwd"), len(traffic))


# ------------------------------------------------------------------------------------------------

def _child(stage: str, names: list[str], interpret: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    try:
        subprocess.run([sys.executable, "-m", "bench.gpu_model", "--stage", stage, "--stage-out", path,
                        "--shapes", ",".join(names)], env=env, check=True)
        with open(path) as f:
            return json.load(f)
    finally:
        os.remove(path)


def build(names: list[str]) -> dict:
    import torch
    import triton
    plan = _child("plan", names, interpret=False)
    traffic = _child("traffic", names, interpret=True)
    shapes = combine({n: plan[n] for n in names}, {n: traffic[n] for n in names})
    host = {}
    if os.path.exists(HOST_RESULTS):
        with open(HOST_RESULTS) as f:
            host = json.load(f)
        add_host_term(shapes, host)
    from tools.compile_gate import source_stamp
    return dict(
        label="MODEL, not a measurement: computed from the launch plan and SASS of the current kernels",
        source=source_stamp(),
        command="python -m bench.gpu_model", triton=triton.__version__, torch=torch.__version__, chip=H100_SXM,
        chips=CHIPS, latency_constants=LATENCY, fa2_hdim64_tflops=FA2_HDIM64_TFLOPS,
        fa2_fraction_of_peak=FA2_FRACTION,
        method=__doc__.split("Nothing here")[1].split("Constants (")[0].strip(),
        host=dict(source=os.path.relpath(HOST_RESULTS, os.path.dirname(RESULTS)), triton=host.get("triton"),
                  label="host time MEASURED on a CPU (python -m bench.host: launches stubbed after Triton's "
                        "binding); eager time = a MODEL combining it with the modelled kernels") if host else None,
        shapes=shapes, targets=issue27_targets(shapes))


def kernel_table(model: dict) -> str:
    """The per-kernel table (forward + backward launches of every shape), all figures MODEL."""
    head = (f"{'shape':<10} {'role':<12} {'kernel':<22} {'regs':>4} {'CTA/SM':>6} {'RT/it':>5} {'BAR/it':>6} "
            f"{'STS/it (bits:n)':<22} {'old us':>8} {'new H100':>9} {'new H200':>9}  bound (new, H100)")
    lines = [head, "-" * len(head)]
    for name, entry in model["shapes"].items():
        for k in entry["fwdbwd"]["kernels"]:
            m = k["main_loop"]
            sts = " ".join(f"{w}:{n}" for w, n in sorted(m["shared_stores"].items(), key=lambda x: -int(x[0])))
            lines.append(f"{name:<10} {k['role']:<12} {k['kernel']:<22} {k['regs']:>4} {k['ctas_per_sm']:>6} "
                         f"{m['round_trips']:>5} {m['barriers']:>6} {sts or '-':<22} {k['old_modelled_us']:>8.1f} "
                         f"{k['modelled_us']:>9.1f} {k['h200_modelled_us']:>9.1f}  {k['bound']}")
    lines.append("RT/it, BAR/it, STS/it: per main-loop iteration, from the sm_90a SASS; times are a MODEL.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=RESULTS, help="JSON output (default bench/results/gpu-model.json)")
    parser.add_argument("--no-doc", action="store_true",
                        help="do not rewrite the generated section of docs/gpu-model.md")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    parser.add_argument("--stage", choices=("plan", "traffic"), help=argparse.SUPPRESS)
    parser.add_argument("--stage-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = [n for n in args.shapes.split(",") if n]
    if args.stage:
        result = stage_plan(names) if args.stage == "plan" else stage_traffic(names)
        with open(args.stage_out, "w") as f:
            json.dump(result, f)
        return 0
    model = build(names)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(model, f, indent=1)
    for name, entry in model["shapes"].items():
        for direction in ("fwd", "fwdbwd"):
            e = entry[direction]
            print(f"({name}) {entry['title']:<40} {direction:<6} new model H100 {e['modelled_us']:8.1f} us, "
                  f"H200 {e['h200_modelled_us']:8.1f} us, old model {e['old_modelled_us']:8.1f} us  "
                  f"(I/O floor {e['io_floor_us']:6.1f}: {e['vs_io_floor']:4.2f}x, old {e['old_vs_io_floor']:4.2f}x; "
                  f"{e['launches']} launches)  FA2 model {e['fa2_modelled_us']:8.1f} us   [MODEL]")
    print()
    print(kernel_table(model))
    print(f"wrote {args.out}")
    if not args.no_doc:
        from .gpu_model_doc import rewrite_doc
        print(f"rewrote {rewrite_doc(model)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
