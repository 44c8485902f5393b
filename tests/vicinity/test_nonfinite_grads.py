"""Gradients with NaN / inf inputs follow autograd of the formula (the reference): where phi'(x) = 0
(relu, x <= 0) the gradient is exactly 0 even when the upstream gradient is NaN or inf, and
elsewhere the NaN / inf pattern and the finite values are the reference's.

The forward of the linear form differs from the quadratic reference with inf inputs by design
(it multiplies an inf feature by position features that can be exactly 0, where the reference's
weights w(i, j) never are), so these tests compare gradients. Triton runs only the cases whose
forward already propagates the bad value (the NaN forward of the kernels is fixed separately).
"""
import pytest
import torch

from vicinity_attn import vicinity_attention

GRID = (3, 4)
NAN, INF = float("nan"), float("inf")


def _inputs(which: str, value: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 12, 4, dtype=torch.float64, generator=g) for _ in range(3))
    target = {"q": q, "k": k, "v": v}[which]
    head, token, dim = (int(torch.randint(n, (1,), generator=g)) for n in (2, 12, 4))
    target[0, head, token, dim] = value
    do = torch.randn(1, 2, 12, 4, dtype=torch.float64, generator=g)
    return q, k, v, do


def _grads(backend, q, k, v, do, **kw):
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    o = vicinity_attention(q, k, v, GRID, backend=backend, **kw)
    return torch.autograd.grad(o, (q, k, v), do)


def _assert_same(name, got, ref):
    assert torch.equal(got.isnan(), ref.isnan()), \
        f"{name}: NaN at {int(got.isnan().sum())} entries, reference {int(ref.isnan().sum())}"
    assert torch.equal(got.isinf(), ref.isinf()) and torch.equal(got[got.isinf()], ref[ref.isinf()]), f"{name}: inf"
    finite = got.isfinite()
    torch.testing.assert_close(got[finite], ref[finite], rtol=1e-9, atol=1e-12, msg=name)


# (-inf in q or k is just relu(-inf) = 0: nothing non-finite anywhere.)
RELU_CASES = [("q", NAN), ("q", INF), ("k", NAN), ("k", INF), ("v", NAN), ("v", INF), ("v", -INF)]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("which,value", RELU_CASES, ids=[f"{w}={v}" for w, v in RELU_CASES])
def test_torch_backend_relu_grads_match_reference(which, value, seed):
    q, k, v, do = _inputs(which, value, seed)
    ref = _grads("reference", q, k, v, do)
    got = _grads("torch", q, k, v, do)
    assert any(not r.isfinite().all() for r in ref), "the case must put a NaN / inf into some gradient"
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        _assert_same(name, g, r)


# Not here: inf in k (the linear form's z = sum_j P_k(j) phi(k_j) meets 0 * inf through a position
# feature that is exactly 0, so dv is NaN where the reference has 0) and inf in v (likewise in S).
ELU_CASES = [("q", NAN), ("q", INF), ("q", -INF), ("k", NAN), ("k", -INF), ("v", NAN)]


@pytest.mark.parametrize("which,value", ELU_CASES, ids=[f"{w}={v}" for w, v in ELU_CASES])
def test_torch_backend_elu1_grads_match_reference(which, value):
    q, k, v, do = _inputs(which, value, 0)
    ref = _grads("reference", q, k, v, do, feature_map="elu1")
    got = _grads("torch", q, k, v, do, feature_map="elu1")
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        _assert_same(name, g, r)


@pytest.mark.parametrize("which", "qk")
def test_nan_row_leaves_zero_where_relu_is_flat(which):
    """The issue's case: a NaN in q[i] (or k[j]) must not make the entries with x <= 0 NaN."""
    q, k, v, do = _inputs(which, NAN, 3)
    x = {"q": q, "k": k}[which]
    for backend in ("reference", "torch"):
        grad = _grads(backend, q, k, v, do)["qk".index(which)]
        flat = x <= 0
        assert flat.any() and torch.equal(grad[flat], torch.zeros_like(grad[flat])), backend
        assert grad[~flat].isnan().any(), backend


TRITON_CASES = [("q", INF), ("k", INF), ("v", NAN), ("v", -INF)]


@pytest.mark.parametrize("which,value", TRITON_CASES, ids=[f"{w}={v}" for w, v in TRITON_CASES])
def test_triton_backend_relu_grads_match_reference(which, value):
    q, k, v, do = _inputs(which, value, 0)
    ref = _grads("reference", q, k, v, do)
    got = _grads("triton", q, k, v, do)
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        _assert_same(name, g, r)


@pytest.mark.quadratic_form
@pytest.mark.parametrize("which,value", RELU_CASES, ids=[f"{w}={v}" for w, v in RELU_CASES])
def test_quadratic_form_outputs_and_grads_match_reference(which, value):
    """The torch backend's quadratic form (small CPU calls) computes what the reference does, so with a
    NaN or inf input its output and gradients have the reference's NaN / inf pattern exactly."""
    q, k, v, do = _inputs(which, value, 0)
    ins = {name: [t.clone().requires_grad_(True) for t in (q, k, v)] for name in ("torch", "reference")}
    outs = {name: vicinity_attention(*ins[name], GRID, backend=name) for name in ins}
    assert type(outs["torch"].grad_fn).__name__.startswith("_EagerQuadratic")
    _assert_same("o", outs["torch"].detach(), outs["reference"].detach())
    for name, g, r in zip(("dq", "dk", "dv"), *(torch.autograd.grad(outs[n], ins[n], do) for n in ins)):
        _assert_same(name, g, r)
