"""Autograd modes beyond ``.backward()``: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad),
torch.func grad / jacrev / jacfwd / vmap, and a clear error for derivatives of derivatives.

Every result is compared with the float64 reference, which is plain PyTorch autograd of the formula.
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
    token_counts,
)
from vicinity_attn import vicinity_attention

LINEAR = ["torch", "triton"]


def _case(prefix=1, grid=(3, 4), kv_grid=(2, 3), B=2, H=2, D=4, Dv=5, dtype=torch.float64, layout="bhnd",
          feature_map=None):
    Nq, Nk = token_counts(grid, kv_grid, prefix)
    q, k, v = make_inputs(B, H, Nq, Nk, D, Dv, dtype=dtype, layout=layout, requires_grad=False,
                          feature_map=feature_map)
    return (q, k, v), dict(grid=grid, kv_grid=kv_grid, num_prefix_tokens=prefix, layout=layout)


def _fn(backend, **kw):
    return lambda q, k, v: vicinity_attention(q, k, v, backend=backend, **kw)


@pytest.mark.parametrize("backend", LINEAR)
@pytest.mark.parametrize("variant,feature_map,layout,prefix", [
    ("sum", "relu", "bhnd", 1), ("product", "elu1", "bnhd", 0), ("none", "relu", "bnhd", 2),
    ("sum", "identity", "bnhd", 1)])
def test_jvp_matches_reference(backend, variant, feature_map, layout, prefix):
    inputs, kw = _case(prefix=prefix, layout=layout, feature_map=feature_map)
    kw.update(variant=variant, feature_map=feature_map)
    tangents = tuple(torch.randn_like(t) for t in inputs)
    ref_out, ref_t = torch.func.jvp(_fn("reference", **kw), inputs, tangents)
    out, t = torch.func.jvp(_fn(backend, **kw), inputs, tangents)
    assert t.abs().max() > 0
    close_fp64(out, ref_out, "primal")
    close_fp64(t, ref_t, "tangent")


@pytest.mark.parametrize("backend", LINEAR)
@pytest.mark.parametrize("with_tangent", ["q", "k", "v"])
def test_forward_ad_api_gives_the_tangent(backend, with_tangent):
    """torch.autograd.forward_ad: one input dual, the others plain."""
    (q, k, v), kw = _case()
    t = torch.randn_like({"q": q, "k": k, "v": v}[with_tangent])
    ref = torch.func.jvp(lambda x: _fn("reference", **kw)(**{"q": q, "k": k, "v": v, with_tangent: x}),
                         ({"q": q, "k": k, "v": v}[with_tangent],), (t,))[1]
    with fwAD.dual_level():
        args = {"q": q, "k": k, "v": v}
        args[with_tangent] = fwAD.make_dual(args[with_tangent], t)
        tangent = fwAD.unpack_dual(_fn(backend, **kw)(**args)).tangent
    assert tangent is not None
    close_fp64(tangent, ref, "tangent")


def test_jvp_float32_by_tolerance_rule():
    inputs, kw = _case(dtype=torch.float32)
    tangents = tuple(torch.randn_like(t) for t in inputs)
    as64 = tuple(t.double() for t in inputs)
    ref = torch.func.jvp(_fn("reference", **kw), as64, tuple(t.double() for t in tangents))[1]
    plain = torch.func.jvp(_fn("reference", **kw), inputs, tangents)[1]
    got = torch.func.jvp(_fn("torch", **kw), inputs, tangents)[1]
    assert got.dtype == torch.float32
    assert_rule("tangent", got, ref, plain, torch.float32)


@pytest.mark.parametrize("backend", LINEAR)
def test_func_grad_and_vmap_of_grad(backend):
    inputs, kw = _case(B=2, H=1, grid=(2, 3), kv_grid=(2, 2))
    check_grad_and_vmap_of_grad(_fn(backend, **kw), _fn("reference", **kw), inputs)


@pytest.mark.parametrize("backend", LINEAR)
@pytest.mark.parametrize("transform", ["jacrev", "jacfwd"])
def test_jacobians(backend, transform):
    inputs, kw = _case(B=1, H=1, prefix=0, grid=(2, 2), kv_grid=(2, 1), D=2, Dv=1)
    check_jacobian(_fn(backend, **kw), _fn("reference", **kw), inputs, transform)


@pytest.mark.parametrize("backend", LINEAR)
def test_vmap_over_an_extra_dimension(backend):
    (q, k, v), kw = _case(B=1, H=1)
    check_vmap_over_an_extra_dimension(_fn(backend, **kw), _fn("reference", **kw), q, k, v)


@pytest.mark.parametrize("backend", LINEAR)
@pytest.mark.parametrize("mode", list(SECOND_ORDER))
def test_second_order_says_what_is_supported(backend, mode):
    (q, k, v), kw = _case(B=1, H=1, prefix=0, kv_grid=(2, 2), D=2, Dv=2)
    q = q.requires_grad_(mode == "create_graph")
    with pytest.raises(RuntimeError, match=rf"backend='{backend}'\) does not support double backward.*"
                                           r"backend='reference'"):
        SECOND_ORDER[mode](_fn(backend, **kw), q, k, v)
    SECOND_ORDER[mode](_fn("reference", **kw), q, k, v)     # the suggested way out works


def test_each_mode_takes_its_path():
    """Plain eager calls take the eager Function (no custom-op dispatch); under a torch function mode the
    call is the custom op (what torch.compile and modes see); inside forward AD the transformable Function."""
    (q, k, v), kw = _case()
    q.requires_grad_(True)
    assert "EagerAttention" in type(_fn("torch", **kw)(q, k, v).grad_fn).__name__
    with PassThroughMode():
        assert "vicinity_attn_torch_forward" in type(_fn("torch", **kw)(q, k, v).grad_fn).__name__
    with fwAD.dual_level():
        out = _fn("torch", **kw)(fwAD.make_dual(q, torch.randn_like(q)), k, v)
    assert "TransformableAttention" in type(out.grad_fn).__name__


def _spec_with(**extra):
    """A VicinitySpec with fields this branch's spec may lack (L2ViT's den_floor, a clamp option)."""
    import dataclasses

    from vicinity_attn.common.spec import VicinitySpec
    names = {f.name for f in dataclasses.fields(VicinitySpec)}
    missing = [(name, object, None) for name in extra if name not in names]
    cls = dataclasses.make_dataclass("SpecWithOptions", missing, bases=(VicinitySpec,), frozen=True) \
        if missing else VicinitySpec
    return cls(grid=(3, 4), kv_grid=(3, 4), **extra)


def test_tangent_with_normaliser_floor_matches_autograd_of_the_formula():
    from vicinity_attn.vicinity.reference import vicinity_weights
    from vicinity_attn.vicinity.tangent import vicinity_tangent
    spec = _spec_with(den_floor=3.0)
    q, k, v = make_inputs(2, 2, 12, 12, 4, 3, requires_grad=False)
    w = vicinity_weights(spec)

    def formula(q, k, v):
        a = (q.relu() @ k.relu().transpose(-1, -2)) * w
        return (a @ v) / (a.sum(-1, keepdim=True).clamp_min(3.0) + spec.eps)

    raw = ((q.relu() @ k.relu().transpose(-1, -2)) * w).sum(-1)
    assert (raw < 3.0).any() and (raw > 3.0).any(), "the floor must be active on some rows only"
    tangents = tuple(torch.randn_like(t) for t in (q, k, v))
    ref = torch.func.jvp(formula, (q, k, v), tangents)[1]
    close_fp64(vicinity_tangent(q, k, v, *tangents, spec), ref, "tangent with floor")


def test_tangent_rejects_options_it_does_not_know():
    from vicinity_attn.vicinity.tangent import vicinity_tangent
    spec = _spec_with(clamp=(1e-4, 1e4))
    q, k, v = make_inputs(1, 1, 12, 12, 2, 2, requires_grad=False)
    with pytest.raises(NotImplementedError, match=r"forward-mode AD .* does not support clamp="):
        vicinity_tangent(q, k, v, torch.randn_like(q), None, None, spec)
