"""Frame-causal vicinity attention (``causal="frames"``) on the fused kernels, under the Triton interpreter.

The full call (the custom op ``vicinity_attn::triton_forward`` and its autograd, i.e. ``triton_frames.forward`` /
``backward``) against the float64 reference by the tolerance rule (tests.helpers.assert_rule: the error against
float64 at most 2x the plain PyTorch computation's in the same dtype, plus a floor), and the window API of
``vicinity_attn.vicinity.triton_frames``: windows run one after another (carry -> next init) give the full
call frame by frame, and their backward with carry_grad gives the reference's gradients over the concatenated
windows. Fresh random inputs; small shapes (the interpreter costs about a millisecond per program per step).
"""
import math

import pytest
import torch

from tests.helpers import assert_rule, interpreting

if not interpreting():
    pytest.skip("CPU tensors with backend='triton' need the Triton interpreter (TRITON_INTERPRET=1)",
                allow_module_level=True)
pytest.importorskip("triton")

from vicinity_attn.common.spec import VicinitySpec  # noqa: E402
from vicinity_attn.vicinity import ops, triton_backend, triton_frames  # noqa: E402
from vicinity_attn.vicinity.reference import reference_vicinity_attention  # noqa: E402

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
BITES = (0.05, 2.0)     # a clamp that bites: states, numerators and 1/den leave [lo, hi]


def make_spec(grid, kv_grid=None, prefix=0, variant="sum", feature_map="relu", clamp=None, den_floor=0.0):
    return VicinitySpec(grid=grid, kv_grid=kv_grid or grid, variant=variant, feature_map=feature_map, eps=1e-4,
                        num_prefix_tokens=prefix, den_floor=den_floor, clamp=clamp, causal="frames")


def make_qkv(spec, D, Dv, dtype, B=1, H=2, heads_inner=False):
    """Fresh q, k, v [B, H, N, E] float64 leaves and their casts to ``dtype`` (heads_inner: [B, N, H, E] memory
    order, i.e. non-contiguous [B, H, N, E] views)."""
    nq = spec.num_prefix_tokens + math.prod(spec.grid)
    nk = spec.num_prefix_tokens + math.prod(spec.kv_grid)

    def one(n, e, nonneg):
        x = torch.randn(B, n, H, e, dtype=F64).transpose(1, 2) if heads_inner else torch.randn(B, H, n, e, dtype=F64)
        return x.abs() if nonneg else x
    nonneg = spec.feature_map == "identity"
    return one(nq, D, nonneg), one(nk, D, nonneg), one(nk, Dv, False)


def triton_outputs_and_grads(q, k, v, do, spec):
    """o, dq, dk, dv through the custom op and its autograd formula (the backend's forward / backward)."""
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    o = ops.triton_forward(q, k, v, *ops.spec_args(spec))[0]
    return [o, *torch.autograd.grad(o, (q, k, v), do.to(o.dtype))]


def reference_outputs_and_grads(q, k, v, do, spec):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    o = reference_vicinity_attention(q, k, v, spec)
    return [o, *torch.autograd.grad(o, (q, k, v), do.to(o.dtype))]


# (grid, kv_grid, prefix, variant, feature_map, clamp, den_floor, dtype, D, Dv, heads_inner)
CASES = [
    ((4, 5, 6), None, 0, "sum", "relu", None, 0.0, F64, 8, 8, False),
    ((4, 5, 6), None, 2, "product", "elu1", None, 0.0, F32, 8, 8, False),
    ((3, 8, 8), (3, 4, 4), 2, "sum", "relu", None, 0.0, BF16, 16, 32, False),
    ((3, 8, 8), (3, 4, 4), 0, "none", "identity", None, 0.0, F16, 16, 16, False),
    ((3, 4, 4), None, 2, "sum", "relu", (1e-4, 1e4), 0.0, F32, 8, 8, False),
    ((3, 4, 4), (3, 2, 2), 2, "product", "relu", BITES, 0.0, F64, 5, 3, False),
    ((3, 4, 4), None, 0, "sum", "elu1", BITES, 0.0, BF16, 16, 16, False),
    ((4, 6), None, 2, "sum", "relu", None, 20.0, F64, 6, 7, False),
    ((4, 6), (4, 3), 1, "product", "elu1", None, 5.0, F32, 4, 4, True),
    ((2, 2, 3), None, 0, "sum", "relu", None, 0.0, F32, 40, 36, False),    # several head tiles
    ((3, 2, 2), None, 0, "none", "relu", None, 0.0, F64, 1, 1, False),       # head dims of 1
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-P{c[2]}-{c[3]}-{c[4]}-{c[5]}-f{c[6]}-"
                                                     f"{str(c[7])[6:]}-D{c[8]}x{c[9]}")
def test_full_call_matches_reference(case):
    grid, kv_grid, prefix, variant, fmap, clamp, den_floor, dtype, D, Dv, heads_inner = case
    spec = make_spec(grid, kv_grid, prefix, variant, fmap, clamp, den_floor)
    # Two heads where the memory order mixes them; else one (the interpreter's time: programs x steps).
    q, k, v = make_qkv(spec, D, Dv, dtype, H=2 if heads_inner else 1, heads_inner=heads_inner)
    do = torch.randn(q.shape[:3] + (Dv,), dtype=F64)
    ref = reference_outputs_and_grads(q, k, v, do, spec)
    low = [t.to(dtype) for t in (q, k, v)]
    got = triton_outputs_and_grads(*low, do, spec)
    plain = ref if dtype == F64 else reference_outputs_and_grads(*low, do, spec)
    for name, g, r, p in zip(("out", "dq", "dk", "dv"), got, ref, plain):
        assert g.dtype == dtype and g.shape == r.shape, name
        assert_rule(name, g, r, p, dtype)


def test_saved_states_and_determinism():
    """S per slot in saved_state_dtype, z per slot, and bitwise the same results run to run."""
    spec = make_spec((3, 2, 3), (3, 1, 3), 2, "sum", "relu", BITES)
    q, k, v = make_qkv(spec, 8, 8, F32, H=1)
    q, k, v = (t.float() for t in (q, k, v))
    o, den, S, z = triton_frames.forward(q, k, v, spec)
    F = 8   # 3-d "sum" (6) + the two prefix features
    assert S.shape == (1, 4, F, 8, 8) and z.shape == (1, 4, F, 8) and den.shape == (1, q.shape[2])
    assert S.dtype == triton_backend.saved_state_dtype(q, v, spec.clamp)
    do = torch.randn_like(o)
    grads = triton_frames.backward(do, q, k, v, o, den, S, z, spec)
    o2, den2, S2, z2 = triton_frames.forward(q, k, v, spec)
    grads2 = triton_frames.backward(do, q, k, v, o2, den2, S2, z2, spec)
    for a, b in zip((o, den, S, z, *grads), (o2, den2, S2, z2, *grads2)):
        assert torch.equal(a, b)
    # Gradients not asked for are skipped.
    dq, dk, dv = triton_frames.backward(do, q, k, v, o, den, S, z, spec, (False, True, False))
    assert dq is None and dv is None and torch.equal(dk, grads[1])


def _window_tokens(spec, x, frames, side):
    """The tokens of ``frames`` (a range) of x [B, H, N, E]: the prefix tokens only when frames start at 0."""
    P = spec.num_prefix_tokens
    L = math.prod((spec.grid if side == "q" else spec.kv_grid)[1:])
    lo = 0 if frames.start == 0 else P + frames.start * L
    return x[:, :, lo:P + frames.stop * L]


@pytest.mark.parametrize("clamp,prefix,kv_grid", [(None, 2, None), (BITES, 2, (4, 2, 2)), ((1e-4, 1e4), 0, None)])
def test_windows_equal_the_full_call(clamp, prefix, kv_grid):
    """Windows [0, 1), [1, 3), [3, 4) in turn (carry -> init): their outputs are the full call's frame by frame,
    the carry of the last is the full call's, and their backward (init_grad of a window -> carry_grad of the one
    before) gives the reference's gradients over the concatenated windows."""
    spec = make_spec((4, 3, 4), kv_grid, prefix, "sum", "relu", clamp)
    q, k, v = make_qkv(spec, 6, 5, F64, H=1)
    do = torch.randn(q.shape[:3] + (5,), dtype=F64)
    ref = reference_outputs_and_grads(q, k, v, do, spec)
    windows = [range(0, 1), range(1, 3), range(3, 4)]
    init, saved = None, []
    for w in windows:
        qw, kw, vw = (_window_tokens(spec, t, w, s) for t, s in ((q, "q"), (k, "k"), (v, "k")))
        o, den, S, z, carry = triton_frames.window_forward(qw, kw, vw, spec, w.start, init)
        assert carry[0].shape == (1, 1, 8 if prefix else 6, 6, 5) and carry[0].dtype == F64
        saved.append((qw, kw, vw, o, den, S, z))
        init = carry
    o_all = torch.cat([s[3] for s in saved], dim=2)
    torch.testing.assert_close(o_all, ref[0], rtol=1e-10, atol=1e-12)
    # The whole call's carry: the last window's equals that of one window over every frame.
    full_carry = triton_frames.window_forward(q, k, v, spec)[4]
    for a, b in zip(init, full_carry):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # Backward, last window first: carry_grad of window i = init_grad of window i + 1 (+ its own carry_grad).
    carry_grad, grads = None, []
    for w, (qw, kw, vw, o, den, S, z) in zip(reversed(windows), reversed(saved)):
        dow = _window_tokens(spec, do, w, "q")
        dq, dpre, init_grad = triton_frames.window_query_backward(dow, qw, o, den, S, z, spec, w.start, True)
        dk, dv = triton_frames.window_key_backward(kw, vw, dpre, spec, w.start, carry_grad, True, True)
        grads.append((dq, dk, dv))
        carry_grad = init_grad if carry_grad is None else tuple(a + b for a, b in zip(init_grad, carry_grad))
    for i, name in enumerate(("dq", "dk", "dv")):
        got = torch.cat([g[i] for g in reversed(grads)], dim=2)
        torch.testing.assert_close(got, ref[1 + i], rtol=1e-10, atol=1e-12, msg=name)


def test_window_init_grad_is_the_gradient_of_init():
    """init_grad = dLoss/dinit of a window's queries: the difference quotient of the loss along a random init
    direction (the loss is linear in init's z and S away from the clamp and floor, so exact up to rounding)."""
    spec = make_spec((3, 2, 3), None, 0, "sum", "elu1")
    q, k, v = make_qkv(spec, 4, 3, F64, H=1)
    w = range(1, 3)
    qw, kw, vw = (_window_tokens(spec, t, w, s) for t, s in ((q, "q"), (k, "k"), (v, "k")))
    init = triton_frames.window_forward(*(_window_tokens(spec, t, range(0, 1), s)
                                          for t, s in ((q, "q"), (k, "k"), (v, "k"))), spec)[4]
    o, den, S, z, _ = triton_frames.window_forward(qw, kw, vw, spec, 1, init)
    do = torch.randn_like(o)
    _, _, init_grad = triton_frames.window_query_backward(do, qw, o, den, S, z, spec, 1, False)
    dirs = tuple(torch.randn_like(t) for t in init)
    h = 1e-6
    plus = triton_frames.window_forward(qw, kw, vw, spec, 1, tuple(a + h * d for a, d in zip(init, dirs)))[0]
    minus = triton_frames.window_forward(qw, kw, vw, spec, 1, tuple(a - h * d for a, d in zip(init, dirs)))[0]
    quotient = ((plus - minus) * do).sum() / (2 * h)
    predicted = sum((g * d).sum() for g, d in zip(init_grad, dirs))
    assert abs(quotient - predicted) <= 1e-6 * abs(predicted), (quotient.item(), predicted.item())
