"""The normaliser floor: den_i = max(sum_j phi(q_i).phi(k_j) w(i,j), den_floor) + eps (L2ViT)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_rule, check_against_reference, count_launches, make_inputs, token_counts
from vicinity_attn import vicinity_attention
from vicinity_attn.common.feature_maps import apply_feature_map
from vicinity_attn.common.spec import VicinitySpec
from vicinity_attn.vicinity.reference import vicinity_weights


def row_sums(q, k, grid, kv_grid, variant, feature_map="relu", prefix=0) -> torch.Tensor:
    """sum_j phi(q_i).phi(k_j) w(i,j) in float64, [B, H, Nq] ([B, H, N, D] inputs)."""
    spec = VicinitySpec(grid=tuple(grid), kv_grid=tuple(kv_grid), variant=variant, feature_map=feature_map,
                        num_prefix_tokens=prefix)
    scores = apply_feature_map(q.double(), feature_map) @ apply_feature_map(k.double(), feature_map).transpose(-1, -2)
    return (scores * vicinity_weights(spec)).sum(-1)


def median_floor(sums: torch.Tensor) -> float:
    """A floor between the row sums (about half the rows below it), in the widest gap between
    neighbouring sums near the middle, so no row sits at the kink; exactly representable in float32
    (the triton kernels take it as a float32 scalar, also for float64 inputs)."""
    s = sums.flatten().sort().values
    n = s.numel()
    lo, hi = n // 4, (3 * n) // 4
    i = lo + int((s[lo + 1:hi + 1] - s[lo:hi]).argmax())
    floor = float(torch.tensor(((s[i] + s[i + 1]) / 2).item(), dtype=torch.float32))
    assert (s[i + 1] - s[i]) > 1e-3 * s[i + 1], "row sums too close together for a floor between them"
    active = (sums < floor).double().mean().item()
    assert 0.2 < active < 0.8, f"floor active on {active:.0%} of the rows: the test would not test both cases"
    return floor


CASES = [  # (grid, kv_grid, variant, feature_map, prefix, eps)
    ((3, 4), (2, 3), "sum", "relu", 0, 1e-4),
    ((12,), (12,), "none", "relu", 0, 0.0),          # L2ViT: plain linear attention, no eps
    ((2, 2, 3), (1, 2, 2), "product", "elu1", 0, 1e-3),
    ((2, 3), (2, 3), "sum", "relu", 2, 0.0),
]


# Every case on both backends in float64 and float32, except the slowest (interpreted) triton
# float32 runs of the larger-F cases, which add nothing the float64 ones and the first two do not test.
PARAMS = [(case, dtype, backend) for i, case in enumerate(CASES) for dtype in (torch.float64, torch.float32)
          for backend in ("torch", "triton") if not (backend == "triton" and dtype == torch.float32 and i >= 2)]


@pytest.mark.parametrize("case, dtype, backend", PARAMS)
def test_floor_against_reference(backend, dtype, case):
    grid, kv_grid, variant, fmap, prefix, eps = case
    nq, nk = token_counts(grid, kv_grid, prefix)
    q, k, v = make_inputs(2, 2, nq, nk, 8, 5, dtype=dtype)
    floor = median_floor(row_sums(q, k, grid, kv_grid, variant, fmap, prefix))
    check_against_reference(q, k, v, grid=grid, kv_grid=kv_grid, variant=variant, feature_map=fmap,
                            num_prefix_tokens=prefix, eps=eps, den_floor=floor, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_floor_bf16_torch_and_triton(backend):
    grid = (3, 4)
    q, k, v = make_inputs(1, 2, 12, 12, 16, 8, dtype=torch.bfloat16)
    floor = median_floor(row_sums(q, k, grid, grid, "sum"))
    check_against_reference(q, k, v, grid=grid, den_floor=floor, eps=0.0, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_floored_rows_pass_no_gradient_through_the_normaliser(backend):
    """Where the floor is active, o_i = num_i / (den_floor + eps): linear in v and in phi(q_i) through
    num only. So scaling k's contribution to den alone would change nothing; concretely, with every
    row floored the op is exactly num / const, and its gradients equal those of that formula."""
    grid = (3, 4)
    q, k, v = make_inputs(1, 2, 12, 12, 6, 4)
    sums = row_sums(q, k, grid, grid, "sum")
    floor = 2.0 ** torch.ceil(torch.log2(sums.max() * 2)).item()    # above every row sum
    out = vicinity_attention(q, k, v, grid, den_floor=floor, eps=0.5, backend=backend)
    spec = VicinitySpec(grid=grid, kv_grid=grid)
    phi_q, phi_k = torch.relu(q), torch.relu(k)
    plain = ((phi_q @ phi_k.transpose(-1, -2)) * vicinity_weights(spec)) @ v / (floor + 0.5)
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), do)
    want = torch.autograd.grad(plain, (q, k, v), do)
    torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-13)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("wanted", ["qkv", "kv"])
def test_triton_row_weights_come_from_the_dq_pass(monkeypatch, wanted):
    """The dq pass computes the row weights (1/den and -(dO.o)/den, 0 on floored rows) itself: a backward
    that wants dq launches no separate row-weights kernel; one that does not (q frozen) launches it once.
    Every wanted gradient matches the reference, with the floor active on about half the rows."""
    from vicinity_attn.kernels.vicinity import launch_backward as backward
    grid, kv_grid = (3, 4), (2, 3)
    q, k, v = make_inputs(1, 1, 12, 6, 8, 5)
    floor = median_floor(row_sums(q, k, grid, kv_grid, "sum"))
    inputs = [t for name, t in zip("qkv", (q, k, v)) if name in wanted]
    for name, t in zip("qkv", (q, k, v)):
        t.requires_grad_(name in wanted)
    kw = dict(grid=grid, kv_grid=kv_grid, den_floor=floor, eps=1e-3)
    ref = vicinity_attention(q, k, v, backend="reference", **kw)
    do = torch.randn_like(ref)
    want = torch.autograd.grad(ref, inputs, do)
    launches = count_launches(monkeypatch, [(backward, "row_weights_kernel")])
    got = torch.autograd.grad(vicinity_attention(q, k, v, backend="triton", **kw), inputs, do)
    assert launches["row_weights_kernel"] == (0 if "q" in wanted else 1)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_floor_gradcheck(backend):
    grid, kv_grid = (2, 3), (2, 2)
    nq, nk = token_counts(grid, kv_grid)
    q, k, v = make_inputs(1, 2, nq, nk, 3, 2)
    floor = median_floor(row_sums(q, k, grid, kv_grid, "sum"))
    fn = lambda a, b, c: vicinity_attention(a, b, c, grid, kv_grid, den_floor=floor, eps=1e-3,  # noqa: E731
                                            backend=backend)
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_zero_floor_is_the_vvt_normaliser_bitwise():
    q, k, v = make_inputs(2, 2, 12, 12, 8, 8, dtype=torch.float32)
    for backend in ("torch", "triton"):
        a = vicinity_attention(q, k, v, (3, 4), backend=backend)
        b = vicinity_attention(q, k, v, (3, 4), den_floor=0.0, backend=backend)
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("eps, floor", [(0.0, 100.0), (1e-28, 0.0)])
def test_all_zero_feature_rows_give_zero_not_nan(backend, eps, floor):
    """Rows with phi(q_i) = 0 have num = 0 and den = max(0, floor) + eps > 0: the answer is 0."""
    q, k, v = make_inputs(1, 2, 12, 12, 8, 4, dtype=torch.float32)
    with torch.no_grad():
        q[:, :, :3] = -q[:, :, :3].abs() - 0.1    # relu(q) = 0 on three rows
    out = vicinity_attention(q, k, v, (3, 4), eps=eps, den_floor=floor, backend=backend)
    assert torch.isfinite(out).all()
    assert (out[:, :, :3] == 0).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=-1e-4), "eps must be a positive"),
    (dict(eps=0.0), "eps must be a positive"),
    (dict(eps=0.0, den_floor=0.0), "eps must be a positive"),
    (dict(eps=float("nan"), den_floor=1.0), "eps must be a positive"),
    (dict(den_floor=-1.0), "den_floor must be a finite number >= 0"),
    (dict(den_floor=float("inf")), "den_floor must be a finite number >= 0"),
    (dict(den_floor=float("nan")), "den_floor must be a finite number >= 0"),
    (dict(den_floor="100"), "den_floor must be a finite number >= 0"),
    (dict(den_floor=True), "den_floor must be a finite number >= 0"),
    # Below float32's normal range after the kernels' state scaling (issue 14: these came out NaN).
    (dict(eps=1e-46), "eps = 1e-46 is too small for torch.float32"),
    (dict(eps=1e-50), "eps = 1e-50 is too small"),
    (dict(eps=1e-300), "eps = 1e-300 is too small"),
    (dict(eps=1e-37), "eps = 1e-37 is too small"),                     # normal, but not once scaled
    (dict(eps=1e-30), "eps = 1e-30 is too small"),
    (dict(eps=0.0, den_floor=1e-40), "den_floor = 1e-40 is too small"),
    (dict(den_floor=1e39), "den_floor = 1e\\+39 overflows torch.float32"),
    (dict(eps=1e39), "eps = 1e\\+39 overflows"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bad_normaliser_names_the_argument(kwargs, match, dtype):
    q, k, v = make_inputs(1, 1, 12, 12, 4, 4, dtype=dtype, requires_grad=False)
    with pytest.raises(ValueError, match=match):
        vicinity_attention(q, k, v, (3, 4), backend="torch", **kwargs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float64_inputs_use_the_float32_range(backend):
    """The triton kernels take eps as a float32 scalar for every input dtype, so one range serves all."""
    q, k, v = make_inputs(1, 1, 12, 12, 4, 4, requires_grad=False)
    with torch.no_grad():
        q[:, :, :2] = -q[:, :, :2].abs() - 0.1    # rows with phi(q) = 0
    out = vicinity_attention(q, k, v, (3, 4), eps=3e-29, backend=backend)
    assert torch.isfinite(out).all() and (out[:, :, :2] == 0).all()
    with pytest.raises(ValueError, match="eps = 1e-300 is too small for torch.float32"):
        vicinity_attention(q, k, v, (3, 4), eps=1e-300, backend=backend)
    from vicinity_attn.common.validation import MIN_STATE_SCALE
    from vicinity_attn.kernels.vicinity.configs import pow2_scale
    assert pow2_scale(2 ** 31 - 1) == MIN_STATE_SCALE


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_fullgraph_with_floor(backend):
    torch._dynamo.reset()
    q, k, v = make_inputs(1, 2, 12, 12, 8, 4)
    floor = median_floor(row_sums(q, k, (3, 4), (3, 4), "none"))
    fn = lambda a, b, c: vicinity_attention(a, b, c, (3, 4), variant="none", eps=0.0,  # noqa: E731
                                            den_floor=floor, backend=backend)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out, want = compiled(q, k, v), fn(q, k, v)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-13)
    do = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(want, (q, k, v), do)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_with_floor(backend):
    """CPU bf16 autocast: bf16 output; error against the float64 reference on the bf16-rounded inputs
    within the tolerance rule."""
    grid = (3, 4)
    q, k, v = make_inputs(2, 2, 12, 12, 16, 8, dtype=torch.float32)
    floor = median_floor(row_sums(q, k, grid, grid, "sum"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vicinity_attention(q, k, v, grid, den_floor=floor, backend=backend)
    assert out.dtype == torch.bfloat16
    r64 = [t.detach().to(torch.bfloat16).double() for t in (q, k, v)]
    ref = vicinity_attention(*r64, grid, den_floor=floor, backend="reference")
    plain = vicinity_attention(*(t.to(torch.bfloat16) for t in r64), grid, den_floor=floor, backend="reference")
    assert_rule("out", out, ref, plain, torch.bfloat16)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("which", "qkv")
def test_floor_keeps_a_nan_row_sum_nan(backend, which):
    """L2ViT's floor (den_floor = 100, eps = 0) is a select, never a max that drops NaN: a NaN in q, k or v
    gives NaN exactly where the float64 reference does, and the other entries are the reference's."""
    q, k, v = make_inputs(1, 2, 12, 12, 4, 4, requires_grad=False)
    target = {"q": q, "k": k, "v": v}[which]
    target[0, 1, int(torch.randint(12, (1,)))] = float("nan")      # a whole token: relu keeps the NaN
    kw = dict(variant="none", den_floor=100.0, eps=0.0)
    ref = vicinity_attention(q, k, v, (3, 4), backend="reference", **kw)
    got = vicinity_attention(q, k, v, (3, 4), backend=backend, **kw)
    assert ref.isnan().any() and torch.equal(got.isnan(), ref.isnan())
    torch.testing.assert_close(got[~ref.isnan()], ref[~ref.isnan()], rtol=1e-10, atol=1e-12)
