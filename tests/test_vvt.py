"""The VVT-compatible layer against the authors' parameter names and a re-statement of their forward."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_rule
from vicinity_attn.layers.vvt import VicinityVisionAttention, abs_clamp


def authors_param_shapes(C: int, sr_ratio: int, fr_ratio: int, se_reduction: int) -> dict[str, tuple[int, ...]]:
    """Hand-written list of the state-dict keys of their ``VicinityVisionAttention`` (linear=False),
    in their registration order."""
    inner = C // fr_ratio
    shapes = {
        "k_proj.weight": (inner, C), "k_proj.bias": (inner,),
        "v_proj.weight": (inner, C), "v_proj.bias": (inner,),
        "q_proj.weight": (inner, C), "q_proj.bias": (inner,),
    }
    if sr_ratio > 1:
        shapes.update({"sr.weight": (C, C, sr_ratio, sr_ratio), "sr.bias": (C,),
                       "norm.weight": (C,), "norm.bias": (C,)})
    shapes.update({"out_proj.weight": (C, inner), "out_proj.bias": (C,),
                   "se_fc.0.weight": (C // se_reduction, C), "se_fc.2.weight": (C, C // se_reduction)})
    return shapes


def random_state_dict(shapes: dict[str, tuple[int, ...]], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random float64 weights, large enough that the attention and the SE gate matter."""
    sd = {}
    for name, shape in shapes.items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        scale = 1.0 / math.sqrt(fan_in) if len(shape) > 1 else 0.3
        sd[name] = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    if "norm.weight" in sd:
        sd["norm.weight"] += 1.0  # a LayerNorm gain near 1, as trained ones are
    return sd


def _their_abs_clamp(t: torch.Tensor) -> torch.Tensor:
    sign = t.sign()
    return t.abs().clamp(1e-4, 10000) * sign


def authors_forward(sd: dict[str, torch.Tensor], query: torch.Tensor, H: int, W: int, *, num_heads: int,
                    sr_ratio: int, fr: int, use_sum: bool, clip: bool) -> torch.Tensor:
    """Their forward restated step by step with functional ops (same tensor layouts: (L, N, E) and
    the (N, L, h, d) head split, the angle tables from flat token indices, the concatenated
    expanded features). Only change: angles in the input dtype instead of float32."""
    B, N, C = query.shape
    se = query.permute(0, 2, 1).mean(-1)                                   # se_pool
    se = torch.sigmoid(F.linear(F.relu(F.linear(se, sd["se_fc.0.weight"])), sd["se_fc.2.weight"]))
    se = se.view(B, C, 1)
    if sr_ratio > 1:
        x_ = query.permute(0, 2, 1).reshape(B, C, H, W)
        x_ = F.conv2d(x_, sd["sr.weight"], sd["sr.bias"], stride=sr_ratio).reshape(B, C, -1).permute(0, 2, 1)
        x_ = F.layer_norm(x_, (C,), sd["norm.weight"], sd["norm.bias"])
    else:
        x_ = query
    k = F.linear(x_, sd["k_proj.weight"], sd["k_proj.bias"]).permute(1, 0, 2)
    v = F.linear(x_, sd["v_proj.weight"], sd["v_proj.bias"]).permute(1, 0, 2)
    query = query.permute(1, 0, 2)
    tgt_len, bsz, embed_dim = query.shape
    head_dim = embed_dim // num_heads
    q = F.linear(query, sd["q_proj.weight"], sd["q_proj.bias"])
    q = q.contiguous().view(tgt_len, bsz, num_heads, head_dim // fr).transpose(0, 1)
    k = k.contiguous().view(-1, bsz, num_heads, head_dim // fr).transpose(0, 1)
    v = v.contiguous().view(-1, bsz, num_heads, head_dim // fr).transpose(0, 1)
    q, k = F.relu(q), F.relu(k)
    c = math.pi / 2
    m, n = W, H                                   # their get_index(W, H): m = width, n = height
    index = torch.arange(m * n, dtype=q.dtype).reshape(1, -1, 1, 1)
    a = c * torch.div(index, m, rounding_mode="floor") / n
    b = c * torch.remainder(index, m) / m
    ms, ns = m / sr_ratio, n / sr_ratio
    index = torch.arange(int(ms * ns), dtype=q.dtype).reshape(1, -1, 1, 1)
    a_sr = c * torch.div(index, ms, rounding_mode="floor") / ns
    b_sr = c * torch.remainder(index, ms) / ms
    if use_sum:
        q_ = torch.cat([q * torch.cos(a), q * torch.sin(a), q * torch.cos(b), q * torch.sin(b)], dim=-1)
        k_ = torch.cat([k * torch.cos(a_sr), k * torch.sin(a_sr), k * torch.cos(b_sr), k * torch.sin(b_sr)], dim=-1)
    else:
        q_ = torch.cat([q * torch.cos(a) * torch.cos(b), q * torch.cos(a) * torch.sin(b),
                        q * torch.sin(a) * torch.cos(b), q * torch.sin(a) * torch.sin(b)], dim=-1)
        k_ = torch.cat([k * torch.cos(a_sr) * torch.cos(b_sr), k * torch.cos(a_sr) * torch.sin(b_sr),
                        k * torch.sin(a_sr) * torch.cos(b_sr), k * torch.sin(a_sr) * torch.sin(b_sr)], dim=-1)
    eps = 1e-4
    maybe = _their_abs_clamp if clip else (lambda t: t)
    kv_ = maybe(torch.matmul(k_.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)))
    k_sum = torch.sum(k_, dim=1, keepdim=True)
    z_ = maybe(1 / (torch.sum(q_ * k_sum, dim=-1) + eps))
    out = maybe(torch.matmul(q_.transpose(1, 2), kv_).transpose(1, 2))
    out = maybe(out * z_.unsqueeze(-1))
    out = out.transpose(0, 1).contiguous().view(tgt_len, bsz, embed_dim // fr)
    out = maybe(F.linear(out, sd["out_proj.weight"], sd["out_proj.bias"]))
    out = out.permute(1, 2, 0)
    out = maybe(out + out * se.expand_as(out))
    return out.permute(2, 0, 1).permute(1, 0, 2)


CONFIGS = [  # (C, heads, sr_ratio, fr_ratio, se_reduction, use_sum, H, W)
    (16, 2, 1, 1, 2, True, 4, 5),
    (24, 2, 2, 2, 1, True, 6, 4),
    (16, 1, 1, 2, 2, False, 3, 5),
    (32, 4, 2, 1, 4, False, 4, 6),
]


def _layer_and_weights(cfg, seed: int, **kwargs):
    C, heads, sr, fr, se_red, use_sum, H, W = cfg
    gen = torch.Generator().manual_seed(seed)
    sd = random_state_dict(authors_param_shapes(C, sr, fr, se_red), gen)
    layer = VicinityVisionAttention(C, heads, sr_ratio=sr, fr_ratio=fr, se_reduction=se_red,
                                    use_sum=use_sum, **kwargs).double()
    layer.load_state_dict(sd, strict=True)
    x = torch.randn(3, H * W, C, generator=gen, dtype=torch.float64)
    return layer, sd, x


@pytest.mark.parametrize("sr_ratio", [1, 2, 4])
@pytest.mark.parametrize("fr_ratio", [1, 2])
def test_parameter_names_and_shapes_are_theirs(sr_ratio, fr_ratio):
    C, se = 64, 2
    layer = VicinityVisionAttention(C, 2, sr_ratio=sr_ratio, fr_ratio=fr_ratio, se_reduction=se)
    got = [(name, tuple(t.shape)) for name, t in layer.state_dict().items()]
    assert got == list(authors_param_shapes(C, sr_ratio, fr_ratio, se).items())


def test_their_state_dict_loads_strictly_and_is_used():
    cfg = CONFIGS[1]
    layer, sd, _ = _layer_and_weights(cfg, seed=0)
    for name, t in layer.state_dict().items():
        assert torch.equal(t, sd[name]), name
    with pytest.raises(RuntimeError):  # a key of another layer's naming must not load strictly
        bad = dict(sd)
        bad["proj.weight"] = bad.pop("out_proj.weight")
        layer.load_state_dict(bad, strict=True)


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_matches_their_forward_fp64(cfg, clip):
    layer, sd, x = _layer_and_weights(cfg, seed=1, clip=clip, backend="torch")
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
    cfg = CONFIGS[0]
    layer, sd, x = _layer_and_weights(cfg, seed=2)
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
@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[2]])
def test_every_backend_without_clamp(cfg, backend):
    layer, sd, x = _layer_and_weights(cfg, seed=3, clip=False, backend=backend)
    _, heads, sr, fr, _, use_sum, H, W = cfg
    x1 = x.clone().requires_grad_()
    ours = layer(x1, H, W)
    theirs = authors_forward(sd, x, H, W, num_heads=heads, sr_ratio=sr, fr=fr, use_sum=use_sum, clip=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-11)
    ours.square().sum().backward()
    assert x1.grad is not None and torch.isfinite(x1.grad).all()
    assert all(p.grad is not None for p in layer.parameters())


def test_float32_runs_and_matches_fp64():
    cfg = CONFIGS[1]
    layer, sd, x = _layer_and_weights(cfg, seed=4)
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
    cfg = CONFIGS[1]
    layer, _, x = _layer_and_weights(cfg, seed=5, clip=clip, backend="torch")
    H, W = cfg[6], cfg[7]
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, H, W), layer(x, H, W), rtol=1e-12, atol=1e-13)
