"""The VicinityAttention module: shapes, spatial reduction, gradients, state_dict, backends agree."""
import io

import pytest
import torch

from vicinity_attn import VicinityAttention


@pytest.mark.parametrize("sr_ratio,H,W", [(1, 5, 7), (2, 6, 8), (2, 7, 9)])
@pytest.mark.parametrize("prefix", [0, 1])
def test_shapes_and_backends_agree(sr_ratio, H, W, prefix):
    m = VicinityAttention(32, num_heads=4, sr_ratio=sr_ratio, num_prefix_tokens=prefix).double()
    x = torch.randn(2, prefix + H * W, 32, dtype=torch.float64)
    out = m(x, H, W)
    assert out.shape == x.shape and out.dtype == x.dtype
    m.backend = "reference"
    torch.testing.assert_close(out, m(x, H, W), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sr_ratio", [1, 2])
def test_gradients_reach_every_parameter(sr_ratio):
    m = VicinityAttention(24, num_heads=3, sr_ratio=sr_ratio)
    x = torch.randn(2, 6 * 4, 24, requires_grad=True)
    m(x, 6, 4).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_state_dict_round_trip():
    m = VicinityAttention(16, num_heads=2, sr_ratio=2, variant="product")
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = VicinityAttention(16, num_heads=2, sr_ratio=2, variant="product")
    fresh.load_state_dict(torch.load(buf), strict=True)
    x = torch.randn(1, 16, 16)
    torch.testing.assert_close(fresh(x, 4, 4), m(x, 4, 4), rtol=0, atol=0)
    names = set(m.state_dict())
    assert {"q.weight", "k.weight", "v.weight", "proj.weight", "sr.weight", "norm.weight"} <= names


def test_dropout_and_repr():
    m = VicinityAttention(16, num_heads=2, proj_drop=0.5)
    x = torch.randn(1, 9, 16)
    m.train()
    assert not torch.equal(m(x, 3, 3), m(x, 3, 3))
    m.eval()
    assert torch.equal(m(x, 3, 3), m(x, 3, 3))
    r = repr(m)
    assert "num_heads=2" in r and "variant='sum'" in r


def test_no_qkv_bias():
    m = VicinityAttention(16, num_heads=2, qkv_bias=False)
    assert m.q.bias is None and m.k.bias is None and m.v.bias is None and m.proj.bias is not None


def test_dynamic_compile_with_inductor_and_spatial_reduction():
    """torch.compile(dynamic=True) with the default Inductor backend, for the README's module with
    sr_ratio > 1 (it failed with "cannot determine truth value of Relational"): outputs and gradients
    equal eager on two grids."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = VicinityAttention(dim=16, num_heads=2, sr_ratio=2, backend="torch")
    compiled = torch.compile(layer, dynamic=True)
    for H, W in ((6, 6), (8, 4)):
        x = torch.randn(2, H * W, 16, requires_grad=True)
        y = compiled(x, H, W)
        (gx,) = torch.autograd.grad(y.square().sum(), x)
        want = layer(x, H, W)
        (want_gx,) = torch.autograd.grad(want.square().sum(), x)
        torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gx, want_gx, rtol=1e-4, atol=1e-5)
