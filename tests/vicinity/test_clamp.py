"""The VVT authors' magnitude clamp as an option of the op (``clamp=(min_mag, max_mag)``), on the
fast paths of the torch and triton backends, against the reference's feature form and their layer."""
from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import (
    VVT_CONFIGS,
    authors_forward,
    check_against_reference,
    make_inputs,
    token_counts,
    vvt_layer_and_weights,
)
from vicinity_attn import vicinity_attention
from vicinity_attn.common.feature_maps import apply_feature_map
from vicinity_attn.common.positions import expand_features, position_features

CLAMP = (0.03, 8.0)


def _c(t, clamp):
    return t.abs().clamp(*clamp) * t.sign()


def clamp_stages(q, k, v, grid, kv_grid, variant, fmap="relu", prefix=0, eps=1e-4, floor=0.0, clamp=CLAMP):
    """The four clamped quantities before their clamp, in float64 (the authors' chain): S, 1/den,
    the numerator (from the clamped S) and the output (from the clamped numerator and 1/den)."""
    kw = dict(num_prefix_tokens=prefix, dtype=torch.float64)
    xq = expand_features(apply_feature_map(q.double(), fmap), position_features(grid, variant, side="query", **kw))
    xk = expand_features(apply_feature_map(k.double(), fmap), position_features(kv_grid, variant, side="key", **kw))
    S = xk.transpose(-1, -2) @ v.double()
    sums = (xq * xk.sum(2, keepdim=True)).sum(-1)
    inv = 1 / (sums.clamp_min(floor) + eps)
    num = xq @ _c(S, clamp)
    out = _c(num, clamp) * _c(inv, clamp)[..., None]
    return dict(S=S, inv_den=inv, num=num, out=out, floored=(sums < floor).double())


def assert_clamps_bite(stages, clamp=CLAMP, which=("S", "inv_den", "num", "out")):
    """Honesty check: each named stage has values clamped and values passed through."""
    for name in which:
        a = stages[name].abs()
        outside = ((a < clamp[0]) | (a > clamp[1])).double().mean().item()
        assert 0 < outside < 0.9, f"{name}: {outside:.0%} of the values clamped: the test would not test the clamp"


ALL = ("S", "inv_den", "num", "out")
CASES = [  # (grid, kv_grid, variant, feature_map, prefix, eps, den_floor, stages the clamp bites)
    ((3, 4), (3, 4), "sum", "relu", 0, 1e-4, 0.0, ALL),                       # VVT's setting
    ((4, 3), (2, 3), "product", "relu", 0, 1e-4, 0.0, ("S", "num", "out")),   # cross grid, product
    ((2, 3), (2, 3), "sum", "elu1", 2, 1e-3, 0.0, ("S", "num", "out")),       # prefix tokens
    ((12,), (12,), "none", "relu", 0, 0.0, 12.0, ("S", "num", "out")),       # with the floor
]


# Every case on both backends in float64 and float32, except the slowest (interpreted) triton
# float32 runs of the larger-F cases, which add nothing the float64 ones and the first two do not test.
PARAMS = [(case, dtype, backend) for i, case in enumerate(CASES) for dtype in (torch.float64, torch.float32)
          for backend in ("torch", "triton") if not (backend == "triton" and dtype == torch.float32 and i >= 2)]


@pytest.mark.parametrize("case, dtype, backend", PARAMS)
def test_clamp_against_reference(backend, dtype, case):
    grid, kv_grid, variant, fmap, prefix, eps, floor, bites = case
    nq, nk = token_counts(grid, kv_grid, prefix)
    q, k, v = make_inputs(2, 2, nq, nk, 8, 6, dtype=dtype)
    stages = clamp_stages(q, k, v, grid, kv_grid, variant, fmap, prefix, eps, floor)
    assert_clamps_bite(stages, which=bites)
    if floor:
        assert 0 < stages["floored"].mean() < 1, "the floor must be active on some rows and not on others"
    check_against_reference(q, k, v, grid=grid, kv_grid=kv_grid, variant=variant, feature_map=fmap,
                            num_prefix_tokens=prefix, eps=eps, den_floor=floor, clamp=CLAMP, backend=backend)


def test_reference_clamp_is_the_authors_chain():
    """The reference's clamped feature form against the chain restated in this test (fp64)."""
    q, k, v = make_inputs(2, 2, 12, 12, 8, 6)
    stages = clamp_stages(q, k, v, (3, 4), (3, 4), "sum")
    out = vicinity_attention(q, k, v, (3, 4), clamp=CLAMP, backend="reference")
    torch.testing.assert_close(out, _c(stages["out"], CLAMP), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("grid, variant", [((3, 3), "sum"), ((2, 2, 2), "product"), ((5,), "none")])
def test_clamped_states_that_cancel_exactly_give_exact_zeros(backend, grid, variant):
    """A prefix query weighs the prefix keys' state and the grid keys' state alike (features 1, 1). Tiny
    keys, values +a on the prefix key and -a on the grid keys: both states clamp to exactly +-min_mag,
    their sum is exactly 0, so the prefix row's numerator and output are exactly 0 (the clamp keeps 0 at
    0). A rounding residual instead of that 0 would come out as +-min_mag times 1/den."""
    torch.manual_seed(0)
    n_grid, D, Dv = math.prod(grid), 16, 4
    q = torch.rand(2, 2, 1 + n_grid, D, dtype=torch.float64) + 0.1
    k = torch.full((2, 2, 1 + n_grid, D), 1e-3, dtype=torch.float64)
    v = torch.full((2, 2, 1 + n_grid, Dv), -1e-3 / n_grid, dtype=torch.float64)
    v[:, :, 0] = 1e-3
    out = vicinity_attention(q, k, v, grid, variant=variant, num_prefix_tokens=1, clamp=(1e-4, 1e4),
                             backend=backend)
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0])), out[:, :, 0]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_clamp_gradcheck(backend):
    grid = (2, 3)
    q, k, v = make_inputs(1, 2, 6, 6, 4, 3)
    clamp = (0.05, 3.0)
    assert_clamps_bite(clamp_stages(q, k, v, grid, grid, "sum", clamp=clamp), clamp, which=("S", "num", "out"))
    fn = lambda a, b, c: vicinity_attention(a, b, c, grid, clamp=clamp, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_wide_clamp_changes_nothing(backend):
    """Bounds no value reaches: the clamped path gives the unclamped answer (to rounding: it
    multiplies by 1/den instead of dividing)."""
    q, k, v = make_inputs(1, 2, 12, 12, 8, 4)
    a = vicinity_attention(q, k, v, (3, 4), backend=backend)
    b = vicinity_attention(q, k, v, (3, 4), clamp=(1e-20, 1e20), backend=backend)
    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("cfg, backend", [(VVT_CONFIGS[0], "triton"), (VVT_CONFIGS[3], "reference")])
def test_vvt_layer_clip_on_every_backend(cfg, backend):
    """Their layer with clip=True (the setting their checkpoints were trained with) through the op's
    clamp (the torch backend is covered in test_vvt.py), on activations large enough that the clamps
    bite, against their forward restated."""
    layer, sd, x = vvt_layer_and_weights(cfg, seed=7, clip=True, backend=backend)
    _, heads, sr, fr, _, use_sum, H, W = cfg
    x = x * 300.0
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    ours = layer(x1, H, W)
    theirs = authors_forward(sd, x2, H, W, num_heads=heads, sr_ratio=sr, fr=fr, use_sum=use_sum, clip=True)
    unclipped = authors_forward(sd, x, H, W, num_heads=heads, sr_ratio=sr, fr=fr, use_sum=use_sum, clip=False)
    assert not torch.allclose(theirs, unclipped), "the clamps do not bite: the test would not test them"
    torch.testing.assert_close(ours, theirs, rtol=1e-11, atol=1e-12)
    dout = torch.randn_like(ours)
    (g1,) = torch.autograd.grad(ours, x1, dout)
    (g2,) = torch.autograd.grad(theirs, x2, dout)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_fullgraph_with_clamp(backend):
    torch._dynamo.reset()
    q, k, v = make_inputs(1, 2, 12, 12, 8, 4)
    fn = lambda a, b, c: vicinity_attention(a, b, c, (3, 4), clamp=CLAMP, backend=backend)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out, want = compiled(q, k, v), fn(q, k, v)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-13)
    do = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(want, (q, k, v), do)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("clamp, match", [
    ((1.0,), "clamp must be None or a pair"),
    ("1e-4,1e4", "clamp must be None or a pair"),
    ((1e-4, None), "clamp must be None or a pair"),
    ((2.0, 1.0), "clamp must satisfy 0 <= min_mag <= max_mag"),
    ((-1.0, 1.0), "clamp must satisfy 0 <= min_mag <= max_mag"),
    ((float("nan"), 1.0), "clamp must satisfy"),
    ((float("inf"), float("inf")), "clamp must satisfy"),
    ((1e-45, 1.0), "clamp min_mag = 1e-45 is too small"),
    ((1.0, 1e39), "clamp max_mag = 1e\\+39 overflows"),
])
def test_bad_clamp_names_the_argument(clamp, match):
    q, k, v = make_inputs(1, 1, 12, 12, 4, 4, dtype=torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match=match):
        vicinity_attention(q, k, v, (3, 4), clamp=clamp, backend="torch")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_with_floor_and_clamp(backend):
    """The custom ops' schema, fakes and autograd registration with the new spec values
    (den_floor: float, clamp: float[])."""
    from vicinity_attn.vicinity import ops
    q, k, v = make_inputs(1, 2, 6, 6, 4, 3)
    args = [[2, 3], [2, 3], "sum", "relu", 0.0, 0, 2.5, [0.05, 3.0], ""]
    fwd = ops.FORWARD_OPS[backend]
    bwd = {"torch": ops.torch_backward, "triton": ops.triton_backward}[backend]
    torch.library.opcheck(fwd, (q, k, v, *args))
    with torch.no_grad():
        o, den, S, z = fwd(q, k, v, *args)
    torch.library.opcheck(bwd, (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o, den, S, z, *args,
                                True, True, True))
