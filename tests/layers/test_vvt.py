"""The VVT-compatible layer against the authors' parameter names and a re-statement of their forward."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import VVT_CONFIGS, assert_rule, authors_forward, authors_param_shapes, vvt_layer_and_weights
from vicinity_attn.layers.vvt import VicinityVisionAttention, abs_clamp


@pytest.mark.parametrize("sr_ratio", [1, 2, 4])
@pytest.mark.parametrize("fr_ratio", [1, 2])
def test_parameter_names_and_shapes_are_theirs(sr_ratio, fr_ratio):
    C, se = 64, 2
    layer = VicinityVisionAttention(C, 2, sr_ratio=sr_ratio, fr_ratio=fr_ratio, se_reduction=se)
    got = [(name, tuple(t.shape)) for name, t in layer.state_dict().items()]
    assert got == list(authors_param_shapes(C, sr_ratio, fr_ratio, se).items())


def test_their_state_dict_loads_strictly_and_is_used():
    cfg = VVT_CONFIGS[1]
    layer, sd, _ = vvt_layer_and_weights(cfg, seed=0)
    for name, t in layer.state_dict().items():
        assert torch.equal(t, sd[name]), name
    with pytest.raises(RuntimeError):  # a key of another layer's naming must not load strictly
        bad = dict(sd)
        bad["proj.weight"] = bad.pop("out_proj.weight")
        layer.load_state_dict(bad, strict=True)


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("cfg", VVT_CONFIGS)
def test_matches_their_forward_fp64(cfg, clip):
    layer, sd, x = vvt_layer_and_weights(cfg, seed=1, clip=clip, backend="torch")
    _, heads, sr, fr, _, use_sum, H, W = cfg
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    ours = layer(x1, H, W)
    theirs = authors_forward(sd, x2, H, W, num_heads=heads, sr_ratio=sr, fr=fr, use_sum=use_sum, clip=clip)
    assert ours.shape == x.shape and ours.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, rtol=1e-11, atol=1e-12)
    dout = torch.randn_like(ours)
    (g1,) = torch.autograd.grad(ours, x1, dout)
    (g2,) = torch.autograd.grad(theirs, x2, dout)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-11)


def test_clamp_changes_the_result_when_it_bites():
    """Honesty check: with large activations the clamp is active, and on/off must differ."""
    cfg = VVT_CONFIGS[0]
    layer, sd, x = vvt_layer_and_weights(cfg, seed=2)
    _, heads, sr, fr, _, use_sum, H, W = cfg
    x = x * 300.0  # states far beyond 1e4
    on = layer(x, H, W)
    layer.clip = False
    off = layer(x, H, W)
    assert not torch.allclose(on, off)
    theirs = authors_forward(sd, x, H, W, num_heads=heads, sr_ratio=sr, fr=fr, use_sum=use_sum, clip=True)
    torch.testing.assert_close(on, theirs, rtol=1e-11, atol=1e-12)


def _backend_params():
    return ["reference", "torch", "triton"]


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("cfg", [VVT_CONFIGS[1], VVT_CONFIGS[2]])
def test_every_backend_without_clamp(cfg, backend):
    layer, sd, x = vvt_layer_and_weights(cfg, seed=3, clip=False, backend=backend)
    _, heads, sr, fr, _, use_sum, H, W = cfg
    x1 = x.clone().requires_grad_()
    ours = layer(x1, H, W)
    theirs = authors_forward(sd, x, H, W, num_heads=heads, sr_ratio=sr, fr=fr, use_sum=use_sum, clip=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-11)
    ours.square().sum().backward()
    assert x1.grad is not None and torch.isfinite(x1.grad).all()
    assert all(p.grad is not None for p in layer.parameters())


def test_float32_runs_and_matches_fp64():
    cfg = VVT_CONFIGS[1]
    layer, sd, x = vvt_layer_and_weights(cfg, seed=4)
    _, heads, sr, fr, _, use_sum, H, W = cfg
    ref = authors_forward(sd, x, H, W, num_heads=heads, sr_ratio=sr, fr=fr, use_sum=use_sum, clip=True)
    out = layer.float()(x.float(), H, W)
    assert out.dtype == torch.float32
    # Tolerance rule: the plain fp32 computation is their forward restated, on fp32 weights and input.
    sd32 = {name: t.float() for name, t in sd.items()}
    plain = authors_forward(sd32, x.float(), H, W, num_heads=heads, sr_ratio=sr, fr=fr, use_sum=use_sum, clip=True)
    assert_rule("out", out, ref, plain, torch.float32)


def test_abs_clamp_keeps_sign_and_zero():
    t = torch.tensor([-1e6, -3.0, -1e-7, 0.0, 1e-7, 2.0, 1e6], dtype=torch.float64)
    want = torch.tensor([-1e4, -3.0, -1e-4, 0.0, 1e-4, 2.0, 1e4], dtype=torch.float64)
    assert torch.equal(abs_clamp(t), want)


@pytest.mark.parametrize("kwargs, match", [
    (dict(embed_dim=30, num_heads=4), "num_heads"),
    (dict(embed_dim=32, num_heads=4, fr_ratio=3), "fr_ratio"),
    (dict(embed_dim=32, num_heads=4, se_reduction=3), "se_reduction"),
    (dict(embed_dim=32, num_heads=0), "num_heads"),
    (dict(embed_dim=32, num_heads=4, backend="cuda"), "backend"),
])
def test_bad_construction_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VicinityVisionAttention(**kwargs)


def test_bad_input_names_the_argument():
    layer = VicinityVisionAttention(16, 2, sr_ratio=4)
    x = torch.randn(1, 20, 16)
    with pytest.raises(ValueError, match="H \\* W"):
        layer(x, 4, 4)
    with pytest.raises(ValueError, match="channels"):
        layer(torch.randn(1, 20, 8), 4, 5)
    with pytest.raises(ValueError, match="sr_ratio"):
        layer(x, 2, 10)
    with pytest.raises(NotImplementedError, match="linear"):
        VicinityVisionAttention(16, 2, linear=True)


@pytest.mark.parametrize("clip", [True, False])
def test_compiles_fullgraph(clip):
    """Both paths trace without a graph break (clip off: through the torch custom op)."""
    cfg = VVT_CONFIGS[1]
    layer, _, x = vvt_layer_and_weights(cfg, seed=5, clip=clip, backend="torch")
    H, W = cfg[6], cfg[7]
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, H, W), layer(x, H, W), rtol=1e-12, atol=1e-13)
