"""The triton backend, run through the Triton interpreter (CPU tensors) when no GPU is present.

tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton; on a CUDA machine with
TRITON_INTERPRET=0 the same tests run on the GPU (tests.helpers.triton_device). There, float64 cases skip
with the reason (the API refuses float64 on CUDA: tests.helpers.triton_dtype), the launcher-level float64
checks keep to the interpreter, and the "exact" checks run in float32 with the GPU's tolerance
(tests.helpers.exact_case). Shapes are tiny: the interpreter costs about a millisecond per program per loop step.
"""
import math
import os

import pytest
import torch

from tests.helpers import (
    INTERPRETER_ONLY,
    assert_rule,
    check_against_reference,
    exact_case,
    make_inputs,
    outputs_and_grads,
    rel_err,
    token_counts,
    triton_device,
    triton_dtype,
)
from vicinity_attn import position_features, vicinity_attention

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = triton_device()
if DEVICE is None:
    pytest.skip("triton backend tests need TRITON_INTERPRET=1 (set by tests/conftest.py) or a CUDA device",
                allow_module_level=True)
pytest.importorskip("triton")

from vicinity_attn.kernels import runtime  # noqa: E402
from vicinity_attn.vicinity import triton_backend  # noqa: E402


def run_case(grid, kv_grid=None, *, D=16, Dv=24, B=1, H=2, dtype=torch.float64, layout="bhnd", prefix=0,
             variant="sum", feature_map="relu"):
    nq, nk = token_counts(grid, kv_grid, prefix)
    q, k, v = make_inputs(B, H, nq, nk, D, Dv, dtype=triton_dtype(dtype, DEVICE), layout=layout, device=DEVICE,
                          feature_map=feature_map)
    return check_against_reference(q, k, v, grid=grid, kv_grid=kv_grid, variant=variant, layout=layout,
                                   feature_map=feature_map, num_prefix_tokens=prefix, backend="triton")


# --- the in-kernel position features -------------------------------------------------------------

@pytest.mark.parametrize("grid", [(7,), (3, 5), (2, 3, 4)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_position_feature_helper_matches_position_features(grid, dtype):
    import triton

    from vicinity_attn.kernels.vicinity.geometry import VARIANT_CODES, feature_count
    from vicinity_attn.kernels.vicinity.positions import _position_features_kernel

    if dtype == torch.float64 and not INTERPRET:
        pytest.skip(INTERPRETER_ONLY)
    tol = 1e-14 if dtype == torch.float64 else 1e-6
    for variant in ("none", "sum", "product"):
        for prefix in (0, 2):
            for side in ("query", "key"):
                F = feature_count(len(grid), VARIANT_CODES[variant], prefix > 0)
                N = prefix + math.prod(grid)
                out = torch.full((2, N, F), float("nan"), dtype=dtype, device=DEVICE)
                sizes = list(grid) + [1] * (3 - len(grid))
                # axis 1 of the launch grid is the runtime feature index (second half of `out`)
                _position_features_kernel[(triton.cdiv(N, 16), F)](
                    out, N, prefix, *sizes, N_FEAT=F, N_AXES=len(grid), VARIANT=VARIANT_CODES[variant],
                    HAS_PREFIX=prefix > 0, IS_QUERY=side == "query", BLOCK=16)
                ref = position_features(grid, variant, side=side, num_prefix_tokens=prefix, dtype=torch.float64)
                for half in (0, 1):
                    err = (out[half].cpu().double() - ref).abs().max().item()
                    assert err < tol, (variant, prefix, side, half, err)


# --- forward and gradients against the float64 reference ------------------------------------------

@pytest.mark.parametrize("variant", ["sum", "product", "none"])
@pytest.mark.parametrize("grid", [(37,), (5, 7), (2, 3, 4)], ids=["1d", "2d", "3d"])
def test_variants_and_axes_fp64(variant, grid):
    run_case(grid, variant=variant)


@pytest.mark.parametrize("grid,kv_grid,variant", [
    ((6, 5), (3, 2), "sum"),
    ((4, 6), (2, 3), "product"),
    ((2, 4, 4), (1, 2, 2), "sum"),
    ((33,), (9,), "product"),
    ((1, 9), (1, 3), "product"),
])
def test_cross_grids_fp64(grid, kv_grid, variant):
    run_case(grid, kv_grid, variant=variant)


@pytest.mark.parametrize("grid,prefix", [((1,), 0), ((1, 1), 1), ((1, 1, 1), 0)])
def test_single_token_grids_fp64(grid, prefix):
    run_case(grid, prefix=prefix, variant="product")


@pytest.mark.parametrize("D,Dv", [(8, 16), (40, 24), (48, 48), (64, 40), (100, 72)])
def test_head_dims_fp64(D, Dv):
    # 100 / 72 need two 64-wide tiles: the D loop of the output pass and the Dv grid axis.
    grid = (3, 7) if D < 100 else (2, 5)
    run_case(grid, D=D, Dv=Dv, B=1, H=1)


def test_many_features_split_over_narrow_d_tiles_fp64():
    # F = 10 (product, 3-d, prefix): the state pass stacks 16 feature slots x a 16-wide D tile, so
    # D = 40 takes three D tiles (the last one ragged) and the padding slots 10..15 are never stored.
    run_case((2, 3, 2), D=40, Dv=24, B=1, H=1, prefix=1, variant="product")


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_layouts_and_prefix_tokens_fp64(layout, prefix):
    run_case((4, 5), (2, 3), layout=layout, prefix=prefix, H=3, B=2, variant="sum" if prefix != 1 else "product")


@pytest.mark.parametrize("variant", ["sum", "product"])
@pytest.mark.parametrize("feature_map", ["elu1", "identity"])
def test_feature_maps_fp64(variant, feature_map):
    run_case((3, 2, 3), variant=variant, feature_map=feature_map, prefix=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_identity_feature_map_tolerance_rule(dtype):
    # Non-negative features (|N(0, 1)|) at D = 40: the kernels use x as phi(x), with phi' = 1.
    run_case((5, 6), (3, 2), variant="sum", feature_map="identity", prefix=1, dtype=dtype, D=40, Dv=24,
             layout="bnhd")


@pytest.mark.parametrize("grid,kv_grid,variant,layout,prefix", [
    ((7, 6), None, "sum", "bhnd", 0),
    ((5, 4), (3, 2), "product", "bnhd", 1),
    ((41,), None, "none", "bhnd", 0),
])
def test_fp32(grid, kv_grid, variant, layout, prefix):
    run_case(grid, kv_grid, variant=variant, layout=layout, prefix=prefix, dtype=torch.float32, D=40, Dv=48)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("grid,kv_grid,variant,layout,prefix", [
    ((6, 7), None, "sum", "bhnd", 0),
    ((6, 4), (3, 2), "product", "bnhd", 1),
    ((2, 3, 4), None, "sum", "bnhd", 0),
])
def test_half_precision_tolerance_rule(dtype, grid, kv_grid, variant, layout, prefix):
    run_case(grid, kv_grid, variant=variant, layout=layout, prefix=prefix, dtype=dtype, D=48, Dv=40)


def test_strided_views_without_copies():
    """q, k, v as views into one fused [B, N, 3, H, D] qkv tensor (how attention layers produce them)."""
    B, H, D, grid = 2, 2, 16, (3, 5)
    N = math.prod(grid)
    dtype, rtol, _ = exact_case(DEVICE)
    qkv = torch.randn(B, N, 3, H, D, dtype=dtype, device=DEVICE)
    q, k, v = (qkv[:, :, i] for i in range(3))  # [B, N, H, D] views with a token stride of 3 H D
    assert not q.is_contiguous()
    out = vicinity_attention(q, k, v, grid, layout="bnhd", backend="triton")
    ref = vicinity_attention(q, k, v, grid, layout="bnhd", backend="reference")
    assert rel_err(out, ref) < (1e-12 if dtype == torch.float64 else rtol)
    assert out.is_contiguous()  # bnhd callers get contiguous memory back


def test_gradcheck_fp64():
    nq, nk = token_counts((3, 4), (2, 2), 1)
    q, k, v = make_inputs(1, 2, nq, nk, 6, 5, dtype=triton_dtype(torch.float64, DEVICE), device=DEVICE)

    def fn(q, k, v):
        return vicinity_attention(q, k, v, (3, 4), (2, 2), variant="sum", num_prefix_tokens=1, backend="triton")

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


@pytest.mark.parametrize("feature_map", ["elu1", "identity"])
def test_gradcheck_fp64_product(feature_map):
    q, k, v = make_inputs(1, 1, 12, 12, 5, 7, dtype=triton_dtype(torch.float64, DEVICE), device=DEVICE,
                          feature_map=feature_map)

    def fn(q, k, v):
        return vicinity_attention(q, k, v, (2, 2, 3), variant="product", feature_map=feature_map, backend="triton")

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


@pytest.mark.parametrize("frozen", ["q", "k", "v", "kv"])
def test_partial_requires_grad(frozen):
    """Gradients only for the inputs that need them; the backward skips the passes of the others
    (with k and v both frozen, the state-gradient and key passes are not launched at all)."""
    nq, nk = token_counts((3, 5), (2, 3), 1)
    dtype, rtol, atol = exact_case(DEVICE)
    q, k, v = make_inputs(2, 2, nq, nk, 8, 6, dtype=dtype, device=DEVICE)
    for name in frozen:
        {"q": q, "k": k, "v": v}[name].requires_grad_(False)
    wanted = [t for t in (q, k, v) if t.requires_grad]
    kw = dict(grid=(3, 5), kv_grid=(2, 3), num_prefix_tokens=1)
    out = vicinity_attention(q, k, v, backend="triton", **kw)
    ref = vicinity_attention(q, k, v, backend="reference", **kw)
    do = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, wanted, do), torch.autograd.grad(ref, wanted, do), strict=True):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


# --- properties of the kernels --------------------------------------------------------------------

def test_bitwise_deterministic():
    grid = (7, 9)  # 63 tokens: several blocks and several chunks per state pass
    q, k, v = make_inputs(2, 2, 63, 63, 24, 20, dtype=torch.float32, device=DEVICE)
    do = torch.randn(2, 2, 63, 20, device=DEVICE)
    first = outputs_and_grads(q, k, v, do, backend="triton", grid=grid)
    second = outputs_and_grads(q, k, v, do, backend="triton", grid=grid)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_every_output_element_written(monkeypatch):
    """Poison every allocation (outputs, states, partials) with NaN: none may survive."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poisoned(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poisoned(real_empty_like(*a, **kw)))
    assert torch.isnan(torch.empty(2)).all()  # the patch is live
    for layout in ("bhnd", "bnhd"):
        nq, nk = token_counts((5, 7), (3, 3), 1)
        q, k, v = make_inputs(2, 2, nq, nk, 40, 72, dtype=torch.float32, layout=layout, device=DEVICE)
        kw = dict(grid=(5, 7), kv_grid=(3, 3), num_prefix_tokens=1, layout=layout)
        do = torch.randn((2, nq, 2, 72) if layout == "bnhd" else (2, 2, nq, 72), device=DEVICE)
        results = outputs_and_grads(q, k, v, do, backend="triton", **kw)
        for name, t in zip(("out", "dq", "dk", "dv"), results):
            assert not torch.isnan(t).any(), f"{name} has unwritten (NaN) elements ({layout})"
        ref = vicinity_attention(q, k, v, backend="reference", **kw)
        assert rel_err(results[0], ref) < max(1e-5, exact_case(DEVICE)[1])


def test_fp16_large_magnitudes_do_not_overflow():
    """|S| would reach ~1e6 here (600 tokens of |k v| ~ 1e3): far beyond fp16's 65504 unless the
    states are kept in fp32 and scaled before any fp16 tensor-core operand is formed."""
    grid = (24, 25)
    n = math.prod(grid)
    g = torch.Generator().manual_seed(1)
    q, k, v = (30 * torch.randn(1, 1, n, 16, generator=g, dtype=torch.float64) for _ in range(3))
    q, k, v = (t.abs().to(DEVICE) for t in (q, k, v))  # positive: every product adds up, nothing cancels
    s_max = (k.transpose(-1, -2) @ v).abs().max().item()
    assert s_max > 1e5  # the unscaled state would not fit in fp16
    q16, k16, v16 = (t.half().requires_grad_(True) for t in (q, k, v))
    out = vicinity_attention(q16, k16, v16, grid, backend="triton")
    grads = torch.autograd.grad(out, (q16, k16, v16), torch.ones_like(out))
    assert all(torch.isfinite(t).all() for t in (out, *grads))
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q16, k16, v16))
    ref = vicinity_attention(q64, k64, v64, grid, backend="reference")
    ref_all = [ref, *torch.autograd.grad(ref, (q64, k64, v64), torch.ones_like(ref))]
    # The plain fp16 reference overflows here, so "plain" is the torch backend on the same fp16
    # inputs (fp32 states, no scaling tricks): its error is the fp16 rounding of inputs and outputs.
    p16 = [t.detach().requires_grad_(True) for t in (q16, k16, v16)]
    plain = vicinity_attention(*p16, grid, backend="torch")
    plain_all = [plain, *torch.autograd.grad(plain, p16, torch.ones_like(plain))]
    for name, got, r, p in zip(("out", "dq", "dk", "dv"), [out, *grads], ref_all, plain_all):
        assert_rule(name, got, r, p, torch.float16)


# --- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("D,Dv,name", [(257, 8, "D = 257"), (8, 300, "Dv = 300")])
def test_head_dim_above_256_is_rejected(D, Dv, name):
    q, k, v = make_inputs(1, 1, 4, 4, D, Dv, device=DEVICE, requires_grad=False)
    with pytest.raises(ValueError, match=name):
        vicinity_attention(q, k, v, (2, 2), backend="triton")


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(runtime, "_INTERPRET", False)
    assert not runtime.interpreting()
    q, k, v = make_inputs(1, 1, 4, 4, 8, 8, device="cpu", requires_grad=False)
    from vicinity_attn.common.spec import VicinitySpec
    spec = VicinitySpec(grid=(2, 2), kv_grid=(2, 2))
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        triton_backend.forward(q, k, v, spec)


# --- GPU-only defects: NaN, offsets, float64 routing, device guard --------------------------------

@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("feature_map", ["relu", "elu1"])
def test_nan_propagates_like_the_reference(where, feature_map):
    """A NaN in an input gives NaN exactly where the reference (plain torch) has NaN, forward and
    backward (a GPU's max instruction, like tl.maximum, would drop it and return finite numbers)."""
    dtype, rtol, atol = exact_case(DEVICE)
    q, k, v = make_inputs(1, 2, 12, 12, 8, 8, dtype=dtype, device=DEVICE, requires_grad=False)
    t = {"q": q, "k": k, "v": v}[where]
    t[0, 1, 5, 3] = float("nan")
    kw = dict(grid=(3, 4), feature_map=feature_map)
    do = torch.randn(1, 2, 12, 8, dtype=dtype, device=DEVICE)
    got = outputs_and_grads(*(x.clone().requires_grad_(True) for x in (q, k, v)), do, backend="triton", **kw)
    ref = outputs_and_grads(*(x.clone().requires_grad_(True) for x in (q, k, v)), do, backend="reference", **kw)
    assert torch.isnan(ref[0]).any()
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert torch.equal(torch.isnan(g), torch.isnan(r)), name
        finite = ~torch.isnan(r)
        torch.testing.assert_close(g[finite], r[finite], rtol=max(rtol, 1e-9), atol=atol)


def test_int32_offsets_checked_for_every_indexed_tensor():
    """Outputs and gradients are indexed like the inputs: a dO (or o, dq, ...) whose token span passes
    int32 is refused with its name, before any launch. Meta tensors: no memory is allocated."""
    from vicinity_attn.common.spec import VicinitySpec

    q, k, v = make_inputs(1, 1, 4, 4, 8, 8, dtype=exact_case(DEVICE)[0], device=DEVICE, requires_grad=False)
    huge = torch.empty_strided((1, 1, 4, 8), (0, 0, 2 ** 30, 1), dtype=q.dtype, device="meta")
    with pytest.raises(ValueError, match="dq"):
        triton_backend.check_token_offsets(huge, "dq")
    triton_backend.check_token_offsets(q, "q")  # a normal tensor passes
    spec = VicinitySpec(grid=(2, 2), kv_grid=(2, 2))
    o, den, S, z = triton_backend.forward(q, k, v, spec)
    with pytest.raises(ValueError, match="output gradient dO"):
        triton_backend.backward(huge, q, k, v, o, den, S, z, spec)


def test_float64_on_cuda_goes_to_the_torch_backend():
    from vicinity_attn import resolve_backend

    cuda = torch.device("cuda")
    assert resolve_backend("auto", cuda, torch.float64) == "torch"
    assert resolve_backend("auto", cuda, torch.float16) == "triton"
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "torch"


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a GPU")
def test_float64_on_cuda_explicit_triton_is_refused():
    q, k, v = make_inputs(1, 1, 4, 4, 8, 8, device="cuda", requires_grad=False)
    with pytest.raises(TypeError, match="float64"):
        vicinity_attention(q, k, v, (2, 2), backend="triton")


@pytest.mark.skipif(INTERPRET or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launches_on_the_tensors_gpu():
    """Tensors on cuda:1 while cuda:0 is current: the kernels must run on cuda:1."""
    q, k, v = make_inputs(1, 2, 20, 20, 16, 16, dtype=torch.float32, device="cuda:1")
    with torch.cuda.device(0):
        out = vicinity_attention(q, k, v, (4, 5), backend="triton")
        ref = vicinity_attention(q, k, v, (4, 5), backend="torch")
    assert out.device == q.device
    assert rel_err(out, ref) < exact_case("cuda")[1]


# --- token offsets: shards of one sequence (context parallelism) -----------------------------------

@pytest.mark.skipif(not INTERPRET, reason=INTERPRETER_ONLY)
@pytest.mark.parametrize("grid, kv_grid, prefix, variant, q_cuts, k_cuts", [
    ((5, 6), (3, 4), 2, "sum", (1, 19), (9,)),          # the first q shard holds half the prefix
    ((2, 3, 4), None, 0, "product", (7, 8), (13,)),
])
def test_token_offsets_shards_add_up_to_the_whole_sequence(grid, kv_grid, prefix, variant, q_cuts, k_cuts):
    """The launcher passes on shards of the token sequence (kernels told each shard's first position)
    give the whole sequence's states, outputs and gradients: states and state gradients summed over
    shards, outputs and input gradients row for row."""
    from vicinity_attn.kernels.vicinity import (
        Geometry,
        backward_keys,
        backward_queries,
        forward_output,
        forward_states,
        vicinity_backward,
        vicinity_forward,
    )

    nq, nk = token_counts(grid, kv_grid, prefix)
    q, k, v = make_inputs(1, 2, nq, nk, 16, 8, device=DEVICE, requires_grad=False)
    do = torch.randn(1, 2, nq, 8, dtype=q.dtype, device=DEVICE)
    geom = Geometry.build(grid, kv_grid or grid, variant, "relu", prefix)
    o = torch.empty_like(do)
    den, S, z = vicinity_forward(q, k, v, o, geom, 1e-4)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    vicinity_backward(do, q, k, v, o, den, S, z, dq, dk, dv, geom, 1e-4)

    def spans(cuts, n):
        bounds = (0, *cuts, n)
        return list(zip(bounds[:-1], bounds[1:]))

    parts = [forward_states(k[:, :, a:b], v[:, :, a:b], geom, n_keys=nk, key_offset=a) for a, b in spans(k_cuts, nk)]
    S_sum, z_sum = (sum(p[i] for p in parts) for i in (0, 1))
    assert rel_err(S_sum, S) < 1e-12 and rel_err(z_sum, z) < 1e-12
    dS_sum = dz_sum = 0
    for a, b in spans(q_cuts, nq):
        o_s = torch.empty_like(do[:, :, a:b])
        den_s = forward_output(q[:, :, a:b], S_sum, z_sum, o_s, geom, 1e-4, 0.0, None, n_keys=nk, query_offset=a)
        assert rel_err(o_s, o[:, :, a:b]) < 1e-12
        dq_s = torch.empty_like(q[:, :, a:b])
        dS_s, dz_s = backward_queries(do[:, :, a:b], q[:, :, a:b], o_s, den_s, S_sum, z_sum, dq_s, geom, 1e-4, 0.0,
                                      None, nq, nk, query_offset=a)
        assert rel_err(dq_s, dq[:, :, a:b]) < 1e-12
        dS_sum, dz_sum = dS_sum + dS_s, dz_sum + dz_s
    for a, b in spans(k_cuts, nk):
        dk_s, dv_s = torch.empty_like(k[:, :, a:b]), torch.empty_like(v[:, :, a:b])
        backward_keys(k[:, :, a:b], v[:, :, a:b], S_sum, dS_sum, dz_sum, dk_s, dv_s, geom, None, nq, nk, key_offset=a)
        assert rel_err(dk_s, dk[:, :, a:b]) < 1e-12 and rel_err(dv_s, dv[:, :, a:b]) < 1e-12
