"""The integrations without their libraries (the main leg): importing vicinity_attn, or the integration
modules, imports neither timm nor diffusers; the conversions say what to install; the layers, which need
only torch, compute what their docstrings say."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, close_fp64
from vicinity_attn import vicinity_attention
from vicinity_attn.integrations.timm import PvtV2Attention, VitAttention


def test_importing_imports_no_library():
    code = ("import sys, vicinity_attn, vicinity_attn.layers, vicinity_attn.integrations, "
            "vicinity_attn.integrations.timm, vicinity_attn.integrations.diffusers\n"
            "loaded = sorted(m for m in ('timm', 'diffusers', 'torchvision', 'transformers') if m in sys.modules)\n"
            "assert not loaded, loaded\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed here")
def test_conversion_without_timm_says_what_to_install():
    from vicinity_attn.integrations.timm import convert_pvt_v2
    with pytest.raises(ImportError, match="pip install timm"):
        convert_pvt_v2(torch.nn.Linear(2, 2))


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is not None, reason="diffusers is installed here")
def test_conversion_without_diffusers_says_what_to_install():
    from vicinity_attn.integrations.diffusers import use_vicinity_attention
    with pytest.raises(ImportError, match="pip install diffusers"):
        use_vicinity_attention(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("sr_ratio, linear_attn", [(2, False), (1, True)])
def test_pvt_v2_layer_alone(sr_ratio, linear_attn):
    """PvtV2Attention (no timm needed) in float64 against its definition written out with the reference op."""
    layer = PvtV2Attention(8, num_heads=2, sr_ratio=sr_ratio, linear_attn=linear_attn, dtype=torch.float64,
                           variant="product", backend="torch")
    H, W = 6, 4
    x = torch.randn(2, H * W, 8, dtype=torch.float64)
    image = x.transpose(1, 2).reshape(2, 8, H, W)
    if linear_attn:
        image = layer.pool(image)
    reduced = layer.sr(image)
    kv_in = layer.norm(reduced.flatten(2).transpose(1, 2))
    kv_in = layer.act(kv_in) if linear_attn else kv_in
    q = layer.q(x).view(2, H * W, 2, 4).transpose(1, 2)
    k, v = layer.kv(kv_in).view(2, -1, 2, 2, 4).permute(2, 0, 3, 1, 4)
    ref = vicinity_attention(q, k, v, (H, W), tuple(reduced.shape[-2:]), variant="product", backend="reference")
    ref = layer.proj(ref.transpose(1, 2).reshape(2, H * W, 8))
    close_fp64(layer(x, (H, W)), ref, "PvtV2Attention")


def test_layers_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match="attn_drop"):
        PvtV2Attention(8, num_heads=2, attn_drop=0.1)
    with pytest.raises(TypeError, match="'windows'"):
        PvtV2Attention(8, num_heads=2, windows=3)
    with pytest.raises(ValueError, match="variant"):
        VitAttention(8, num_heads=2, variant="max")
    layer = VitAttention(8, num_heads=2, grid=(2, 3), num_prefix_tokens=1)
    x = torch.randn(1, 7, 8)
    assert layer(x).shape == (1, 7, 8)
    with pytest.raises(ValueError, match="attn_mask"):
        layer(x, attn_mask=torch.ones(7, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="is_causal"):
        layer(x, is_causal=True)
    with pytest.raises(ValueError, match="8 tokens"):
        layer(torch.randn(1, 8, 8))
    with pytest.raises(ValueError, match="no grid"):
        VitAttention(8, num_heads=2)(x)
