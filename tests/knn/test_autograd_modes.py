"""knn_attention beyond ``.backward()``: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad),
torch.func grad / jacrev / jacfwd / vmap, and a clear error for derivatives of derivatives.

Every result is compared in float64 with the "reference" backend (the authors' dense formulation under
plain PyTorch autograd: its own jvp and vjp).
"""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

from tests.helpers import (
    SECOND_ORDER,
    PassThroughMode,
    assert_rule,
    check_grad_and_vmap_of_grad,
    check_jacobian,
    check_vmap_over_an_extra_dimension,
    close_fp64,
    make_inputs,
)
from vicinity_attn import knn_attention

BACKENDS = ["torch", "triton"]


def _case(B=1, H=2, Nq=5, Nk=7, D=4, Dv=3, dtype=torch.float64, layout="bhnd"):
    return make_inputs(B, H, Nq, Nk, D, Dv, dtype=dtype, layout=layout, requires_grad=False)


def _fn(backend, topk=3, **kw):
    return lambda q, k, v: knn_attention(q, k, v, topk, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_jvp_matches_reference(backend, layout):
    inputs = _case(layout=layout)
    tangents = tuple(torch.randn_like(t) for t in inputs)
    kw = dict(layout=layout, scale=0.7)
    ref_out, ref_t = torch.func.jvp(_fn("reference", **kw), inputs, tangents)
    out, t = torch.func.jvp(_fn(backend, **kw), inputs, tangents)
    close_fp64(out, ref_out, "primal")
    close_fp64(t, ref_t, "tangent")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_tangent", ["q", "k", "v"])
def test_forward_ad_api_gives_the_tangent(backend, with_tangent):
    """torch.autograd.forward_ad: one input dual, the others plain; never a silent zero / None tangent."""
    q, k, v = _case()
    args = {"q": q, "k": k, "v": v}
    t = torch.randn_like(args[with_tangent])
    ref = torch.func.jvp(lambda x: _fn("reference")(**{**args, with_tangent: x}), (args[with_tangent],), (t,))[1]
    with fwAD.dual_level():
        args[with_tangent] = fwAD.make_dual(args[with_tangent], t)
        tangent = fwAD.unpack_dual(_fn(backend)(**args)).tangent
    assert tangent is not None
    close_fp64(tangent, ref, "tangent")


def test_jvp_float32_by_tolerance_rule():
    inputs = _case(dtype=torch.float32, Nq=12, Nk=20, D=8, Dv=8)
    tangents = tuple(torch.randn_like(t) for t in inputs)
    as64 = lambda ts: tuple(t.double() for t in ts)  # noqa: E731
    ref = torch.func.jvp(_fn("reference", topk=9), as64(inputs), as64(tangents))[1]
    plain = torch.func.jvp(_fn("reference", topk=9), inputs, tangents)[1]
    got = torch.func.jvp(_fn("torch", topk=9), inputs, tangents)[1]
    assert got.dtype == torch.float32
    assert_rule("tangent", got, ref, plain, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_func_grad_and_vmap_of_grad(backend):
    check_grad_and_vmap_of_grad(_fn(backend), _fn("reference"), _case(B=2, H=1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", ["jacrev", "jacfwd"])
def test_jacobians(backend, transform):
    inputs = _case(B=1, H=1, Nq=3, Nk=4, D=2, Dv=2)
    check_jacobian(_fn(backend, topk=2), _fn("reference", topk=2), inputs, transform)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_over_an_extra_dimension(backend):
    q, k, v = _case(B=1, H=1)
    check_vmap_over_an_extra_dimension(_fn(backend), _fn("reference"), q, k, v)


def test_tangent_at_ties_holds_every_tied_key():
    """Documented behaviour at exact ties: the mask keeps every key tied with tau and is held fixed, so
    the tangent is the jvp of the softmax over that fixed set (here keys 0, 1, 2 for topk = 2)."""
    q = torch.ones(1, 1, 2, 4, dtype=torch.float64)
    k = torch.tensor([[3.0], [1.0], [1.0], [0.0]], dtype=torch.float64).expand(4, 4).reshape(1, 1, 4, 4).clone()
    v = torch.randn(1, 1, 4, 3, dtype=torch.float64)
    tangents = tuple(torch.randn_like(t) for t in (q, k, v))
    keep = torch.tensor([True, True, True, False])

    def fixed_mask(q, k, v):
        s = (q @ k.transpose(-1, -2)).masked_fill(~keep, float("-inf"))
        return s.softmax(-1) @ v

    ref = torch.func.jvp(fixed_mask, (q, k, v), tangents)[1]
    got = torch.func.jvp(lambda q, k, v: knn_attention(q, k, v, 2, scale=1.0, backend="torch"), (q, k, v), tangents)[1]
    close_fp64(got, ref, "tangent at ties")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(SECOND_ORDER))
def test_second_order_says_what_is_supported(backend, mode):
    q, k, v = _case(B=1, H=1, Nq=3, Nk=4, D=2, Dv=2)
    q = q.requires_grad_(mode == "create_graph")
    with pytest.raises(RuntimeError, match=rf"knn_attention\(backend='{backend}'\) does not support double "
                                           r"backward.*backend='reference'"):
        SECOND_ORDER[mode](_fn(backend, topk=2), q, k, v)
    SECOND_ORDER[mode](_fn("reference", topk=2), q, k, v)     # the suggested way out works


def test_each_mode_takes_its_path():
    """Plain eager calls take the eager Function (no custom-op dispatch); under a torch function mode the
    call is the custom op (what torch.compile and modes see); inside forward AD the transformable Function."""
    q, k, v = _case()
    q.requires_grad_(True)
    assert "EagerKnn" in type(_fn("torch")(q, k, v).grad_fn).__name__
    with PassThroughMode():
        assert "vicinity_attn_knn_torch_forward" in type(_fn("torch")(q, k, v).grad_fn).__name__
    with fwAD.dual_level():
        out = _fn("torch")(fwAD.make_dual(q, torch.randn_like(q)), k, v)
    assert "TransformableKnn" in type(out.grad_fn).__name__
