"""``KNNAttention``: the attention layer of the authors' KVT (k-NN Vision Transformer).

Reproduces ``kNNAttention`` of the authors' release (Wang et al., "KVT: k-NN Attention for Boosting
Vision Transformers"; code damo-cv/KVT, ``KNN_VisionTransformer.py``) under their parameter names,
so their checkpoints load with ``strict=True`` and give their outputs:

- ``qkv``: ``Linear(dim, 3 * dim, bias=qkv_bias)``, split as (3, heads, head_dim) per token;
- scores ``scale * q . k`` with ``scale = qk_scale or head_dim ** -0.5`` (their expression: a
  ``qk_scale`` of 0 or None both mean the default);
- each query keeps its ``topk`` largest scores, softmax over them, ``attn_drop`` on the
  probabilities, then ``proj`` (``Linear(dim, dim)`` with bias) and ``proj_drop``.

The attention runs through :func:`vicinity_attn.knn_attention` (memory-bounded: no N x N scores,
mask or indices; any backend). Differences from theirs: on exactly tied scores at a row's threshold
every tied key is kept (theirs keeps an arbitrary ``topk`` of them; see ``knn_attention``); and
attention dropout needs the probabilities, so in training mode with ``attn_drop > 0`` the layer
computes them densely as they do (their formulation, O(N^2) memory).
"""
from __future__ import annotations

import torch
from torch import nn

from ..common.validation import BACKENDS, check_option, check_positive_int, check_topk
from ..functional import knn_attention
from ..knn.reference import knn_probabilities


class KNNAttention(nn.Module):
    """The authors' k-NN attention layer, checkpoint-compatible (state-dict keys ``qkv.*``, ``proj.*``).

    ``forward(x)``: x [B, N, dim] -> [B, N, dim], x's dtype (N >= topk).

    Args:
        dim: channels; must be divisible by ``num_heads``.
        num_heads: attention heads.
        qkv_bias: bias in the ``qkv`` projection.
        qk_scale: score scale; None (or 0, as in their code) means ``head_dim ** -0.5``.
        attn_drop: dropout on the attention probabilities (training only; see the module docstring).
        proj_drop: dropout after ``proj``.
        topk: keys kept per query.
        backend: backend of :func:`vicinity_attn.knn_attention`.
        device, dtype: factory arguments, as for ``torch.nn.Linear`` (every parameter created there).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None,
                 attn_drop: float = 0., proj_drop: float = 0., topk: int = 100, backend: str = "auto", *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_positive_int(dim, "dim")
        check_positive_int(num_heads, "num_heads")
        check_positive_int(topk, "topk")
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads, got dim = {dim}, num_heads = {num_heads}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, device=device, dtype=dtype)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, device=device, dtype=dtype)
        self.proj_drop = nn.Dropout(proj_drop)
        self.topk = topk
        self.backend = check_option(backend, "backend", BACKENDS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.qkv.in_features:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a 3-d tensor [B, N, {self.qkv.in_features}], got {got}")
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.unbind(2)                                   # [B, N, heads, head_dim] each
        if self.training and self.attn_drop.p > 0:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            attn = self.attn_drop(knn_probabilities(q, k, check_topk(self.topk, N), self.scale))
            out = (attn @ v).transpose(1, 2)
        else:
            out = knn_attention(q, k, v, self.topk, scale=self.scale, layout="bnhd", backend=self.backend)
        return self.proj_drop(self.proj(out.reshape(B, N, C)))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, topk={self.topk}, scale={self.scale:.4g}, backend={self.backend!r}"
