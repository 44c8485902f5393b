"""GPU numerics in the interpreter: the dots round their operands as a tensor core would
(kernels/runtime.py), so these tests see the precision a GPU run has.

1. ``mma``'s emulation against torch's own roundings (fp16 / bf16 casts, TF32, TF32x3) and the
   exact opt-out (VICINITY_ATTN_EXACT_DOTS=1).
2. fp16 / bf16 inputs N(0, sigma^2), sigma in {0.03, 0.1, 1}, on a 64 x 64 grid with D = Dv = 64,
   forward and gradients against the float64 reference by the tolerance rule. The states are
   scaled by ~1/N, which makes their magnitudes (and what fp16 does to them) a matter of sigma and
   of N alike; one query meets no key at all (den = eps), the case whose 1/den overflowed fp16.

On a CUDA machine (TRITON_INTERPRET=0) part 2 runs on the GPU itself.
"""
import functools
import math
import os

import pytest
import torch

from tests.helpers import FLOOR, outputs_and_grads, rel_err

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (set by tests/conftest.py) or a CUDA device", allow_module_level=True)
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from vicinity_attn.kernels import runtime  # noqa: E402
from vicinity_attn.kernels.common import mma  # noqa: E402
from vicinity_attn.kernels.vicinity import configs  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"


# --- 1. the emulated dot ---------------------------------------------------------------------------

@triton.jit
def _mma_kernel(a_ptr, b_ptr, out_ptr, M: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    offs = tl.arange(0, M)
    a = tl.load(a_ptr + offs[:, None] * M + offs[None, :])
    b = tl.load(b_ptr + offs[:, None] * M + offs[None, :])
    acc = mma(a, b, tl.zeros((M, M), tl.float32), DOT, PREC)
    tl.store(out_ptr + offs[:, None] * M + offs[None, :], acc)


def _run_mma(a, b, prec: runtime.Precision):
    out = torch.empty(a.shape, dtype=torch.float32, device=DEVICE)
    _mma_kernel[(1,)](a, b, out, M=a.shape[0], DOT=prec.dot, PREC=prec.prec)
    return out.double()


def _tf32_nearest(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> TF32 (10 mantissa bits), to nearest with ties away from zero (cvt.rna.tf32.f32)."""
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    bits = ((bits + 0x1000) >> 13) << 13
    return torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits).to(torch.int32).view(torch.float32)


def _exact(a, b):
    return a.double() @ b.double()


@pytest.mark.skipif(not INTERPRET, reason="the emulation exists only in the interpreter")
@pytest.mark.parametrize("dtype,dot", [(torch.float16, None), (torch.bfloat16, None),
                                       (torch.float16, torch.float32), (torch.float32, None)])
def test_emulated_dot_rounds_like_the_gpu(dtype, dot):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(16, 16, generator=g) * 3
    b = torch.randn(16, 16, generator=g) / 7
    # Halfway cases for bf16 (ties to even) and TF32 (ties away): 1 + 2^-8 + 2^-9 sits between bf16 values.
    a[0, :4] = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -11, -(1 + 2 ** -11)])
    prec = runtime.pick_precision(dtype, dot)
    got = _run_mma(a, b, prec)
    if prec.prec == "emulate_fp16":
        want = _exact(a.half(), b.half())
    elif prec.prec == "emulate_bf16":
        want = _exact(a.bfloat16(), b.bfloat16())  # torch rounds fp32 -> bf16 to nearest even
    elif prec.prec == "emulate_tf32":
        want = _exact(_tf32_nearest(a), _tf32_nearest(b))
    else:
        assert prec.prec == "emulate_tf32x3"
        want = _exact(a, b)
    assert prec.prec.startswith("emulate_")
    assert rel_err(got, want) < 1e-6, (prec, rel_err(got, want))
    # ... and not the exact fp32 product (the test can tell them apart), except for tf32x3.
    if prec.prec != "emulate_tf32x3":
        assert rel_err(got, _exact(a, b)) > 1e-5


@pytest.mark.skipif(not INTERPRET, reason="the emulation exists only in the interpreter")
def test_exact_dots_opt_in(monkeypatch):
    monkeypatch.setenv(runtime.EXACT_DOTS_ENV, "1")
    prec = runtime.pick_precision(torch.float16)
    assert prec == runtime.Precision(tl.float32, tl.float32, "ieee")
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(16, 16, generator=g), torch.randn(16, 16, generator=g)
    assert rel_err(_run_mma(a, b, prec), _exact(a, b)) < 1e-6


def test_gpu_precisions_are_what_the_launchers_use():
    """fp16: tensor-core fp16 only where the operands are bounded by the inputs (forward state
    pass); TF32 (fp32 range) wherever a state or 1/den multiplies. bf16: bf16 throughout."""
    for launch in ("fwd_output", "bwd_dq", "bwd_state", "bwd_keys"):
        assert configs.dot_precision(launch, torch.float16, interpret=False).prec == "tf32"
        assert configs.dot_precision(launch, torch.float16, interpret=False).dot == tl.float32
    assert configs.dot_precision("fwd_state", torch.float16, interpret=False).dot == tl.float16
    for launch in ("fwd_state", "fwd_output", "bwd_state"):
        assert configs.dot_precision(launch, torch.bfloat16, interpret=False).dot == tl.bfloat16
        assert configs.dot_precision(launch, torch.float32, interpret=False).prec == "tf32x3"


# --- 2. realistic scales ---------------------------------------------------------------------------

GRID = (64, 64)
HEAD = 64


@functools.lru_cache(maxsize=1)
def _case(sigma: float):
    """q, k, v ~ N(0, sigma^2) [1, 1, N, 64] in float64, dO ~ N(0, 1), and the float64 reference's
    (o, dq, dk, dv) (computed once per sigma for both dtypes). Query 0 meets no key: it is positive
    only in feature 0, where every key is negative, so its den is eps exactly."""
    n = math.prod(GRID)
    g = torch.Generator().manual_seed(int(sigma * 100))
    q, k, v = (sigma * torch.randn(1, 1, n, HEAD, generator=g, dtype=torch.float64) for _ in range(3))
    do = torch.randn(1, 1, n, HEAD, generator=g, dtype=torch.float64)
    k[..., 0] = -k[..., 0].abs()
    q[..., 0, :] = -q[..., 0, :].abs()
    q[..., 0, 0] = q[..., 0, 0].abs()
    ref = outputs_and_grads(*(t.clone().requires_grad_(True) for t in (q, k, v)), do, grid=GRID,
                            backend="reference")
    return (q, k, v, do), [t.detach() for t in ref]


@pytest.fixture
def large_interpreter_blocks(monkeypatch):
    """512-token blocks (2 chunks of 4 in the state passes): the interpreter's cost is per program and
    op, so 32x fewer programs than its default 16-token blocks (about 5x faster than the GPU's 64).
    Every dot operand is rounded the same way; only the order of the fp32 sums differs. The memoised
    launch plans are dropped before and after: they were planned with the other constants."""
    runtime.clear_plan_caches()
    monkeypatch.setattr(configs, "INTERPRET_BLOCK_N", 512)
    monkeypatch.setattr(configs, "INTERPRET_BLOCKS_PER_CHUNK", 4)
    yield
    monkeypatch.undo()
    runtime.clear_plan_caches()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("sigma", [0.03, 0.1, 1.0])
def test_realistic_scales_tolerance_rule(sigma, dtype, large_interpreter_blocks):
    """The tolerance rule (error <= 2x the plain computation's in the dtype, plus a floor). The "plain
    computation in T" is the linear torch backend fed T inputs (fp32 inside, T out): the quadratic
    reference in T is no baseline here (sums of 4096 scores pass fp16's 65504 at sigma = 1, its error there
    is ~1) and the linear one's error, about that of rounding the inputs and outputs alone, makes the
    stricter rule."""
    (q, k, v, do), ref = _case(sigma)
    plain = outputs_and_grads(*(t.to(dtype).requires_grad_(True) for t in (q, k, v)), do, grid=GRID,
                              backend="torch")
    got = outputs_and_grads(*(t.to(dtype).to(DEVICE).requires_grad_(True) for t in (q, k, v)), do.to(DEVICE),
                            grid=GRID, backend="triton")
    failures = []
    for name, g, r, p in zip(("out", "dq", "dk", "dv"), got, ref, plain):
        assert g.dtype == dtype and torch.isfinite(g).all(), f"{name}: non-finite values"
        err, plain_err = rel_err(g, r), rel_err(p, r)
        allowed = 2 * plain_err + FLOOR[dtype]
        if err > allowed:
            failures.append(f"{name}: error {err:.3e} > allowed {allowed:.3e} (plain {plain_err:.3e})")
    assert not failures, failures
