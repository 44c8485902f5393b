"""L2ViT's layers against the authors' parameter names and a restatement of their forward."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_rule
from vicinity_attn.layers.l2vit import LCM, LGABlock, LinearAttention


def their_keys(dim: int, heads: int, *, qkv_bias: bool, ffn: bool, enhanced: bool, mlp_ratio: float = 4.0):
    """Hand-written state-dict keys and shapes of their ``LGABlock`` (in their registration order)."""
    hidden = int(dim * mlp_ratio)
    keys = {"cpe.0.proj.weight": (dim, 1, 3, 3), "cpe.0.proj.bias": (dim,),
            "norm1.weight": (dim,), "norm1.bias": (dim,),
            "attn.temperature": (heads, 1, 1), "attn.qkv.weight": (3 * dim, dim)}
    if qkv_bias:
        keys["attn.qkv.bias"] = (3 * dim,)
    keys.update({"attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,)})
    if ffn:
        keys.update({"norm2.weight": (dim,), "norm2.bias": (dim,), "mlp.fc1.weight": (hidden, dim),
                     "mlp.fc1.bias": (hidden,), "mlp.fc2.weight": (dim, hidden), "mlp.fc2.bias": (dim,)})
    if enhanced:
        keys.update({"norm3.weight": (dim,), "norm3.bias": (dim,),
                     "local_mp.conv1.weight": (dim, 1, 7, 7), "local_mp.conv1.bias": (dim,),
                     "local_mp.bn.weight": (dim,), "local_mp.bn.bias": (dim,),
                     "local_mp.bn.running_mean": (dim,), "local_mp.bn.running_var": (dim,),
                     "local_mp.bn.num_batches_tracked": (),
                     "local_mp.conv2.weight": (dim, 1, 7, 7), "local_mp.conv2.bias": (dim,)})
    return keys


def random_state_dict(keys, gen: torch.Generator, attn_gain: float = 1.0):
    """Random float64 weights (as trained ones: norms' gains near 1, BN running variances positive);
    ``attn_gain`` scales qkv so the normaliser floor is active on some rows and not others."""
    sd = {}
    for name, shape in keys.items():
        if name.endswith("num_batches_tracked"):
            sd[name] = torch.tensor(7)
            continue
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
        sd[name] = t / math.sqrt(fan_in) if len(shape) > 1 else 0.3 * t
    for name in sd:
        if name.endswith(("norm1.weight", "norm2.weight", "norm3.weight", "bn.weight")):
            sd[name] = sd[name] + 1.0
        if name.endswith("running_var"):
            sd[name] = sd[name].abs() + 0.5
        if name.endswith("temperature"):
            sd[name] = sd[name].abs() + 0.1
        if name.endswith("qkv.weight"):
            sd[name] = sd[name] * attn_gain
    return sd


def sub(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# ---- their forward, restated step by step with functional ops (same layouts and operation order) ----

def their_linear_attention(sd, x, heads):
    B, N, C = x.shape
    qkv = F.linear(x, sd["qkv.weight"], sd.get("qkv.bias"))
    qkv = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = F.relu(qkv[0]), F.relu(qkv[1]), qkv[2]
    denom = torch.clamp(q @ k.transpose(-2, -1).sum(dim=-1, keepdim=True), 1e2)
    attn = (k.transpose(-2, -1) @ v) * sd["temperature"]
    attn = (q @ attn) / denom
    return F.linear(attn.transpose(1, 2).reshape(B, N, C), sd["proj.weight"], sd["proj.bias"])


def their_lcm(sd, x, H, W, training):
    B, N, C = x.shape
    y = x.transpose(-1, -2).contiguous().view(B, C, H, W)
    y = F.conv2d(y, sd["conv1.weight"], sd["conv1.bias"], padding=3, groups=C)
    y = F.gelu(y)
    y = F.batch_norm(y, sd["bn.running_mean"].clone(), sd["bn.running_var"].clone(), sd["bn.weight"],
                     sd["bn.bias"], training=training)
    y = F.conv2d(y, sd["conv2.weight"], sd["conv2.bias"], padding=3, groups=C)
    return y.flatten(2).transpose(-1, -2)


def their_block(sd, x, H, W, heads, *, ffn=True, enhanced=True, training=False):
    B, N, C = x.shape
    feat = x.transpose(1, 2).contiguous().view(B, C, H, W)
    feat = F.conv2d(feat, sd["cpe.0.proj.weight"], sd["cpe.0.proj.bias"], padding=1, groups=C)
    x = x + feat.flatten(2).transpose(1, 2)
    ln = lambda t, name: F.layer_norm(t, (C,), sd[f"{name}.weight"], sd[f"{name}.bias"])  # noqa: E731
    x = x + their_linear_attention(sub(sd, "attn."), ln(x, "norm1"), heads)
    if enhanced:
        x = x + their_lcm(sub(sd, "local_mp."), ln(x, "norm3"), H, W, training)
    if ffn:
        h = F.gelu(F.linear(ln(x, "norm2"), sd["mlp.fc1.weight"], sd["mlp.fc1.bias"]))
        x = x + F.linear(h, sd["mlp.fc2.weight"], sd["mlp.fc2.bias"])
    return x


def floor_fraction(sd, x, heads):
    """Fraction of (row, head) normalisers below their floor of 100, for x entering the attention."""
    B, N, C = x.shape
    qkv = F.linear(x, sd["qkv.weight"], sd.get("qkv.bias")).reshape(B, N, 3, heads, C // heads)
    q, k = F.relu(qkv[:, :, 0]), F.relu(qkv[:, :, 1])
    sums = (q * k.sum(1, keepdim=True)).sum(-1)
    return (sums < 100).double().mean().item()


CONFIGS = [  # (dim, heads, H, W, qkv_bias, ffn, enhanced)
    (32, 4, 5, 6, True, True, True),
    (24, 2, 4, 4, False, True, False),
    (16, 1, 3, 7, True, False, True),
]


def _block_and_weights(cfg, seed, backend):
    """Our block loaded with their random weights, and an input; qkv's gain is chosen so that the
    attention's floor is active on some rows and not on others (asserted)."""
    dim, heads, H, W, qkv_bias, ffn, enhanced = cfg
    keys = their_keys(dim, heads, qkv_bias=qkv_bias, ffn=ffn, enhanced=enhanced)
    block = LGABlock(dim, heads, qkv_bias=qkv_bias, ffn=ffn, enhanced=enhanced, backend=backend).double()
    for gain in (0.5 * 1.2 ** i for i in range(16)):
        gen = torch.Generator().manual_seed(seed)
        sd = random_state_dict(keys, gen, attn_gain=gain)
        x = torch.randn(2, H * W, dim, generator=gen, dtype=torch.float64)
        block.load_state_dict(sd, strict=True)
        with torch.no_grad():
            frac = floor_fraction(sub(sd, "attn."), block.norm1(block.cpe[0](x, H, W)), heads)
        if 0.25 < frac < 0.75:
            return block, sd, x
    raise AssertionError("no qkv gain puts the floor on some rows and not on others")


@pytest.mark.parametrize("cfg", CONFIGS)
def test_parameter_names_and_shapes_are_theirs(cfg):
    dim, heads, _, _, qkv_bias, ffn, enhanced = cfg
    block = LGABlock(dim, heads, qkv_bias=qkv_bias, ffn=ffn, enhanced=enhanced)
    got = [(name, tuple(t.shape)) for name, t in block.state_dict().items()]
    assert got == list(their_keys(dim, heads, qkv_bias=qkv_bias, ffn=ffn, enhanced=enhanced).items())
    attn = LinearAttention(dim, heads)
    assert [n for n, _ in attn.state_dict().items()] == ["temperature", "qkv.weight", "proj.weight", "proj.bias"]
    assert torch.equal(attn.temperature, torch.full((heads, 1, 1), (dim // heads) ** -0.5))
    assert LinearAttention(dim, heads, qk_scale=0.25).temperature.flatten().tolist() == [0.25] * heads
    assert [n for n, _ in LCM(dim).state_dict().items()] == [
        "conv1.weight", "conv1.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
        "bn.num_batches_tracked", "conv2.weight", "conv2.bias"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_block_matches_their_forward_fp64(cfg, backend):
    block, sd, x = _block_and_weights(cfg, seed=1, backend=backend)
    dim, heads, H, W, *_ = cfg
    block.eval()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = block(x1, H, W)
    theirs = their_block(sd, x2, H, W, heads, ffn=cfg[5], enhanced=cfg[6])
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    dout = torch.randn_like(ours)
    (g1,) = torch.autograd.grad(ours, x1, dout)
    (g2,) = torch.autograd.grad(theirs, x2, dout)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_attention_matches_theirs_with_the_floor_active_on_some_rows(backend):
    dim, heads, N = 32, 4, 20
    gen = torch.Generator().manual_seed(2)
    keys = {k[5:]: s for k, s in their_keys(dim, heads, qkv_bias=False, ffn=False, enhanced=False).items()
            if k.startswith("attn.")}
    sd = random_state_dict(keys, gen)
    x = torch.randn(3, N, dim, generator=gen, dtype=torch.float64) * 3.0
    frac = floor_fraction(sd, x, heads)
    assert 0.1 < frac < 0.9, f"floor active on {frac:.0%} of the rows: the test would not test both cases"
    attn = LinearAttention(dim, heads, backend=backend).double()
    attn.load_state_dict(sd, strict=True)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = attn(x1), their_linear_attention(sd, x2, heads)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    dout = torch.randn_like(ours)
    got = torch.autograd.grad(ours, [x1, *attn.parameters()], dout)
    sd_leaves = {k: v.clone().requires_grad_() for k, v in sd.items()}
    theirs = their_linear_attention(sd_leaves, x2, heads)
    want = torch.autograd.grad(theirs, [x2, *(sd_leaves[n] for n, _ in attn.named_parameters())], dout)
    for (name, _), g, w in zip([("x", None), *attn.named_parameters()], got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=name)


def test_lcm_train_mode_batch_statistics():
    dim, H, W = 8, 4, 5
    gen = torch.Generator().manual_seed(3)
    keys = {k[9:]: s for k, s in their_keys(dim, 1, qkv_bias=False, ffn=False, enhanced=True).items()
            if k.startswith("local_mp.")}
    sd = random_state_dict(keys, gen)
    lcm = LCM(dim).double()
    lcm.load_state_dict(sd, strict=True)
    x = torch.randn(2, H * W, dim, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(lcm.eval()(x, H, W), their_lcm(sd, x, H, W, training=False), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lcm.train()(x, H, W), their_lcm(sd, x, H, W, training=True), rtol=1e-12, atol=1e-12)


def test_float32_block_within_the_tolerance_rule():
    cfg = CONFIGS[0]
    block, sd, x = _block_and_weights(cfg, seed=4, backend="torch")
    dim, heads, H, W, *_ = cfg
    ref = their_block(sd, x, H, W, heads)
    sd32 = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    plain = their_block(sd32, x.float(), H, W, heads)
    out = block.float().eval()(x.float(), H, W)
    assert out.dtype == torch.float32
    assert_rule("out", out, ref, plain, torch.float32)


def test_drop_path_and_bad_arguments():
    block = LGABlock(16, 2, drop_path=0.5, enhanced=True, layer_scale_init_value=1e-6, cpe=False)
    x = torch.randn(8, 12, 16)
    block.eval()
    torch.testing.assert_close(block(x, 3, 4), block(x, 3, 4))
    with pytest.raises(TypeError, match="enhance"):
        LGABlock(16, 2, enhance=True)
    with pytest.raises(ValueError, match="num_heads"):
        LinearAttention(30, 4)
    with pytest.raises(ValueError, match="backend"):
        LinearAttention(32, 4, backend="cuda")
    with pytest.raises(ValueError, match="H \\* W"):
        block(x, 3, 5)
    with pytest.raises(ValueError, match="dim"):
        LinearAttention(32, 4)(torch.randn(2, 5, 16))


def test_compiles_fullgraph():
    cfg = CONFIGS[1]
    block, _, x = _block_and_weights(cfg, seed=5, backend="torch")
    H, W = cfg[2], cfg[3]
    block.eval()
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, H, W), block(x, H, W), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vicinity_attention_module_with_floor_and_temperature(backend):
    """The generic module with L2ViT's normaliser: variant "none" + den_floor=100, eps=0, temperature
    is their LinearAttention (weights mapped over); variant "sum" adds VVT's locality and matches the
    reference backend, with gradients reaching the temperature."""
    from vicinity_attn import VicinityAttention
    dim, heads, H, W = 32, 4, 4, 5
    gen = torch.Generator().manual_seed(6)
    keys = {k[5:]: s for k, s in their_keys(dim, heads, qkv_bias=False, ffn=False, enhanced=False).items()
            if k.startswith("attn.")}
    sd = random_state_dict(keys, gen)
    x = torch.randn(2, H * W, dim, generator=gen, dtype=torch.float64) * 3.0
    assert 0.1 < floor_fraction(sd, x, heads) < 0.9
    mod = VicinityAttention(dim, heads, qkv_bias=False, variant="none", eps=0.0, den_floor=100.0,
                            temperature=True, backend=backend).double()
    wq, wk, wv = sd["qkv.weight"].chunk(3)
    mod.load_state_dict({"q.weight": wq, "k.weight": wk, "v.weight": wv, "proj.weight": sd["proj.weight"],
                         "proj.bias": sd["proj.bias"], "temperature": sd["temperature"]}, strict=True)
    torch.testing.assert_close(mod(x, H, W), their_linear_attention(sd, x, heads), rtol=1e-12, atol=1e-12)

    mod.variant = "sum"
    out = mod(x, H, W)
    mod.backend = "reference"
    want = mod(x, H, W)
    assert not torch.allclose(out, their_linear_attention(sd, x, heads))   # the locality matters
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(out.square().sum(), mod.temperature)
    assert torch.isfinite(g).all() and (g != 0).all()
    assert "den_floor=100.0" in repr(mod) and "temperature=True" in repr(mod)
    with pytest.raises(ValueError, match="den_floor"):
        VicinityAttention(dim, heads, den_floor=-1.0)
    with pytest.raises(ValueError, match="eps must be a positive"):
        VicinityAttention(dim, heads, eps=0.0)


def test_bench_l2vit_provider_is_the_floored_op():
    """The benchmark's ``l2vit`` provider (their formulation) and ``vicinity-floor`` (the op) agree in
    float64, with the floor active on some rows, forward and backward."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bench.cases import Case
    from bench.providers import make_provider

    case = Case(grid=(4, 5), batch=2, heads=2, dim=8, dim_v=6)
    ours = make_provider("vicinity-floor", case, torch.device("cpu"), torch.float64)
    theirs = make_provider("l2vit", case, torch.device("cpu"), torch.float64)
    q, k, v = (torch.randn(2, 2, 20, d, dtype=torch.float64) * 2.2 for d in (8, 8, 6))
    sums = (torch.relu(q) * torch.relu(k).sum(2, keepdim=True)).sum(-1)
    assert 0.1 < (sums < 100).double().mean() < 0.9
    leaves = [[t.clone().requires_grad_() for t in (q, k, v)] for _ in range(2)]
    a, b = ours.fn(*leaves[0]), theirs.fn(*leaves[1])
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    do = torch.randn_like(a)
    for g, w in zip(torch.autograd.grad(a, leaves[0], do), torch.autograd.grad(b, leaves[1], do)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
