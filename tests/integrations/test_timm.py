"""The timm conversions against the real timm (tests/run_integrations.sh runs them in a side environment;
elsewhere they skip): tiny PVT v2, ViT and EfficientViT models with random weights, stock versus converted.

PVT v2 and ViT change the function (softmax -> vicinity attention), so the stock model is made to compute
the same function by replacing its scaled_dot_product_attention with the quadratic reference op on the
layer's grids (recorded from its inputs): the converted model must then equal it, outputs and every
parameter gradient, in float64 to rounding, and in float32 by the tolerance rule (its error against the
float64 truth at most 2x the patched stock model's float32 error, plus a floor). EfficientViT's LiteMLA is
already this op's special case: stock against converted with no patching.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from tests.helpers import rel_err
from tests.integrations import assert_fp64_equal, assert_rule
from vicinity_attn import vicinity_attention

timm = pytest.importorskip("timm", reason="timm is tested in the integrations leg: bash tests/run_integrations.sh")

from vicinity_attn.integrations.timm import (  # noqa: E402
    LiteMLAAttention,
    PvtV2Attention,
    VitAttention,
    convert_efficientvit,
    convert_pvt_v2,
    convert_vit,
    vit_attn_layer,
)

F = torch.nn.functional


def tiny_pvt(linear: bool = False) -> nn.Module:
    # sr_ratios (8, 4, 2, 1) as pvt_v2_b0: on a 64 x 48 image the stages see 16x12 .. 2x2 query grids
    return timm.create_model("pvt_v2_b0", pretrained=False, num_classes=5, depths=(1, 1, 1, 1),
                             embed_dims=(16, 32, 32, 64), num_heads=(1, 2, 2, 4), linear=linear)


def tiny_vit(**kw) -> nn.Module:
    args = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                reg_tokens=2, dynamic_img_size=True, qk_norm=True)
    return timm.create_model("vit_tiny_patch16_224", **{**args, **kw})


def tiny_efficientvit() -> nn.Module:
    return timm.create_model("efficientvit_b0", pretrained=False, num_classes=5, widths=(8, 8, 16, 16, 32),
                             depths=(1, 1, 1, 1, 1), head_dim=8, head_widths=(64, 64))


def outputs_and_grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """[model(x), then the gradient of every parameter (named order)] for a fixed random output gradient."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    gen = torch.Generator().manual_seed(1)
    out.backward(torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype))
    return [out.detach(), *(p.grad.detach() for _, p in model.named_parameters())]


class ReferenceSDPA:
    """Stands in for F.scaled_dot_product_attention while a stock model runs: the quadratic reference
    vicinity op on the grids of the layer being run (set by ``grids(q_tokens, k_tokens)``)."""

    def __init__(self, grids, **options) -> None:
        self.grids, self.options = grids, options

    def __call__(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        assert attn_mask is None and not is_causal and dropout_p == 0.0
        grid, kv_grid, prefix = self.grids(q.shape[2], k.shape[2])
        return vicinity_attention(q, k, v, grid, kv_grid, num_prefix_tokens=prefix, backend="reference",
                                  **self.options)


def pvt_reference_sdpa(stock: nn.Module, **options) -> ReferenceSDPA:
    """For a stock PVT v2: record each attention's feat_size (pre-hook) and give its key grid."""
    current = {}

    def record(module, args):
        current["module"], current["feat"] = module, tuple(args[1])

    for m in stock.modules():
        if type(m) is timm.models.pvt_v2.Attention:
            m.fused_attn = True
            m.register_forward_pre_hook(record)

    def grids(nq, nk):
        m, (H, W) = current["module"], current["feat"]
        if m.pool is not None:
            kv = (7, 7)
        elif m.sr is not None:
            r = m.sr.kernel_size[0]
            kv = (H // r, W // r)
        else:
            kv = (H, W)
        assert nq == H * W and nk == kv[0] * kv[1]
        return (H, W), kv, 0

    return ReferenceSDPA(grids, **options)


# ---------------------------------------------------------------------------------------------- PVT v2


@pytest.mark.parametrize("linear, variant", [(False, "sum"), (False, "product"), (True, "sum"), (False, "none")])
def test_pvt_v2_stock_vs_converted(monkeypatch, linear, variant):
    stock = tiny_pvt(linear).double()
    converted = convert_pvt_v2(copy.deepcopy(stock), variant=variant, backend="torch")
    assert sum(isinstance(m, PvtV2Attention) for m in converted.modules()) == 4
    monkeypatch.setattr(F, "scaled_dot_product_attention", pvt_reference_sdpa(stock, variant=variant))
    x = torch.randn(2, 3, 64, 48, dtype=torch.float64)
    truth = outputs_and_grads(stock, x)
    assert_fp64_equal(outputs_and_grads(converted, x), truth)
    # float32: the tolerance rule against the float64 truth
    plain = outputs_and_grads(stock.float(), x.float())
    got = outputs_and_grads(converted.float(), x.float())
    assert_rule(got, truth, plain, torch.float32)


def test_pvt_v2_state_dict_round_trip():
    stock = tiny_pvt()
    before = {k: v.clone() for k, v in stock.state_dict().items()}
    q_weight = stock.stages[0].blocks[0].attn.q.weight
    model = convert_pvt_v2(stock, backend="torch")
    assert model is stock and model.stages[0].blocks[0].attn.q.weight is q_weight      # in place, same tensors
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    buf = io.BytesIO()
    torch.save(after, buf)
    buf.seek(0)
    fresh = tiny_pvt()
    fresh.load_state_dict(torch.load(buf), strict=True)          # timm loads the converted model's state dict
    model.load_state_dict(fresh.state_dict(), strict=True)       # and the other way
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(convert_pvt_v2(fresh, backend="torch")(x), model(x))


def test_pvt_v2_training_step():
    torch.manual_seed(0)
    model = convert_pvt_v2(tiny_pvt(), backend="torch").train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("sr_ratio, linear_attn", [(1, False), (2, False), (1, True)])
def test_pvt_v2_layer_matches_timm_layout(sr_ratio, linear_attn):
    """The layer's constructor, parameter names, order and shapes are timm's; meta / dtype factory arguments."""
    theirs = timm.models.pvt_v2.Attention(16, num_heads=2, sr_ratio=sr_ratio, linear_attn=linear_attn, qkv_bias=False)
    ours = PvtV2Attention(16, num_heads=2, sr_ratio=sr_ratio, linear_attn=linear_attn, qkv_bias=False)
    layout = lambda m: [(k, v.shape) for k, v in m.state_dict().items()]
    assert layout(ours) == layout(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    meta = PvtV2Attention(16, num_heads=2, sr_ratio=sr_ratio, linear_attn=linear_attn, device="meta",
                          dtype=torch.float64)
    assert all(p.is_meta and p.dtype == torch.float64 for p in meta.parameters())


def test_pvt_v2_triton_interpreter():
    """One converted layer on the triton backend (the interpreter) against the torch backend, float64."""
    torch.manual_seed(0)
    stock = timm.models.pvt_v2.Attention(8, num_heads=2, sr_ratio=2).double()
    layers = {b: PvtV2Attention.from_timm(copy.deepcopy(stock), variant="sum", backend=b) for b in ("triton", "torch")}
    x = torch.randn(1, 16, 8, dtype=torch.float64)
    res = {}
    for b, layer in layers.items():
        xb = x.clone().requires_grad_(True)
        out = layer(xb, (4, 4))
        out.backward(torch.ones_like(out))
        res[b] = [out.detach(), xb.grad, *(p.grad for p in layer.parameters())]
    assert_fp64_equal(res["triton"], res["torch"])


def test_pvt_v2_errors():
    with pytest.raises(TypeError, match="PyramidVisionTransformerV2"):
        convert_pvt_v2(tiny_vit())
    dropping = timm.create_model("pvt_v2_b0", pretrained=False, depths=(1, 1, 1, 1), attn_drop_rate=0.1)
    with pytest.raises(ValueError, match="attn_drop"):
        convert_pvt_v2(dropping)
    assert not any(isinstance(m, PvtV2Attention) for m in dropping.modules())      # left as it was
    with pytest.raises(ValueError, match="variant"):
        convert_pvt_v2(tiny_pvt(), variant="max")


# ---------------------------------------------------------------------------------------------- ViT


def vit_reference_sdpa(stock: nn.Module, image_hw: dict, **options) -> ReferenceSDPA:
    P, patch = stock.num_prefix_tokens, stock.patch_embed.patch_size
    for m in stock.modules():
        if type(m) is timm.layers.Attention:
            m.fused_attn = True

    def grids(nq, nk):
        grid = (image_hw["hw"][0] // patch[0], image_hw["hw"][1] // patch[1])
        assert nq == nk == P + grid[0] * grid[1]
        return grid, grid, P

    return ReferenceSDPA(grids, **options)


@pytest.mark.parametrize("variant", ["sum", "none"])
def test_vit_stock_vs_converted(monkeypatch, variant):
    stock = tiny_vit().double()
    converted = convert_vit(copy.deepcopy(stock), variant=variant, backend="torch")
    assert sum(isinstance(m, VitAttention) for m in converted.modules()) == 2
    assert converted.blocks[0].attn.num_prefix_tokens == 3          # class token + 2 register tokens
    image_hw = {}
    monkeypatch.setattr(F, "scaled_dot_product_attention", vit_reference_sdpa(stock, image_hw, variant=variant))
    for hw in ((32, 32), (48, 24)):                                   # dynamic image size: the grid follows
        image_hw["hw"] = hw
        x = torch.randn(2, 3, *hw, dtype=torch.float64)
        truth = outputs_and_grads(stock, x)
        assert_fp64_equal(outputs_and_grads(converted, x), truth)
        assert converted.blocks[1].attn.patch_grid.grid == (hw[0] // 8, hw[1] // 8)
    plain = outputs_and_grads(stock.float(), x.float())
    got = outputs_and_grads(converted.float(), x.float())
    assert_rule(got, truth, plain, torch.float32)


def test_vit_state_dict_training_and_attn_layer():
    stock = tiny_vit(dynamic_img_size=False, reg_tokens=0, qk_norm=False)
    keys = [(k, v.shape) for k, v in stock.state_dict().items()]
    model = convert_vit(copy.deepcopy(stock), backend="torch")
    assert [(k, v.shape) for k, v in model.state_dict().items()] == keys
    tiny_vit(dynamic_img_size=False, reg_tokens=0, qk_norm=False).load_state_dict(model.state_dict(), strict=True)
    # attn_layer= with the grid given: the same model as the conversion, built by timm
    layer_cls = vit_attn_layer((4, 4), num_prefix_tokens=1, backend="torch")
    built = tiny_vit(dynamic_img_size=False, reg_tokens=0, qk_norm=False, attn_layer=layer_cls)
    assert all(isinstance(b.attn, VitAttention) for b in built.blocks)
    built.load_state_dict(stock.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(built(x), model(x))
    # a few training steps
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    y = torch.tensor([0, 1])
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_vit_errors():
    model = convert_vit(tiny_vit(), backend="torch")
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="attn_mask"):
        model.forward_features(x, attn_mask=torch.ones(19, 19, dtype=torch.bool))
    with pytest.raises(TypeError, match="VisionTransformer"):
        convert_vit(tiny_pvt())
    with pytest.raises(ValueError, match="patch_drop_rate"):
        convert_vit(tiny_vit(patch_drop_rate=0.5))
    dropping = tiny_vit(attn_drop_rate=0.1)
    with pytest.raises(ValueError, match="attn_drop"):
        convert_vit(dropping)
    assert not any(isinstance(m, VitAttention) for m in dropping.modules())
    assert not dropping.patch_embed._forward_hooks


# ------------------------------------------------------------------------------------- EfficientViT


def plain_lite_mla_core(self, q, k, v):
    """timm's LiteMLA._attn without its float32 cast: the float64 truth."""
    kv = k.transpose(-1, -2) @ v
    out = q @ kv
    return out[..., :-1] / (out[..., -1:] + self.eps)


def test_efficientvit_equals_timm(monkeypatch):
    stock = tiny_efficientvit().double().eval()
    n_lite = sum(type(m) is timm.models.efficientvit_mit.LiteMLA for m in stock.modules())
    converted = convert_efficientvit(copy.deepcopy(stock), backend="torch")
    assert n_lite > 0 and sum(isinstance(m, LiteMLAAttention) for m in converted.modules()) == n_lite
    assert list(converted.state_dict()) == list(stock.state_dict())
    x = torch.randn(2, 3, 64, 48, dtype=torch.float64)
    plain = outputs_and_grads(stock.float(), x.float())                 # timm itself, float32
    with monkeypatch.context() as mp:
        mp.setattr(timm.models.efficientvit_mit.LiteMLA, "_attn", plain_lite_mla_core)
        truth = outputs_and_grads(stock.double(), x)                    # timm's math in float64
    assert_fp64_equal(outputs_and_grads(converted, x), truth)
    got = outputs_and_grads(converted.float(), x.float())
    assert_rule(got, truth, plain, torch.float32)


def test_efficientvit_autocast_and_training():
    stock = tiny_efficientvit()
    model = convert_efficientvit(copy.deepcopy(stock), backend="torch")
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = model.eval()(x), stock.eval()(x)
    assert ours.dtype == theirs.dtype
    assert rel_err(ours, theirs) < 3e-2
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    y = torch.tensor([0, 1])
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    fresh = tiny_efficientvit()
    fresh.load_state_dict(model.state_dict(), strict=True)
    with pytest.raises(TypeError, match="EfficientVit"):
        convert_efficientvit(tiny_pvt())
