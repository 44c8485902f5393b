"""L2ViT's layers (Zheng et al., "The Linear Attention Resurrection in Vision Transformer",
arXiv 2501.16182), checkpoint-compatible with the authors' released code
(ChuanyangZheng/L2ViT, ``classification/models/l2vit.py``).

- :class:`LinearAttention` ("enhanced linear attention"): one ``qkv`` Linear(dim, 3 dim), relu
  features, a per-head learnable ``temperature`` [heads, 1, 1] (init ``qk_scale`` or head_dim^-0.5)
  on the output, the normaliser clamped from below at 100 with no eps, then ``proj``:

      o_i = t_h * phi(q_i)^T (sum_j phi(k_j) v_j^T) / max(phi(q_i) . sum_j phi(k_j), 100)

  This is :func:`vicinity_attn.vicinity_attention` with ``variant="none"``, ``den_floor=100``,
  ``eps=0`` (any backend; the fused kernels on a GPU), times the temperature.
- :class:`LCM` (local concentration module): depthwise ``conv1`` (7 x 7), GELU, BatchNorm2d ``bn``,
  depthwise ``conv2`` (7 x 7), on the token grid.
- :class:`LGABlock` (linear global attention block): x = CPE(x) (depthwise 3 x 3 conv, residual);
  x = x + attn(LN1(x)); with ``enhanced``, x = x + LCM(LN3(x)); x = x + MLP(LN2(x)).

Parameter names, shapes and registration order are theirs (``state_dict()`` lists their keys in
their order), so their checkpoints load with ``strict=True``. Differences from their code, none of
which changes a result: ``forward(x, H, W)`` returns x (theirs take ``size = (H, W)`` and the block
returns ``(x, size)``); the attention accumulates in float32 for half-precision inputs (theirs runs
in the input dtype); ``attn_drop`` is accepted and, as in theirs, never applied (their forward
computes k^T v first and has no attention matrix to drop from).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..common.validation import BACKENDS, check_layer_input, check_option, check_positive_int
from ..functional import vicinity_attention

DEN_FLOOR = 100.0   # their torch.clamp(q @ k_sum, 1e2)

# Keyword arguments their model builder passes to every block and their blocks ignore; accepted (and
# ignored) here too so that their model code runs unchanged. Anything else is an error.
_IGNORED_BLOCK_KWARGS = frozenset({"layer_scale_init_value", "cpe", "sub_cpe", "cpe_kernel", "ffn_conv",
                                   "rffn_conv", "token_mixer", "channel_mixer", "norm", "index"})


def _init_like_theirs(module: nn.Module) -> None:
    """Their model's ``_init_weights``: truncated-normal (std 0.02) Conv2d and Linear weights, zero biases
    (LayerNorm / BatchNorm2d keep PyTorch's defaults)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _to_grid(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """[B, H*W, C] (row-major tokens) -> [B, C, H, W]."""
    B, N, C = x.shape
    return x.transpose(1, 2).reshape(B, C, H, W)


class LinearAttention(nn.Module):
    """L2ViT's enhanced linear attention, checkpoint-compatible (module docstring).

    ``forward(x)``: x [B, N, dim] (any N; no grid is needed: no locality) -> [B, N, dim], x's dtype.

    Args:
        dim: channels; must be divisible by ``num_heads``.
        num_heads: heads.
        qkv_bias: bias in ``qkv``.
        qk_scale: initial temperature (default head_dim^-0.5).
        attn_drop: accepted for compatibility; unused, as in theirs.
        proj_drop: dropout after ``proj``.
        backend: as in :func:`vicinity_attn.vicinity_attention`.
        device, dtype: factory arguments, as for ``torch.nn.Linear`` (every parameter created there).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, backend: str = "auto", *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_positive_int(dim, "dim")
        check_positive_int(num_heads, "num_heads")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim = dim
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.backend = check_option(backend, "backend", BACKENDS)
        # Registration order follows theirs (state_dict keys: temperature, qkv, proj).
        factory = dict(device=device, dtype=dtype)
        self.temperature = nn.Parameter(torch.full((num_heads, 1, 1), self.scale, **factory))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **factory)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **factory)
        self.proj_drop = nn.Dropout(proj_drop)
        _init_like_theirs(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, dim] -> [B, N, dim]."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[2] != self.dim:
            raise ValueError(f"x must be a 3-d tensor [B, N, {self.dim}] (dim), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        B, N, C = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).view(B, N, 3, heads, C // heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]                  # [B, N, heads, d] views
        out = vicinity_attention(q, k, v, N, variant="none", feature_map="relu", eps=0.0, den_floor=DEN_FLOOR,
                                 layout="bnhd", backend=self.backend)
        out = out * self.temperature.view(heads, 1).to(out.dtype)
        return self.proj_drop(self.proj(out.reshape(B, N, C)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, backend={self.backend!r}"


class LCM(nn.Module):
    """L2ViT's local concentration module: depthwise conv, activation, BatchNorm2d, depthwise conv.

    ``forward(x, H, W)``: x [B, H*W, in_features] (row-major tokens) -> [B, H*W, out_features].
    ``hidden_features`` and ``drop`` are accepted and unused, as in theirs; the depthwise convs
    (groups = out_features) need in_features divisible by out_features (theirs: equal).
    """

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: Callable[[], nn.Module] = nn.GELU, drop: float = 0.0, kernel_size: int = 7) -> None:
        super().__init__()
        out_features = out_features or in_features
        check_positive_int(in_features, "in_features")
        check_positive_int(kernel_size, "kernel_size")
        if in_features % out_features:
            raise ValueError(f"in_features ({in_features}) must be divisible by out_features ({out_features}): "
                             "the convolutions are grouped by out_features")
        self.in_features = in_features
        padding = kernel_size // 2
        self.conv1 = nn.Conv2d(in_features, out_features, kernel_size=kernel_size, padding=padding,
                               groups=out_features)
        self.act = act_layer()
        self.bn = nn.BatchNorm2d(in_features)
        self.conv2 = nn.Conv2d(in_features, out_features, kernel_size=kernel_size, padding=padding,
                               groups=out_features)
        _init_like_theirs(self)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """x [B, H*W, in_features] -> [B, H*W, out_features]."""
        check_layer_input(x, H, W, self.in_features, "in_features")
        y = self.conv2(self.bn(self.act(self.conv1(_to_grid(x, H, W)))))
        return y.flatten(2).transpose(1, 2)


class CPE(nn.Module):
    """Their conditional position encoding: x + act(depthwise k x k conv of the token grid) (``proj``)."""

    def __init__(self, dim: int, k: int = 3, act: bool = False) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim)
        self.activation = nn.GELU() if act else nn.Identity()

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return x + self.activation(self.proj(_to_grid(x, H, W)).flatten(2).transpose(1, 2))


class Mlp(nn.Module):
    """Their feed-forward: ``fc1``, activation, ``fc2`` (``drop`` accepted and unused, as in theirs)."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: Callable[[], nn.Module] = nn.GELU, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features or in_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features or in_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: in training, zeroes a sample's residual branch with probability ``p`` and scales
    the kept ones by 1 / (1 - p); the identity in eval mode."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {p!r}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class LGABlock(nn.Module):
    """L2ViT's linear global attention block, checkpoint-compatible (module docstring).

    ``forward(x, H, W)``: x [B, H*W, dim] (row-major tokens) -> [B, H*W, dim].

    Args:
        dim, num_heads: channels and heads of :class:`LinearAttention`.
        window_size: accepted for compatibility (their local-window blocks use it; this one does not).
        mlp_ratio: MLP hidden width = int(dim * mlp_ratio).
        qkv_bias: bias in the attention's ``qkv`` (theirs: True here).
        drop_path: stochastic-depth rate of the residual branches.
        act_layer, norm_layer: activation and norm constructors (GELU, LayerNorm).
        ffn: with the MLP branch (``norm2``, ``mlp``).
        cpe_act: GELU after the CPE conv.
        enhanced: with the LCM branch (``norm3``, ``local_mp``); their L2ViT models use True.
        backend: as in :func:`vicinity_attn.vicinity_attention`.
        **kwargs: the options their model builder passes to every block and blocks ignore
            (layer_scale_init_value, cpe, sub_cpe, ...) are accepted and ignored; others raise TypeError.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path: float = 0.0, act_layer: Callable[[], nn.Module] = nn.GELU,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, ffn: bool = True, cpe_act: bool = False,
                 enhanced: bool = False, backend: str = "auto", **kwargs) -> None:
        super().__init__()
        unknown = sorted(set(kwargs) - _IGNORED_BLOCK_KWARGS)
        if unknown:
            raise TypeError(f"LGABlock got unexpected keyword arguments {unknown}")
        self.dim = dim
        self.ffn = ffn
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        # Registration order follows theirs: cpe, norm1, attn, (norm2, mlp), (norm3, local_mp).
        self.cpe = nn.ModuleList([CPE(dim=dim, k=3, act=cpe_act)])
        self.norm1 = norm_layer(dim)
        self.attn = LinearAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, backend=backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        if ffn:
            self.norm2 = norm_layer(dim)
            self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer)
        self.local_mp = None
        if enhanced:
            self.norm3 = norm_layer(dim)
            self.local_mp = LCM(in_features=dim, act_layer=act_layer)
        _init_like_theirs(self)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """x [B, H*W, dim] -> [B, H*W, dim]."""
        check_layer_input(x, H, W, self.dim, "dim")
        x = self.cpe[0](x, H, W)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        if self.local_mp is not None:
            x = x + self.drop_path(self.local_mp(self.norm3(x), H, W))
        if self.ffn:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, enhanced={self.local_mp is not None}"
