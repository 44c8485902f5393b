"""Capture what the launchers would launch on a GPU, without a GPU.

The launchers in ``vicinity_attn.kernels`` are called on CPU tensors shaped and laid out like a real
call. Every ``kernel[grid](...)`` goes through Triton's own ``JITFunction.run`` (so the binding, the
``do_not_specialize`` choices, the divisibility and ==1 specialisation of the concrete argument
values and the option parsing are Triton's, for the target asked for); only the last step is
replaced: instead of compiling and launching, the specialisation is recorded. The compile gate
builds exactly these specialisations, and the GPU model reads grids and arguments from them.

Needs the interpreter off (``TRITON_INTERPRET`` unset or 0) when triton is imported: interpreted
functions have no specialisation. Operations register in OPERATIONS (one entry per operation: how
to launch it from a LaunchCase, and a name for each kernel launch in order): vicinity attention
(with and without the VVT clamp / L2ViT floor) and k-NN attention (``knn``: a LaunchCase's grid is
then just the query count; ``knn_settings`` reads its key count, topk and wanted gradients).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


@dataclass(frozen=True)
class LaunchCase:
    """One call of an operation: shapes, dtype, memory layout and the geometry of the positions.

    ``strides``: "aligned" = contiguous tensors in ``layout``; "unaligned" = views one element into a
    buffer whose rows are one element longer (misaligned pointers, odd row strides).
    """

    dtype: str = "bf16"
    d: int = 64
    dv: int = 64
    layout: str = "bhnd"
    strides: str = "aligned"
    batch: int = 2
    heads: int = 2
    grid: tuple = (32, 32)
    variant: str = "sum"
    feature_map: str = "relu"
    n_prefix: int = 0
    op: str = "vicinity"
    extra: tuple = ()     # operation-specific settings as ((name, value), ...), e.g. for other operations

    @property
    def n_tokens(self) -> int:
        return self.n_prefix + math.prod(self.grid)

    def label(self) -> str:
        if self.op == "knn":     # k-NN attention has no geometry: the token count (queries) says it all
            geo = f"N{self.n_tokens}"
        else:
            geo = (f"{self.variant}-{'x'.join(map(str, self.grid))}{'+p' + str(self.n_prefix) if self.n_prefix else ''}"
                   f"/{self.feature_map}")
        extra = "".join(f" {k}={v}" for k, v in self.extra)
        return (f"{self.op} {self.dtype} D{self.d}/{self.dv} {self.layout} {self.strides} B{self.batch}H{self.heads} "
                f"{geo}{extra}")

    @property
    def aligned(self) -> bool:
        """Every pointer 16-byte aligned and every stride a multiple of 16 elements (what vector loads need)."""
        return self.strides == "aligned" and self.d % 16 == 0 and self.dv % 16 == 0


def make_tensor(case: LaunchCase, n: int, e: int, fill: Callable | None = None) -> torch.Tensor:
    """A [B, H, n, e] view laid out as ``case.layout`` / ``case.strides`` (values: ``fill`` or uninitialised)."""
    B, H = case.batch, case.heads
    pad = 1 if case.strides == "unaligned" else 0
    storage = (B, H, n, e + pad) if case.layout == "bhnd" else (B, n, H, e + pad)
    dtype = DTYPES[case.dtype]
    buf = fill(storage, dtype) if fill else torch.empty(storage, dtype=dtype)
    t = buf[..., pad:pad + e]
    return t if case.layout == "bhnd" else t.transpose(1, 2)


@dataclass
class Launch:
    """One kernel launch: the JIT function, its grid and call arguments, and per target the
    specialisation Triton's launch path derived (signature, constexprs, attrs, options)."""

    role: str
    fn: object
    grid: tuple
    args: tuple
    kwargs: dict
    spec: dict = field(default_factory=dict)   # arch -> (signature, constexprs, attrs, options dict)

    @property
    def kernel(self) -> str:
        return self.fn.fn.__name__

    @property
    def module(self) -> str:
        return self.fn.fn.__module__


# ------------------------------------------------------------------------------------------------
# Operations: how to run each one's launchers for a case, and the role of each launch.

def _vicinity_grads(extra: dict) -> str:
    """The inputs a vicinity case wants gradients for (``case.extra`` "grads"): "qkv" (default; backward
    phase "bwd") or "kv" (phase "bwd_kv": no dq pass, so the row weights take their own launch)."""
    grads = str(extra.get("grads", "qkv"))
    assert grads in ("qkv", "kv"), grads
    return grads


def _run_vicinity(case: LaunchCase, phase: Callable[[str], None], fill: Callable | None = None) -> None:
    """The forward and backward launchers; ``case.extra`` may set ``den_floor`` and ``clamp`` (the
    L2ViT floor and the VVT clamp, which add their own launches: see ``VICINITY_CLAMP_ROLES``) and
    ``grads`` (``_vicinity_grads``)."""
    from vicinity_attn.common.allocation import empty_grads_like, empty_output_like
    from vicinity_attn.kernels.vicinity import Geometry, vicinity_backward, vicinity_forward

    n = case.n_tokens
    q, k, v = (make_tensor(case, n, case.d, fill), make_tensor(case, n, case.d, fill),
               make_tensor(case, n, case.dv, fill))
    o = empty_output_like(q, case.dv)
    geom = Geometry.build(case.grid, case.grid, case.variant, case.feature_map, case.n_prefix)
    phase("fwd")
    extra = dict(case.extra)
    eps, den_floor, clamp = 1e-4, float(extra.get("den_floor", 0.0)), extra.get("clamp")
    grads = _vicinity_grads(extra)
    den, S, z = vicinity_forward(q, k, v, o, geom, eps, den_floor, clamp)
    phase("bwd" if grads == "qkv" else f"bwd_{grads}")
    do = make_tensor(case, n, case.dv, fill) if case.strides == "unaligned" else empty_output_like(q, case.dv)
    if fill is not None and case.strides != "unaligned":
        do.copy_(fill(do.shape, do.dtype))
    dq, dk, dv = empty_grads_like((q, k, v), tuple(c in grads for c in "qkv"))
    vicinity_backward(do, q, k, v, o, den, S, z, dq, dk, dv, geom, eps, den_floor, clamp)


def _run_vicinity_varlen(case: LaunchCase, phase: Callable[[str], None], fill: Callable | None = None) -> None:
    """The packed (varlen) launchers on ``case.batch`` sequences: case.grid, then each further one with
    its axes halved (mixed resolutions, as many axes); packed [T, H, E] tensors (layout "bnhd" of one
    batch entry), with ``case.strides``. ``case.extra`` may set ``den_floor``, ``clamp`` and ``grads``."""
    from dataclasses import replace

    from vicinity_attn.kernels.vicinity import Geometry, Packing, vicinity_backward, vicinity_forward

    grids = [tuple(max(1, s >> i) for s in case.grid) for i in range(case.batch)]
    pack = Packing.build(grids, grids, case.n_prefix, torch.device("cpu"))
    packed = replace(case, batch=1, layout="bnhd")
    T = sum(pack.q_lengths)
    q, k, v = (make_tensor(packed, T, e, fill) for e in (case.d, case.d, case.dv))
    o = make_tensor(packed, T, case.dv, fill)
    geom = Geometry.build(grids[0], grids[0], case.variant, case.feature_map, case.n_prefix)
    extra = dict(case.extra)
    eps, den_floor, clamp = 1e-4, float(extra.get("den_floor", 0.0)), extra.get("clamp")
    grads = _vicinity_grads(extra)
    phase("fwd")
    den, S, z = vicinity_forward(q, k, v, o, geom, eps, den_floor, clamp, pack=pack)
    phase("bwd" if grads == "qkv" else f"bwd_{grads}")
    do, dq, dk, dv = (make_tensor(packed, T, e, fill) for e in (case.dv, case.d, case.d, case.dv))
    dq = dq if "q" in grads else None
    vicinity_backward(do, q, k, v, o, den, S, z, dq, dk, dv, geom, eps, den_floor, clamp, pack=pack)


def _run_vicinity_causal(case: LaunchCase, phase: Callable[[str], None], fill: Callable | None = None) -> None:
    """The frame-causal launchers (``causal="frames"``: kernels/vicinity/launch_frames.py) over case.grid (frames
    along its first axis): forward, the backward's query side (phase "bwd", or "bwd_kv" without dq) and its key
    side (phase "bwd_keys"). ``case.extra`` may set ``den_floor``, ``clamp``, ``grads`` (``_vicinity_grads``) and
    ``start``: a window of the frames start.. (no prefix tokens) with an init and a carry_grad."""
    import math

    from vicinity_attn.common.allocation import empty_grads_like, empty_output_like
    from vicinity_attn.kernels.vicinity import Geometry
    from vicinity_attn.kernels.vicinity.launch_frames import (
        frame_backward_keys,
        frame_backward_queries,
        frame_forward,
    )

    extra = dict(case.extra)
    eps, den_floor, clamp = 1e-4, float(extra.get("den_floor", 0.0)), extra.get("clamp")
    grads = _vicinity_grads(extra)
    start = int(extra.get("start", 0))
    n = (case.n_prefix if start == 0 else 0) + (case.grid[0] - start) * math.prod(case.grid[1:])
    q, k, v = (make_tensor(case, n, case.d, fill), make_tensor(case, n, case.d, fill),
               make_tensor(case, n, case.dv, fill))
    o = empty_output_like(q, case.dv)
    geom = Geometry.build(case.grid, case.grid, case.variant, case.feature_map, case.n_prefix)
    pair = None
    if start:
        B, H, F = case.batch, case.heads, geom.n_feat
        pair = (torch.zeros(B, H, F, case.d, case.dv), torch.zeros(B, H, F, case.d))   # fp32: the GPU's ACC
    phase("fwd")
    den, S, z, _carry = frame_forward(q, k, v, o, geom, eps, den_floor, clamp, start, pair)
    phase("bwd" if grads == "qkv" else f"bwd_{grads}")
    do = make_tensor(case, n, case.dv, fill) if case.strides == "unaligned" else empty_output_like(q, case.dv)
    if fill is not None and case.strides != "unaligned":
        do.copy_(fill(do.shape, do.dtype))
    dq, dk, dv = empty_grads_like((q, k, v), tuple(c in grads for c in "qkv"))
    dpre, _init_grad = frame_backward_queries(do, q, o, den, S, z, dq, geom, eps, den_floor, clamp, start)
    phase("bwd_keys")
    frame_backward_keys(k, v, dpre, dk, dv, geom, start, pair)


# (phase, kernel name, occurrence in that phase) -> role; occurrence None matches every launch.
# A launch not listed here still appears, named "<phase>_<kernel>_<occurrence>".
VICINITY_ROLES = {
    ("fwd", "state_partial_kernel", 0): "fwd_state",
    ("fwd", "output_pass_kernel", 0): "fwd_output",
    ("bwd", "query_pass_kernel", 0): "bwd_queries",   # dq and the state gradients in one launch
    ("bwd", "dq_pass_kernel", 0): "bwd_dq",       # computes the row weights too
    ("bwd", "state_partial_kernel", 0): "bwd_state",
    ("bwd", "key_pass_kernel", 0): "bwd_keys",
    # Without dq (case.extra grads "kv") the row weights take their own launch.
    ("bwd_kv", "row_weights_kernel", 0): "bwd_row_weights",
    ("bwd_kv", "state_partial_kernel", 0): "bwd_state",
    ("bwd_kv", "key_pass_kernel", 0): "bwd_keys",
}

# With clamp=(lo, hi) the forward clamps the states in place and the output pass clamps in its
# epilogue; the backward first recomputes the unclamped numerator (an output pass without den).
VICINITY_CLAMP_ROLES = {
    ("fwd", "state_partial_kernel", 0): "fwd_state",
    ("fwd", "state_clamp_kernel", 0): "clamp_states",
    ("fwd", "output_pass_kernel", 0): "fwd_output_clamp",
    ("bwd", "output_pass_kernel", 0): "bwd_numerator",
    ("bwd", "clamped_row_weights_kernel", 0): "bwd_row_weights_clamp",
    ("bwd", "dq_pass_kernel", 0): "bwd_dq",
    ("bwd", "state_partial_kernel", 0): "bwd_state",
    ("bwd", "state_grad_mask_kernel", 0): "clamp_grad_mask",
    ("bwd", "key_pass_kernel", 0): "bwd_keys",
}


# Frame-causal launches (``_run_vicinity_causal``): the per-slot state passes, the slot scans (prefix over
# slots in the forward, the clamp mask and the sum over slots on the query side, the suffix on the key
# side: S / dS first, then z / dz), and the per-token passes reading each token's slot.
VICINITY_CAUSAL_ROLES = {
    ("fwd", "state_partial_kernel", 0): "causal_fwd_state",
    ("fwd", "slot_scan_kernel", 0): "causal_prefix_S",
    ("fwd", "slot_scan_kernel", 1): "causal_prefix_z",
    ("fwd", "output_pass_kernel", 0): "causal_fwd_output",
    ("bwd", "output_pass_kernel", 0): "causal_bwd_numerator",      # the clamp only
    ("bwd", "clamped_row_weights_kernel", 0): "bwd_row_weights_clamp",
    ("bwd", "dq_pass_kernel", 0): "causal_bwd_dq",
    ("bwd", "state_partial_kernel", 0): "causal_bwd_state",
    ("bwd", "slot_scan_kernel", 0): "causal_mask_dS",
    ("bwd", "slot_scan_kernel", 1): "causal_sum_dz",
    ("bwd_kv", "row_weights_kernel", 0): "bwd_row_weights",
    ("bwd_kv", "state_partial_kernel", 0): "causal_bwd_state",
    ("bwd_kv", "slot_scan_kernel", 0): "causal_mask_dS",
    ("bwd_kv", "slot_scan_kernel", 1): "causal_sum_dz",
    ("bwd_keys", "slot_scan_kernel", 0): "causal_suffix_dS",
    ("bwd_keys", "slot_scan_kernel", 1): "causal_suffix_dz",
    ("bwd_keys", "key_pass_kernel", 0): "causal_bwd_keys",
}


def knn_settings(case: LaunchCase) -> tuple[int, int, str]:
    """(n_keys, topk, grads) of a k-NN case: ``case.extra`` may set ``n_keys`` (default: the query count
    ``case.n_tokens``), ``topk`` (default Nk // 2 + 1: odd, so never a multiple of 16, which a launch
    would specialise) and ``grads`` (the inputs that need gradients: "qkv" (default), "qk", or "v")."""
    extra = dict(case.extra)
    n_keys = int(extra.get("n_keys", case.n_tokens))
    return n_keys, int(extra.get("topk", n_keys // 2 + 1)), str(extra.get("grads", "qkv"))


def _run_knn(case: LaunchCase, phase: Callable[[str], None], fill: Callable | None = None) -> None:
    """The k-NN forward and backward launchers (``kernels/knn/launch.py``) for q [B, H, n_tokens, d],
    k and v with ``knn_settings(case)``'s key count; the backward computes the gradients ``grads`` names
    (its phase is "bwd" for all three, "bwd_qk" / "bwd_v" otherwise: see ``KNN_ROLES``)."""
    from vicinity_attn.common.allocation import empty_grads_like, empty_output_like
    from vicinity_attn.kernels.knn import knn_backward, knn_forward

    n_keys, topk, grads = knn_settings(case)
    assert grads in ("qkv", "qk", "v"), grads
    n = case.n_tokens
    q, k, v = make_tensor(case, n, case.d, fill), make_tensor(case, n_keys, case.d, fill), \
        make_tensor(case, n_keys, case.dv, fill)
    o = empty_output_like(q, case.dv)
    scale = case.d ** -0.5
    phase("fwd")
    tau, lse = knn_forward(q, k, v, o, topk, scale)
    phase("bwd" if grads == "qkv" else f"bwd_{grads}")
    do = make_tensor(case, n, case.dv, fill) if case.strides == "unaligned" else empty_output_like(q, case.dv)
    if fill is not None and case.strides != "unaligned":
        do.copy_(fill(do.shape, do.dtype))
    dq, dk, dv = empty_grads_like((q, k, v), tuple(c in grads for c in "qkv"))
    knn_backward(do, q, k, v, o, tau, lse, dq, dk, dv, scale)


# The selection pass keeps a whole row of scores on chip when Nk fits one key tile (ROW_ON_CHIP, a
# constexpr of the same kernel and role). The dk / dv pass is one kernel with NEED_DK / NEED_DV flags:
# its role says which gradients it computes.
KNN_ROLES = {
    ("fwd", "knn_threshold_kernel", 0): "knn_select",
    ("fwd", "knn_forward_kernel", 0): "knn_fwd",
    ("bwd", "row_delta_kernel", 0): "knn_delta",
    ("bwd", "knn_dq_kernel", 0): "knn_dq",
    ("bwd", "knn_dkdv_kernel", 0): "knn_dkdv",
    ("bwd_qk", "row_delta_kernel", 0): "knn_delta",
    ("bwd_qk", "knn_dq_kernel", 0): "knn_dq",
    ("bwd_qk", "knn_dkdv_kernel", 0): "knn_dk",
    ("bwd_v", "knn_dkdv_kernel", 0): "knn_dv",
}


@dataclass(frozen=True)
class Operation:
    run: Callable       # run(case, phase, fill=None): calls the launchers, calling phase(name) before each phase
    roles: dict         # (phase, kernel, occurrence | None) -> role name


# Extension point: another operation adds an entry here (and a matrix in compile_gate.MATRICES).
OPERATIONS: dict[str, Operation] = {"vicinity": Operation(_run_vicinity, VICINITY_ROLES),
                                    "vicinity_clamp": Operation(_run_vicinity, VICINITY_CLAMP_ROLES),
                                    # Packed sequences (VARLEN=True launches of the same kernels).
                                    "vicinity_varlen": Operation(_run_vicinity_varlen, VICINITY_ROLES),
                                    "vicinity_varlen_clamp": Operation(_run_vicinity_varlen, VICINITY_CLAMP_ROLES),
                                    # Frame-causal (causal="frames": FRAMES=True launches and the slot scans).
                                    "vicinity_causal": Operation(_run_vicinity_causal, VICINITY_CAUSAL_ROLES),
                                    "knn": Operation(_run_knn, KNN_ROLES)}


def _role(roles: dict, phase: str, kernel: str, occurrence: int) -> str:
    return (roles.get((phase, kernel, occurrence)) or roles.get((phase, kernel, None))
            or f"{phase}_{kernel}_{occurrence}")


# ------------------------------------------------------------------------------------------------
# Interception of Triton's launch path.

class _FakeDriver:
    """Just enough of a Triton driver for JITFunction.run to bind arguments for ``arch``."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_device(self):
        return self.arch            # one binder (and backend) per target

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", self.arch, 32)


@contextlib.contextmanager
def _intercept(arch: int, on_launch: Callable, on_spec: Callable):
    from triton.runtime.driver import driver as triton_driver
    from triton.runtime.jit import JITFunction

    orig_run, orig_compile = JITFunction.run, JITFunction._do_compile

    def run(self, *args, grid, warmup, **kwargs):
        on_launch(self, grid, args, dict(kwargs))
        return orig_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        on_spec(dict(signature), dict(constexprs), dict(attrs), dict(options.__dict__))
        return None  # run() returns before launching

    previous = triton_driver._active   # None until a real driver was asked for (none exists here)
    triton_driver.set_active(_FakeDriver(arch))
    JITFunction.run, JITFunction._do_compile = run, do_compile
    try:
        yield
    finally:
        JITFunction.run, JITFunction._do_compile = orig_run, orig_compile
        triton_driver._active = previous


def capture(case: LaunchCase, archs: tuple = (80, 90)) -> dict[int, list[Launch]]:
    """The launches of one forward + backward call of ``case`` per arch (the launchers may plan
    differently per target: ``kernels.runtime.target_arch``), each with Triton's specialisation."""
    from vicinity_attn.kernels.runtime import interpreting
    assert not interpreting(), "launch capture needs TRITON_INTERPRET unset (interpreted kernels do not specialise)"
    op = OPERATIONS[case.op]
    plans: dict[int, list[Launch]] = {}
    for arch in archs:
        launches: list[Launch] = []
        state = {"phase": "", "counts": {}}

        def phase(name):
            state["phase"], state["counts"] = name, {}

        def on_launch(fn, grid, args, kwargs):
            name = fn.fn.__name__
            occ = state["counts"].get(name, 0)
            state["counts"][name] = occ + 1
            launches.append(Launch(_role(op.roles, state["phase"], name, occ), fn, tuple(grid), args, kwargs))

        def on_spec(signature, constexprs, attrs, options):
            launches[-1].spec[arch] = (signature, constexprs, attrs, options)

        with _intercept(arch, on_launch, on_spec):
            op.run(case, phase)
        plans[arch] = launches
    return plans
