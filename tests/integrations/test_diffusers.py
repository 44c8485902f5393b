"""The diffusers integration against the real diffusers (tests/run_integrations.sh runs it in a side
environment; elsewhere it skips): a tiny SanaTransformer2DModel with random weights, stock versus converted.

variant="none" is Sana's own attention: stock (SanaLinearAttnProcessor2_0) against converted, outputs and
every parameter gradient, in float64 to rounding against Sana's formula in float64 (the stock processor
rounds to float32 inside), in float32 by the tolerance rule, and in float16 as diffusers handles it (the
clip to +-65504). The vicinity variants on the latent's token grid against the quadratic reference op on
the grid the test knows (a non-square one, so that height and width cannot be swapped unnoticed).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.helpers import FLOOR, rel_err
from tests.integrations import assert_fp64_equal, assert_rule

diffusers = pytest.importorskip("diffusers",
                                reason="diffusers is tested in the integrations leg: bash tests/run_integrations.sh")

from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0  # noqa: E402

from vicinity_attn.integrations.diffusers import SanaVicinityAttnProcessor, use_vicinity_attention  # noqa: E402

LATENT = (8, 12)      # latent height, width; patch 2 -> a 4 x 6 token grid
GRID = (4, 6)


def tiny_sana(**kw) -> nn.Module:
    torch.manual_seed(0)
    args = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12,
                sample_size=8, patch_size=2)
    return diffusers.SanaTransformer2DModel(**{**args, **kw})


def inputs(dtype=torch.float64, batch=2):
    gen = torch.Generator().manual_seed(2)
    latents = torch.randn(batch, 4, *LATENT, generator=gen, dtype=torch.float64).to(dtype)
    captions = torch.randn(batch, 5, 12, generator=gen, dtype=torch.float64).to(dtype)
    return latents, captions, torch.tensor([10, 500][:batch])


def outputs_and_grads(model: nn.Module, dtype) -> list[torch.Tensor]:
    latents, captions, t = inputs(dtype)
    model.zero_grad(set_to_none=True)
    out = model(latents, encoder_hidden_states=captions, timestep=t).sample
    gen = torch.Generator().manual_seed(1)
    out.backward(torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype))
    return [out.detach(), *(p.grad.detach() for _, p in model.named_parameters() if p.grad is not None)]


class PlainSana:
    """Sana's linear attention formula in the input's dtype (no float32 cast): the float64 truth."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        q = torch.relu(attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1)).transpose(1, 2))   # [B, h, N, D]
        k = torch.relu(attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1)).transpose(1, 2))
        v = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        out = q @ (k.transpose(-1, -2) @ v)
        out = (out[..., :-1] / (out[..., -1:] + 1e-15)).transpose(1, 2).flatten(2)
        return attn.to_out[1](attn.to_out[0](out))


def set_processors(model: nn.Module, make) -> None:
    for block in model.transformer_blocks:
        block.attn1.set_processor(make())


def test_sana_none_equals_diffusers():
    stock = tiny_sana().double()
    assert all(isinstance(b.attn1.processor, SanaLinearAttnProcessor2_0) for b in stock.transformer_blocks)
    converted = use_vicinity_attention(copy.deepcopy(stock), backend="torch")
    assert all(isinstance(b.attn1.processor, SanaVicinityAttnProcessor) for b in converted.transformer_blocks)
    truth_model = copy.deepcopy(stock)
    set_processors(truth_model, PlainSana)
    truth = outputs_and_grads(truth_model, torch.float64)
    assert_fp64_equal(outputs_and_grads(converted, torch.float64), truth)
    plain = outputs_and_grads(stock.float(), torch.float32)          # diffusers' processor, float32
    got = outputs_and_grads(converted.float(), torch.float32)
    assert_rule(got, truth, plain, torch.float32)


def test_sana_float16_handling():
    """One linear-attention layer in float16 (as diffusers runs it): the float32 core, and the clip that keeps
    an overflowing output at +-65504 instead of inf, as diffusers' processor does."""
    attn = tiny_sana().transformer_blocks[0].attn1.half()
    x = torch.randn(2, 24, 16, dtype=torch.float16)
    ours, theirs = SanaVicinityAttnProcessor(backend="torch"), SanaLinearAttnProcessor2_0()
    truth = PlainSana()(copy.deepcopy(attn).double(), x.double())
    got, plain = ours(attn, x), theirs(attn, x)
    assert got.dtype == plain.dtype == torch.float16
    assert rel_err(got, truth) <= 2 * rel_err(plain, truth) + FLOOR[torch.float16]
    with torch.no_grad():
        attn.to_v.weight.mul_(10.0)                  # attention outputs x10, the projection's x1e5: past 65504
        attn.to_out[0].weight.mul_(1e5)
    got, plain = ours(attn, x), theirs(attn, x)
    assert torch.isfinite(plain).all() and plain.abs().max() == 65504
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, plain, atol=0, rtol=1e-2)


@pytest.mark.parametrize("variant", ["sum", "product"])
def test_sana_vicinity_variants_on_the_latent_grid(variant):
    stock = tiny_sana().double()
    converted = use_vicinity_attention(copy.deepcopy(stock), variant=variant, backend="torch")
    reference = copy.deepcopy(stock)
    set_processors(reference, lambda: SanaVicinityAttnProcessor(variant, grid=GRID, backend="reference"))
    got, ref = outputs_and_grads(converted, torch.float64), outputs_and_grads(reference, torch.float64)
    assert converted.transformer_blocks[1].attn1.processor.grid == GRID
    assert_fp64_equal(got, ref)
    # gradient checkpointing re-runs the blocks (and the hook): same gradients
    converted.enable_gradient_checkpointing()
    converted.train()
    assert_fp64_equal(outputs_and_grads(converted, torch.float64), ref)


def test_sana_state_dict_and_training_step():
    stock = tiny_sana()
    before = {k: v.clone() for k, v in stock.state_dict().items()}
    model = use_vicinity_attention(stock, variant="sum", backend="torch")
    assert model is stock and list(model.state_dict()) == list(before)
    tiny_sana().load_state_dict(model.state_dict(), strict=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    latents, captions, t = inputs(torch.float32)
    target = torch.randn_like(latents)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(latents, encoder_hidden_states=captions, timestep=t).sample, target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    # converting again replaces the processors and their hooks (one hook per block)
    use_vicinity_attention(model, variant="product", backend="torch")
    assert all(len(b._forward_pre_hooks) == 1 for b in model.transformer_blocks)


def test_sana_errors():
    attn = tiny_sana().transformer_blocks[0].attn1
    x = torch.randn(1, 24, 16)
    with pytest.raises(ValueError, match="attention_mask"):
        SanaVicinityAttnProcessor()(attn, x, attention_mask=torch.ones(1, 24))
    with pytest.raises(ValueError, match="grid"):
        SanaVicinityAttnProcessor("sum")(attn, x)
    with pytest.raises(ValueError, match="24 tokens"):
        SanaVicinityAttnProcessor("sum", grid=(5, 5))(attn, x)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        SanaVicinityAttnProcessor("sum", grid=(4, 6))(attn, x, encoder_hidden_states=x)
    with pytest.raises(TypeError, match="SanaTransformer2DModel"):
        use_vicinity_attention(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="variant"):
        use_vicinity_attention(tiny_sana(), variant="max")
