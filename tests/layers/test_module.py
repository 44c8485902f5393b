"""The VicinityAttention module: shapes, spatial reduction, gradients, state_dict, backends agree."""
import io

import pytest
import torch

from vicinity_attn import VicinityAttention, vicinity_attention


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


# --- factory arguments (device, dtype) and the dropouts -------------------------------------------

# The state-dict keys every existing checkpoint has (sr_ratio > 1, temperature=True): the dropouts add none.
CHECKPOINT_KEYS = {f"{m}.{p}" for m in ("q", "k", "v", "proj", "sr", "norm") for p in ("weight", "bias")}
CHECKPOINT_KEYS.add("temperature")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_factory_dtype_and_device_reach_every_parameter(dtype):
    m = VicinityAttention(16, 2, sr_ratio=2, temperature=True, device="cpu", dtype=dtype)
    params = dict(m.named_parameters())
    assert set(params) == CHECKPOINT_KEYS
    for name, p in params.items():
        assert p.dtype == dtype and p.device.type == "cpu", name
    assert m.temperature.float().allclose(torch.full((2, 1, 1), 8 ** -0.5), rtol=1e-2)   # initialised
    x = torch.randn(2, 6 * 4, 16, dtype=dtype)
    assert m(x, 6, 4).dtype == dtype


def test_meta_construction_then_to_empty():
    m = VicinityAttention(16, 2, sr_ratio=2, temperature=True, attn_drop=0.1, proj_drop=0.1, device="meta")
    assert all(p.device.type == "meta" for p in m.parameters())
    out = m(torch.empty(2, 6 * 4, 16, device="meta"), 6, 4)
    assert out.device.type == "meta" and out.shape == (2, 24, 16)
    m.to_empty(device="cpu")
    m.reset_parameters()
    m.eval()
    x = torch.randn(2, 24, 16)
    assert torch.isfinite(m(x, 6, 4)).all()


def test_state_dict_keys_unchanged_and_old_checkpoints_load_strictly():
    old = VicinityAttention(16, 2, sr_ratio=2, temperature=True)     # built as before the new arguments
    assert set(old.state_dict()) == CHECKPOINT_KEYS
    new = VicinityAttention(16, 2, sr_ratio=2, temperature=True, attn_drop=0.2, proj_drop=0.1,
                            dtype=torch.float64)
    new.load_state_dict(old.state_dict(), strict=True)
    old.eval(), new.eval()
    x = torch.randn(1, 16, 16)
    torch.testing.assert_close(new(x.double(), 4, 4), old(x, 4, 4).double(), rtol=1e-5, atol=1e-6)


def test_attn_drop_is_dropout_on_the_attention_output_before_proj():
    """What the docstring says attn_drop does: in training, nn.Dropout on the attention core's output (after
    temperature), then proj; in eval the identity."""
    m = VicinityAttention(16, 2, temperature=True, attn_drop=0.4, dtype=torch.float64)
    with torch.no_grad():
        m.temperature.uniform_(0.5, 2.0)
    H, W = 3, 4
    x = torch.randn(2, H * W, 16, dtype=torch.float64)
    B, N, C = x.shape
    q, k, v = (lin(x).view(B, N, 2, 8) for lin in (m.q, m.k, m.v))
    o = vicinity_attention(q, k, v, (H, W), layout="bnhd") * m.temperature.view(2, 1)
    m.train()
    torch.manual_seed(7)
    got = m(x, H, W)
    torch.manual_seed(7)
    want = m.proj(torch.nn.functional.dropout(o, 0.4, training=True).reshape(B, N, C))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not torch.equal(got, m.proj(o.reshape(B, N, C)))    # the mask did something
    m.eval()
    torch.testing.assert_close(m(x, H, W), m.proj(o.reshape(B, N, C)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("which", ["attn_drop", "proj_drop"])
def test_each_dropout_is_active_in_train_and_the_identity_in_eval(which):
    m = VicinityAttention(16, 2, **{which: 0.5})
    x = torch.randn(1, 9, 16)
    m.train()
    assert not torch.equal(m(x, 3, 3), m(x, 3, 3))
    m.eval()
    assert torch.equal(m(x, 3, 3), m(x, 3, 3))
    assert f"{which}=0.5" in repr(m)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("layer", ["vvt", "l2vit", "kvt"])
def test_paper_layers_take_factory_arguments(layer, device):
    """The papers' layers take device / dtype too: every parameter there, the state-dict keys of the
    default construction (the authors' checkpoints still load)."""
    from vicinity_attn.layers import KNNAttention, LinearAttention, VicinityVisionAttention
    make = {"vvt": lambda **kw: VicinityVisionAttention(16, 2, sr_ratio=2, **kw),
            "l2vit": lambda **kw: LinearAttention(16, 2, **kw),
            "kvt": lambda **kw: KNNAttention(16, 2, topk=4, **kw)}[layer]
    default = make()
    m = make(device=device, dtype=torch.float64)
    assert list(m.state_dict()) == list(default.state_dict())
    for name, p in m.named_parameters():
        assert p.dtype == torch.float64 and p.device.type == device, name
    if device == "cpu":
        m.load_state_dict(default.state_dict(), strict=True)
        for (name, p), q in zip(m.named_parameters(), default.parameters()):
            assert torch.equal(p, q.double()), name
