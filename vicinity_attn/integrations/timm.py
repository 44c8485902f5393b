"""timm models with vicinity attention: PVT v2, VisionTransformer and EfficientViT (MIT).

Three conversions, each in place (the model's own parameter tensors are kept, so its state dict, its
optimizer's references and its hooks stay valid) and each returning the model:

- :func:`convert_pvt_v2` replaces every ``timm.models.pvt_v2.Attention`` of a PVT v2 with
  :class:`PvtV2Attention`: the same constructor, parameter names and ``forward(x, feat_size)``,
  computing vicinity attention between the query grid (H, W) and the key grid (the ``sr`` Conv2d's
  output grid, (H // sr_ratio, W // sr_ratio); 7 x 7 for ``linear_attn``, whose keys come from an
  adaptive 7 x 7 average pool, a 1 x 1 conv, LayerNorm and GELU).
- :func:`convert_vit` replaces every ``timm.layers.Attention`` of a ``VisionTransformer`` with
  :class:`VitAttention` (``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``gate``, ``proj`` kept), the grid
  read from the patch embedding at every forward (dynamic image sizes followed) and the class /
  register tokens from ``model.num_prefix_tokens``. :func:`vit_attn_layer` gives the layer as a class
  for timm's ``attn_layer=`` argument where the grid is known.
- :func:`convert_efficientvit` computes the core of every ``LiteMLA`` (EfficientViT's multi-scale
  linear attention) with this op: relu features, "pad v with ones" normaliser and timm's ``eps``, in
  float32, is exactly ``vicinity_attention(variant="none", feature_map="relu", eps=lite_mla.eps)``.

The options of the first two (and ``variant`` / ``backend`` of the third) are the op's:
``variant``, ``feature_map``, ``eps``, ``den_floor``, ``clamp``, ``backend`` (see
:func:`vicinity_attn.vicinity_attention`). The layers need only torch; the conversions import timm
when called. Softmax attention and vicinity attention are different functions: a converted PVT or
ViT computes another model (to train or fine-tune), while ``convert_efficientvit`` with the default
``variant="none"`` computes timm's own output.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..common.custom_ops import autocast_disabled
from ..common.validation import check_prefix, normalize_grid
from ..functional import vicinity_attention
from ._common import check_no_attn_drop, op_options, options_repr, require

__all__ = ["PvtV2Attention", "VitAttention", "LiteMLAAttention", "convert_pvt_v2", "convert_vit",
           "convert_efficientvit", "vit_attn_layer"]


def _timm():
    return require("timm", "vicinity_attn.integrations.timm's conversions")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _adopt(new: nn.Module, old: nn.Module, names: Sequence[str]) -> nn.Module:
    """Give ``new`` the submodules ``names`` of ``old`` (the very modules: parameters, buffers and hooks
    kept), and old's training mode. ``new`` was built on the meta device, so nothing was allocated."""
    for n in names:
        setattr(new, n, getattr(old, n))
    new.train(old.training)
    return new


# ----------------------------------------------------------------------------------------------- PVT v2


class PvtV2Attention(nn.Module):
    """PVT v2's attention (timm's ``pvt_v2.Attention``) computing vicinity attention.

    Same constructor, parameters and registration order as timm's: ``q`` Linear(dim, dim), ``kv``
    Linear(dim, 2 dim), ``proj``; with ``sr_ratio > 1`` ``sr`` Conv2d(kernel = stride = sr_ratio) and
    ``norm`` LayerNorm; with ``linear_attn`` ``pool`` (AdaptiveAvgPool2d(7)), ``sr`` (1 x 1 Conv2d),
    ``norm`` and ``act`` (GELU). Its state dict is timm's, key for key.

    ``forward(x, feat_size)``: x [B, H*W, dim] (row-major tokens), feat_size (H, W) -> [B, H*W, dim],
    x's dtype. Queries live on (H, W); keys and values on the reduced grid the ``sr`` / ``pool`` path
    outputs ((H // sr_ratio, W // sr_ratio), or (7, 7)), or on (H, W) without reduction.

    Args:
        dim, num_heads, sr_ratio, linear_attn, qkv_bias, proj_drop: as timm's.
        attn_drop: must be 0 (linear attention has no attention matrix to drop from).
        device, dtype: factory arguments of the parameters (meta works).
        variant, feature_map, eps, den_floor, clamp, backend: the op's options
            (:func:`vicinity_attn.vicinity_attention`); default the paper's "sum", relu, eps 1e-4.
    """

    def __init__(self, dim: int, num_heads: int = 8, sr_ratio: int = 1, linear_attn: bool = False,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, **options: Any) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        dd = {"device": device, "dtype": dtype}
        self.options = op_options(options)
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sr_ratio = sr_ratio
        self.linear_attn = linear_attn
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(check_no_attn_drop(attn_drop, "PvtV2Attention"))
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.pool = self.sr = self.norm = self.act = None
        if linear_attn:
            self.pool = nn.AdaptiveAvgPool2d(7)
            self.sr = nn.Conv2d(dim, dim, kernel_size=1, stride=1, **dd)
            self.norm = nn.LayerNorm(dim, **dd)
            self.act = nn.GELU()
        elif sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio, **dd)
            self.norm = nn.LayerNorm(dim, **dd)

    @classmethod
    def from_timm(cls, attn: nn.Module, **options: Any) -> PvtV2Attention:
        """A PvtV2Attention holding the very submodules of timm's ``pvt_v2.Attention`` ``attn``."""
        linear_attn = attn.pool is not None
        sr_ratio = attn.sr.kernel_size[0] if attn.sr is not None and not linear_attn else 1
        new = cls(attn.dim, attn.num_heads, sr_ratio=sr_ratio, linear_attn=linear_attn,
                  qkv_bias=attn.q.bias is not None, attn_drop=attn.attn_drop.p, proj_drop=attn.proj_drop.p,
                  device="meta", **options)
        names = ["q", "kv", "attn_drop", "proj", "proj_drop"]
        names += [n for n in ("pool", "sr", "norm", "act") if getattr(attn, n) is not None]
        return _adopt(new, attn, names)

    def forward(self, x: torch.Tensor, feat_size: Sequence[int]) -> torch.Tensor:
        """x [B, H*W, dim], feat_size (H, W) -> [B, H*W, dim]."""
        B, N, C = x.shape
        H, W = feat_size
        if N != H * W or C != self.dim:
            raise ValueError(f"x must be [B, H*W, dim] = [B, {H}*{W}, {self.dim}] for feat_size {(H, W)}, "
                             f"got {tuple(x.shape)}")
        heads, hd = self.num_heads, self.head_dim
        q = self.q(x).view(B, N, heads, hd)
        kv_grid: tuple[int, ...] = (H, W)
        if self.sr is not None:
            image = x.transpose(1, 2).reshape(B, C, H, W)
            if self.pool is not None:
                image = self.pool(image)
            image = self.sr(image)
            kv_grid = tuple(image.shape[-2:])
            x = self.norm(image.flatten(2).transpose(1, 2))
            if self.act is not None:
                x = self.act(x)
        kv = self.kv(x).view(B, -1, 2, heads, hd)
        out = vicinity_attention(q, kv[:, :, 0], kv[:, :, 1], (H, W), kv_grid, layout="bnhd", **self.options)
        return self.proj_drop(self.proj(out.reshape(B, N, C)))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, sr_ratio={self.sr_ratio}, "
                f"linear_attn={self.linear_attn}, {options_repr(self.options)}")


def convert_pvt_v2(model: nn.Module, **options: Any) -> nn.Module:
    """Replace every attention of a timm PVT v2 (``PyramidVisionTransformerV2``) with
    :class:`PvtV2Attention`, in place, keeping its parameters (the same tensors) and their names: the
    state dict before and after is the same, and either loads into the other with ``strict=True``.

    Args:
        model: a ``timm.models.pvt_v2.PyramidVisionTransformerV2`` (e.g. ``timm.create_model("pvt_v2_b0")``).
        **options: the op's ``variant``, ``feature_map``, ``eps``, ``den_floor``, ``clamp``, ``backend``.

    Returns:
        model, converted. TypeError for another model type; ValueError for a model built with
        attention dropout (``attn_drop_rate > 0``).
    """
    pvt_v2 = require("timm", "convert_pvt_v2").models.pvt_v2
    if not isinstance(model, pvt_v2.PyramidVisionTransformerV2):
        raise TypeError(f"convert_pvt_v2: model must be a timm PyramidVisionTransformerV2 (timm.create_model("
                        f"'pvt_v2_b0') etc.), got {type(model).__name__}")
    op_options(options)   # the options' errors before anything changes
    # every replacement built before any is installed: an error leaves the model as it was
    new = [(n, PvtV2Attention.from_timm(m, **options)) for n, m in model.named_modules() if type(m) is pvt_v2.Attention]
    for name, layer in new:
        _replace(model, name, layer)
    return model


# ------------------------------------------------------------------------------------- VisionTransformer


class PatchGrid:
    """The token grid of a VisionTransformer's last patch embedding, shared by its converted attention
    layers: a forward hook on ``model.patch_embed`` (``__call__``) records the grid of every image batch
    it embeds. An object rather than a closure, so that ``copy.deepcopy(model)`` copies the hook and the
    layers' reference to it consistently."""

    def __init__(self, grid: Sequence[int] | None = None) -> None:
        self.grid = tuple(grid) if grid is not None else None

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if output.dim() == 4:   # dynamic image sizes: NHWC (timm's default there), or NCHW
            fmt = str(getattr(module, "output_fmt", "NHWC"))
            self.grid = tuple(output.shape[2:4]) if fmt.endswith("NCHW") else tuple(output.shape[1:3])
        elif hasattr(module, "dynamic_feat_size") and args and isinstance(args[0], torch.Tensor):
            self.grid = tuple(module.dynamic_feat_size(tuple(args[0].shape[-2:])))
        else:
            self.grid = tuple(module.grid_size)


class VitAttention(nn.Module):
    """timm's ViT attention (``timm.layers.Attention``) computing vicinity attention on a token grid.

    Same constructor arguments, parameters and registration order as timm's: ``qkv``, ``q_norm``,
    ``k_norm``, ``norm`` (``scale_norm``), ``gate`` (``gated``), ``proj``; its state dict is timm's.
    ``forward(x, attn_mask=None, is_causal=False)``: x [B, num_prefix_tokens + H*W, dim] -> [B, N, dim_out],
    x's dtype. ``attn_mask`` and ``is_causal`` cannot be honoured by linear vicinity attention: anything
    but None / False raises a ValueError naming the argument.

    The grid (H, W) is ``grid`` when given; else the one :func:`convert_vit` tracks on the model's patch
    embedding (``self.patch_grid``, a :class:`PatchGrid`), which follows dynamic image sizes.
    ``num_prefix_tokens`` class / register tokens lead the sequence (they weigh 1 against every token).

    Args:
        dim, num_heads, attn_head_dim, dim_out, qkv_bias, qk_norm, scale_norm, proj_bias, gated,
            proj_drop, norm_layer, device, dtype: as timm's.
        attn_drop: must be 0 (linear attention has no attention matrix to drop from).
        grid: the token grid (H, W), or None to take it from the patch embedding (:func:`convert_vit`).
        num_prefix_tokens: class / register tokens in front of the grid tokens.
        variant, feature_map, eps, den_floor, clamp, backend: the op's options.
    """

    def __init__(self, dim: int, num_heads: int = 8, attn_head_dim: int | None = None, dim_out: int | None = None,
                 qkv_bias: bool = False, qk_norm: bool = False, scale_norm: bool = False, proj_bias: bool = True,
                 gated: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 norm_layer: Callable[..., nn.Module] | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, *, grid: Sequence[int] | None = None, num_prefix_tokens: int = 0,
                 **options: Any) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        dim_out = dim_out or dim
        head_dim = attn_head_dim
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
            head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("norm_layer must be given with qk_norm or scale_norm")
        self.options = op_options(options)
        self.grid = normalize_grid(grid, "grid") if grid is not None else None
        self.num_prefix_tokens = check_prefix(num_prefix_tokens)
        self.patch_grid: PatchGrid | None = None
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(check_no_attn_drop(attn_drop, "VitAttention"))
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_timm(cls, attn: nn.Module, *, num_prefix_tokens: int = 0, grid: Sequence[int] | None = None,
                  **options: Any) -> VitAttention:
        """A VitAttention holding the very submodules of timm's ``Attention`` ``attn``."""
        new = cls(attn.qkv.in_features, attn.num_heads, attn_head_dim=attn.head_dim, dim_out=attn.proj.out_features,
                  qkv_bias=attn.qkv.bias is not None, proj_bias=attn.proj.bias is not None,
                  gated=getattr(attn, "gate", None) is not None, attn_drop=attn.attn_drop.p,
                  proj_drop=attn.proj_drop.p, device="meta", grid=grid, num_prefix_tokens=num_prefix_tokens,
                  **options)
        names = ["qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"]
        names += ["gate"] if new.gate is not None else []
        return _adopt(new, attn, names)

    def current_grid(self, n_tokens: int) -> tuple[int, ...]:
        """The grid of this forward's n_tokens tokens: ``grid``, or the patch embedding's last grid; checked."""
        grid = self.grid if self.grid is not None else (self.patch_grid.grid if self.patch_grid else None)
        if grid is None:
            raise ValueError("VitAttention has no grid: give grid=(H, W) (or vit_attn_layer(grid=...)), or convert "
                             "the model with convert_vit(model), which reads it from the patch embedding")
        P = self.num_prefix_tokens
        if P + math.prod(grid) != n_tokens:
            raise ValueError(f"the input has {n_tokens} tokens, but the grid {grid} with {P} prefix tokens holds "
                             f"{P + math.prod(grid)} (token dropping, e.g. patch_drop_rate > 0, is not supported)")
        return grid

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """x [B, num_prefix_tokens + H*W, dim] -> [B, N, dim_out]."""
        if attn_mask is not None:
            raise ValueError("attn_mask is not supported by vicinity attention (VitAttention): it weighs every "
                             "query-key pair by grid distance and cannot mask pairs; pass attn_mask=None")
        if is_causal:
            raise ValueError("is_causal=True is not supported by vicinity attention (VitAttention)")
        B, N, _ = x.shape
        grid = self.current_grid(N)
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).unbind(2)   # each [B, N, heads, hd]
        if not isinstance(self.q_norm, nn.Identity) or not isinstance(self.k_norm, nn.Identity):
            q, k = self.q_norm(q), self.k_norm(k)    # per head over hd, as timm's (layout-independent)
        out = vicinity_attention(q, k, v, grid, layout="bnhd", num_prefix_tokens=self.num_prefix_tokens,
                                 **self.options)
        out = self.norm(out.reshape(B, N, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        grid = self.grid if self.grid is not None else "from the patch embedding"
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, grid={grid}, "
                f"num_prefix_tokens={self.num_prefix_tokens}, {options_repr(self.options)}")


def vit_attn_layer(grid: Sequence[int] | None = None, *, num_prefix_tokens: int = 0,
                   **options: Any) -> type[VitAttention]:
    """:class:`VitAttention` with ``grid``, ``num_prefix_tokens`` and the op's options bound, as a class for
    timm's ``attn_layer=`` (which must be a class, not a partial), e.g.
    ``timm.create_model("vit_small_patch16_224", attn_layer=vit_attn_layer((14, 14), num_prefix_tokens=1))``.
    With ``grid=None`` the model must then go through :func:`convert_vit`, which tracks the grid and sets
    the prefix tokens. Save such a model with ``state_dict()`` (the class is made here, so pickling the
    whole module cannot find it by name)."""
    bound = dict(grid=grid, num_prefix_tokens=num_prefix_tokens, **options)
    op_options(options)
    if grid is not None:
        normalize_grid(grid, "grid")
    check_prefix(num_prefix_tokens)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        VitAttention.__init__(self, *args, **{**bound, **kwargs})

    return type("BoundVitAttention", (VitAttention,), {"__init__": __init__, "__doc__": VitAttention.__doc__})


def convert_vit(model: nn.Module, **options: Any) -> nn.Module:
    """Replace every attention of a timm ``VisionTransformer`` (``timm.layers.Attention``) with
    :class:`VitAttention`, in place, keeping its parameters (the same tensors) and their names.

    The grid comes from the model's patch embedding at every forward (a forward hook on
    ``model.patch_embed`` records it: ``patch_embed.grid_size``, or the grid of the image at hand with
    ``dynamic_img_size=True``); the class and register tokens from ``model.num_prefix_tokens``. Layers
    that already are :class:`VitAttention` (built with :func:`vit_attn_layer`) get the grid tracking and
    prefix count too (their own options stay).

    Args:
        model: a ``timm.models.vision_transformer.VisionTransformer``.
        **options: the op's ``variant``, ``feature_map``, ``eps``, ``den_floor``, ``clamp``, ``backend``.

    Returns:
        model, converted. TypeError for another model type; ValueError for blocks whose attention is not
        timm's plain ``Attention`` (e.g. DiffAttention), for attention dropout or token dropping
        (``patch_drop_rate > 0``). The forward then raises ValueError for an ``attn_mask`` or ``is_causal``.
    """
    timm = require("timm", "convert_vit")
    vt = timm.models.vision_transformer
    if not isinstance(model, vt.VisionTransformer):
        raise TypeError(f"convert_vit: model must be a timm VisionTransformer, got {type(model).__name__}")
    op_options(options)
    drop = getattr(model, "patch_drop", None)
    if drop is not None and getattr(drop, "prob", 0.0) > 0:
        raise ValueError(f"convert_vit: the model drops patch tokens (patch_drop_rate={drop.prob}), which breaks "
                         f"the token grid; build it with patch_drop_rate=0")
    stock = timm.layers.Attention
    for i, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        if attn is not None and type(attn) is not stock and not isinstance(attn, VitAttention):
            raise ValueError(f"convert_vit: blocks[{i}].attn is a {type(attn).__name__}; only timm's Attention "
                             f"(timm.layers.Attention) can be converted")
    P = int(model.num_prefix_tokens)
    new = [(n, VitAttention.from_timm(m, num_prefix_tokens=P, **options)) for n, m in model.named_modules()
           if type(m) is stock]
    tracker = next((m.patch_grid for m in model.modules() if isinstance(m, VitAttention) and m.patch_grid), None)
    if tracker is None:
        tracker = PatchGrid(getattr(model.patch_embed, "grid_size", None))
        model.patch_embed.register_forward_hook(tracker)
    for name, layer in new:
        _replace(model, name, layer)
    for m in model.modules():
        if isinstance(m, VitAttention):
            m.num_prefix_tokens = P
            m.patch_grid = tracker
    return model


# ---------------------------------------------------------------------------------- EfficientViT (MIT)


class LiteMLAAttention(nn.Module):
    """timm's ``LiteMLA`` (EfficientViT's lightweight multi-scale linear attention) with its core computed
    by :func:`vicinity_attn.vicinity_attention`.

    Built by :meth:`from_timm` from a ``LiteMLA``, whose submodules it takes over (``qkv``, ``aggreg``,
    ``kernel_func``, ``proj``: the same state dict). Forward: x [B, C, H, W] -> [B, out_channels, H, W],
    x's dtype. The multi-scale q, k, v (the 1 x 1 ``qkv`` conv and each ``aggreg`` branch, ``dim``
    channels per head) go through the op on the (H, W) grid with ``feature_map="relu"`` (timm's
    ``kernel_func``, nn.ReLU) and ``eps=lite_mla.eps``; with ``variant="none"`` that is timm's core
    exactly: ``relu(q) (relu(k)^T [v, 1])``, numerator over (last column + eps). As timm, in float32
    with autocast off, then cast back to x's dtype; float64 inputs stay float64 (timm's rounds them to
    float32 there).
    """

    def __init__(self, eps: float, dim: int, variant: str = "none", backend: str = "auto") -> None:
        super().__init__()
        self.eps = eps
        self.dim = dim
        self.options = op_options(dict(variant=variant, backend=backend, eps=eps), {"feature_map": "relu"})
        self.qkv: nn.Module
        self.aggreg: nn.ModuleList
        self.kernel_func: nn.Module
        self.proj: nn.Module

    @classmethod
    def from_timm(cls, lite_mla: nn.Module, variant: str = "none", backend: str = "auto") -> LiteMLAAttention:
        if type(lite_mla.kernel_func) is not nn.ReLU:
            raise ValueError(f"kernel_func {type(lite_mla.kernel_func).__name__} is not supported: the op's feature "
                             f"maps are relu and elu1; timm's LiteMLA uses nn.ReLU")
        new = cls(lite_mla.eps, lite_mla.dim, variant=variant, backend=backend)
        return _adopt(new, lite_mla, ["qkv", "aggreg", "kernel_func", "proj"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> [B, out_channels, H, W]."""
        B, _, H, W = x.shape
        qkv = self.qkv(x)
        multi_scale = torch.cat([qkv, *(branch(qkv) for branch in self.aggreg)], dim=1)
        # [B, heads, 3 dim, H*W] -> [B, heads, H*W, 3 dim]: per head, dim channels each of q, k, v
        multi_scale = multi_scale.reshape(B, -1, 3 * self.dim, H * W).transpose(-1, -2)
        q, k, v = multi_scale.chunk(3, dim=-1)
        dtype = v.dtype
        compute = torch.promote_types(dtype, torch.float32)
        with autocast_disabled(x.device):
            out = vicinity_attention(q.to(compute), k.to(compute), v.to(compute), (H, W), **self.options)
        out = out.to(dtype).transpose(-1, -2).reshape(B, -1, H, W)
        return self.proj(out)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, {options_repr(self.options)}"


def convert_efficientvit(model: nn.Module, *, variant: str = "none", backend: str = "auto") -> nn.Module:
    """Compute the core of every ``LiteMLA`` of a timm EfficientViT (MIT: ``efficientvit_b*`` /
    ``efficientvit_l*``) with this op, in place (the same parameters; the state dict unchanged).

    With the default ``variant="none"`` the model computes timm's own output (the same function; float
    rounding aside); ``variant="sum"`` / ``"product"`` adds vicinity weights on each LiteMLA's (H, W) grid.

    Args:
        model: a ``timm.models.efficientvit_mit.EfficientVit`` or ``EfficientVitLarge``.
        variant: "none" (timm's attention), "sum" or "product".
        backend: as in :func:`vicinity_attn.vicinity_attention`.

    Returns:
        model, converted. TypeError for another model type.
    """
    evit = require("timm", "convert_efficientvit").models.efficientvit_mit
    if not isinstance(model, (evit.EfficientVit, evit.EfficientVitLarge)):
        raise TypeError(f"convert_efficientvit: model must be a timm EfficientVit or EfficientVitLarge "
                        f"(efficientvit_mit), got {type(model).__name__}")
    op_options(dict(variant=variant, backend=backend))
    new = [(n, LiteMLAAttention.from_timm(m, variant=variant, backend=backend)) for n, m in model.named_modules()
           if type(m) is evit.LiteMLA]
    for name, layer in new:
        _replace(model, name, layer)
    return model
