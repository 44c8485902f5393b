"""The KVT layer (vicinity_attn.layers.kvt.KNNAttention) against a restatement of the authors'
``kNNAttention`` (damo-cv/KVT, KNN_VisionTransformer.py): their state dict loads with strict=True
and gives their outputs and gradients (float64)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from vicinity_attn.layers import KNNAttention


class AuthorsKNNAttention(nn.Module):
    """Their module restated (same parameter names, same forward, step by step)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0., topk=100):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.topk = topk

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        mask = torch.zeros(B, self.num_heads, N, N, device=x.device, requires_grad=False)
        index = torch.topk(attn, k=self.topk, dim=-1, largest=True)[1]
        mask.scatter_(-1, index, 1.)
        attn = torch.where(mask > 0, attn, torch.full_like(attn, float('-inf')))
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


def _their_state_dict(dim, num_heads, qkv_bias, topk):
    theirs = AuthorsKNNAttention(dim, num_heads, qkv_bias=qkv_bias, topk=topk).double()
    with torch.no_grad():   # weights large enough that the scores spread and the mask matters
        theirs.qkv.weight.normal_(0, dim ** -0.5 * 2)
    return theirs


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("dim, num_heads, qkv_bias, topk, N", [(48, 4, False, 7, 17), (30, 3, True, 17, 17)])
def test_matches_authors_module(backend, dim, num_heads, qkv_bias, topk, N):
    theirs = _their_state_dict(dim, num_heads, qkv_bias, topk)
    ours = KNNAttention(dim, num_heads, qkv_bias=qkv_bias, topk=topk, backend=backend).double()
    state = {name: t.clone() for name, t in theirs.state_dict().items()}   # a restated copy
    assert set(state) == set(ours.state_dict())
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, N, dim, dtype=torch.float64)
    x_ours, x_theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_ours, out_theirs = ours(x_ours), theirs(x_theirs)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-10, atol=1e-12)
    dy = torch.randn_like(out_theirs)
    out_ours.backward(dy)
    out_theirs.backward(dy)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-10, atol=1e-12)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, dict(theirs.named_parameters())[name].grad, rtol=1e-10, atol=1e-12)


def test_attention_dropout_in_training_matches_theirs():
    """attn_drop > 0 in training: the probabilities are dropped as theirs (same RNG stream)."""
    theirs = AuthorsKNNAttention(16, 2, topk=5, attn_drop=0.3).double()
    ours = KNNAttention(16, 2, topk=5, attn_drop=0.3).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    torch.manual_seed(1)
    want = theirs(x)
    torch.manual_seed(1)
    torch.testing.assert_close(ours(x), want, rtol=1e-10, atol=1e-12)


def test_qk_scale_and_repr():
    layer = KNNAttention(32, 4, qk_scale=0.5, topk=3)
    assert layer.scale == 0.5 and "topk=3" in repr(layer)
    assert KNNAttention(32, 4, qk_scale=None).scale == 8 ** -0.5


@pytest.mark.parametrize("kwargs, match", [
    (dict(dim=30, num_heads=4), "divisible"), (dict(dim=32, topk=0), "topk"),
    (dict(dim=32, backend="gpu"), "backend"), (dict(dim=0), "dim"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        KNNAttention(**kwargs)


def test_forward_errors():
    layer = KNNAttention(16, 2, topk=10)
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(2, 9, 8))
    with pytest.raises(ValueError, match="topk"):
        layer(torch.randn(2, 9, 16))     # 9 tokens < topk


def test_compile_inductor_fullgraph():
    """The layer (torch backend) under torch.compile(fullgraph=True) with inductor matches eager."""
    torch._dynamo.reset()
    layer = KNNAttention(16, 2, topk=6, backend="torch")
    x = torch.randn(2, 10, 16)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)
