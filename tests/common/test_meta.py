"""The meta device: shapes, dtypes and strides without data, for every backend's dispatch, and the
deferred initialisation of the module (built on meta, then ``to_empty``, then initialised), which
is how large models are built for FSDP."""
import pytest
import torch

from tests.helpers import assert_rule, make_inputs, token_counts
from vicinity_attn import VicinityAttention, vicinity_attention

GRID, KV_GRID = (3, 4), (2, 3)


def _meta_like(t):
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta").requires_grad_(t.requires_grad)


@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "reference"])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_functional_on_meta_matches_cpu_metadata(backend, layout, dtype):
    Nq, Nk = token_counts(GRID, KV_GRID, prefix=1)
    q, k, v = make_inputs(2, 3, Nq, Nk, 4, 5, dtype=dtype, layout=layout)
    kw = dict(grid=GRID, kv_grid=KV_GRID, layout=layout, num_prefix_tokens=1)
    # The CPU run the meta one must describe: triton's output is allocated like the torch backend's.
    cpu_backend = "torch" if backend in ("auto", "triton") else backend
    want = vicinity_attention(q, k, v, backend=cpu_backend, **kw)
    want_grads = torch.autograd.grad(want.sum(), (q, k, v))

    mq, mk, mv = (_meta_like(t) for t in (q, k, v))
    got = vicinity_attention(mq, mk, mv, backend=backend, **kw)
    assert got.device.type == "meta"
    assert (got.shape, got.dtype, got.stride()) == (want.shape, want.dtype, want.stride())
    grads = torch.autograd.grad(got.sum(), (mq, mk, mv))
    for g, w in zip(grads, want_grads):
        assert g.device.type == "meta" and (g.shape, g.dtype) == (w.shape, w.dtype)


def test_functional_on_meta_still_validates():
    q = torch.empty(1, 2, 12, 4, device="meta")
    with pytest.raises(ValueError, match="grid"):
        vicinity_attention(q, q, q, (3, 5), backend="torch")
    with pytest.raises(ValueError, match="head dims up to 256"):
        big = torch.empty(1, 2, 12, 300, device="meta")
        vicinity_attention(big, big, q, (3, 4), backend="triton")


@pytest.mark.parametrize("sr_ratio,prefix", [(1, 0), (2, 1)])
def test_module_deferred_init(sr_ratio, prefix):
    kw = dict(dim=16, num_heads=2, sr_ratio=sr_ratio, num_prefix_tokens=prefix, backend="torch")
    with torch.device("meta"):
        layer = VicinityAttention(**kw)
        x = torch.randn(2, prefix + 4 * 4, 16)
        y = layer(x, 4, 4)
    assert y.device.type == "meta" and y.shape == x.shape
    assert all(p.device.type == "meta" for p in layer.parameters())

    layer.to_empty(device="cpu")
    with torch.no_grad():           # whatever to_empty left behind must not survive initialisation
        for p in layer.parameters():
            p.fill_(float("nan"))
    layer.reset_parameters()
    for name, p in layer.named_parameters():
        assert torch.isfinite(p).all(), f"{name} not initialised by reset_parameters"
    for lin in (layer.q, layer.k, layer.v, layer.proj):
        assert 0.01 < lin.weight.std().item() < 0.03 and not lin.bias.any()

    # The materialised layer computes what a layer built on the CPU computes with the same weights.
    cpu_layer = VicinityAttention(**kw)
    layer.load_state_dict(cpu_layer.state_dict(), strict=True)
    x = torch.randn(2, prefix + 4 * 4, 16)
    assert torch.equal(layer(x, 4, 4), cpu_layer(x, 4, 4))


def test_module_materialised_from_meta_is_correct():
    """After meta -> to_empty -> reset_parameters, the layer matches the same weights run through the
    float64 reference backend."""
    with torch.device("meta"):
        layer = VicinityAttention(dim=8, num_heads=2, sr_ratio=2, backend="torch").double()
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    reference = VicinityAttention(dim=8, num_heads=2, sr_ratio=2, backend="reference").double()
    reference.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(2, 16, 8, dtype=torch.float64)
    want = reference(x, 4, 4)
    assert_rule("module output", layer(x, 4, 4), want, want, torch.float64)


@pytest.mark.parametrize("clip", [True, False])
def test_vvt_layer_deferred_init(clip):
    from vicinity_attn.layers.vvt import VicinityVisionAttention
    with torch.device("meta"):
        layer = VicinityVisionAttention(16, 2, sr_ratio=2, clip=clip, backend="torch")
        y = layer(torch.randn(2, 16, 16), 4, 4)
    assert y.device.type == "meta" and y.shape == (2, 16, 16)
    layer.to_empty(device="cpu")
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(float("nan"))
    layer.reset_parameters()
    assert all(torch.isfinite(p).all() for p in layer.parameters())
    assert torch.isfinite(layer(torch.randn(2, 16, 16), 4, 4)).all()
