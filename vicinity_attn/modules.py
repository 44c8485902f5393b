"""``VicinityAttention``: the drop-in attention layer (PVT / VVT calling convention)."""
from __future__ import annotations

import torch
from torch import nn

from .common.feature_maps import FEATURE_MAPS
from .common.positions import VARIANTS
from .common.process_group import HoldsProcessGroup
from .common.validation import (
    BACKENDS,
    CAUSAL_MODES,
    check_layer_input,
    check_normaliser,
    check_option,
    check_positive_int,
    check_prefix,
    check_probability,
    check_sr_shards,
)
from .functional import vicinity_attention
from .vicinity.stream import FrameCache


def spatial_reduction(grid_tokens: torch.Tensor, H: int, W: int, sr_ratio: int, sr: nn.Conv2d,
                      norm: nn.LayerNorm, sharded: bool = False) -> tuple[torch.Tensor, tuple[int, int]]:
    """PVT's key/value reduction: grid tokens [B, H*W, C] (row-major) through ``sr`` (a Conv2d with
    kernel = stride = sr_ratio) and ``norm`` (a LayerNorm) -> ([B, Nk, C], the key grid
    (H // sr_ratio, W // sr_ratio)). ``sharded`` (context parallelism): grid_tokens are whole rows of
    the H x W grid, whole blocks of sr_ratio rows (checked by the caller); the key grid is still the
    whole one's."""
    if H < sr_ratio or W < sr_ratio:
        raise ValueError(f"the grid ({H}, {W}) is smaller than sr_ratio ({sr_ratio})")
    B, n, C = grid_tokens.shape
    rows = n // W if sharded else H
    if rows < sr_ratio:   # a shard without a whole block of rows contributes no keys
        return grid_tokens.new_zeros(B, 0, C), (H // sr_ratio, W // sr_ratio)
    # A channels-last view, no copy; unflatten rather than reshape to (rows, W): the reshape's size check
    # would make torch.compile rewrite the token count as rows * W (see check_layer_input's tokens_match).
    image = grid_tokens.transpose(1, 2).unflatten(2, (rows, -1))
    if torch.compiler.is_compiling():
        # Inductor orders a view's strides with plain sympy comparisons, which fail on an int argument
        # W under dynamic shapes ("cannot determine truth value of Relational"): hand it a fresh tensor.
        image = image.contiguous()
    reduced = sr(image)
    return norm(reduced.flatten(2).transpose(1, 2)), (H // sr_ratio, W // sr_ratio)


class VicinityAttention(HoldsProcessGroup, nn.Module):
    """Multi-head vicinity attention over a 2-d grid of tokens, linear in the number of tokens.

    ``forward(x, H, W)`` takes x [B, num_prefix_tokens + H*W, dim] (prefix tokens first, grid
    tokens row-major) and returns a tensor of the same shape. q, k and v come from linear
    projections; with ``sr_ratio > 1`` keys and values come from a spatially reduced grid, a
    Conv2d(kernel = stride = sr_ratio) followed by LayerNorm over the H x W grid tokens (as in
    PVT / VVT), giving a (H // sr_ratio, W // sr_ratio) key grid; prefix tokens bypass the
    reduction. The attention output goes through ``attn_drop``, a linear projection and ``proj_drop``.

    L2ViT's normaliser and VVT's locality in one layer: ``den_floor`` clamps the normaliser from
    below (L2ViT: 100, with eps = 0) and ``temperature=True`` adds a learnable per-head output scale
    ``temperature`` [num_heads, 1, 1] initialised to head_dim^-0.5 (L2ViT's), whatever the variant;
    e.g. ``VicinityAttention(dim, heads, variant="sum", den_floor=100.0, eps=0.0, temperature=True)``.

    Args:
        dim: channels C; must be divisible by ``num_heads``.
        num_heads: attention heads; head dim = dim // num_heads.
        qkv_bias: bias in the q, k, v projections.
        sr_ratio: spatial-reduction factor for keys and values (1 = none).
        variant, eps, den_floor, backend: as in :func:`vicinity_attn.vicinity_attention`.
        feature_map: "relu" or "elu1" (as in :func:`vicinity_attn.vicinity_attention`). "identity" is
            refused (ValueError): the layer's q and k are linear projections of any sign, and identity
            features must be non-negative; call the functional op with your own feature map instead.
        temperature: learn a per-head scale of the attention output (L2ViT's ``temperature``).
        attn_drop: dropout probability on the attention output. Linear attention never forms the N x N
            attention matrix that softmax attention drops entries of, so this is not that: in training,
            ``nn.Dropout(attn_drop)`` zeroes elements of the attention core's output o [B, N, heads, head_dim]
            (after ``temperature``, before the heads are merged and projected) and scales the others by
            1 / (1 - attn_drop). The identity in eval mode or at 0 (the default).
        proj_drop: dropout probability after the output projection.
        num_prefix_tokens: class/register tokens in front of the grid tokens.
        group: None, or a ``torch.distributed`` process group for context parallelism: ``forward(x, H, W)``
            then takes this rank's contiguous shard x [B, n_local, dim] of the whole sequence (shards in
            group-rank order, prefix tokens first) with H, W the whole grid, and returns this rank's
            rows (see :func:`vicinity_attn.vicinity_attention`). With ``sr_ratio > 1`` each rank reduces
            its own rows, so every rank's grid tokens must start and end on whole multiples of
            ``sr_ratio`` rows (``sr_ratio * W`` tokens; the last may end at the grid's end): checked, a
            ValueError otherwise. Parameter gradients are then this rank's share: sum them over the
            group (e.g. DistributedDataParallel over it, loss scaled by the group size; README).
            The group is not state: ``copy.deepcopy`` shares it, pickling / ``torch.save`` stores None
            (:mod:`vicinity_attn.common.process_group`).
        device, dtype: factory arguments, as for ``torch.nn.Linear``: where and in which dtype every
            parameter is created (``device="meta"`` allocates nothing).
        causal: None, or "frames" for video: frame-causal attention over ``forward(x, H, W, frames=T)``
            (frame t sees frames <= t) and streaming with :meth:`frame_cache` (docs/video.md).

    Parameters (state-dict keys): ``q``, ``k``, ``v``, ``proj`` (weight, bias), ``sr`` and ``norm`` with
    ``sr_ratio > 1``, ``temperature`` with ``temperature=True``; the dropouts hold no state.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, sr_ratio: int = 1,
                 variant: str = "sum", feature_map: str = "relu", eps: float = 1e-4,
                 proj_drop: float = 0.0, backend: str = "auto", num_prefix_tokens: int = 0,
                 den_floor: float = 0.0, temperature: bool = False,
                 group: torch.distributed.ProcessGroup | None = None, attn_drop: float = 0.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 causal: str | None = None) -> None:
        super().__init__()
        for value, name in ((dim, "dim"), (num_heads, "num_heads"), (sr_ratio, "sr_ratio")):
            check_positive_int(value, name)
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        for value, name in ((attn_drop, "attn_drop"), (proj_drop, "proj_drop")):
            check_probability(value, name)
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sr_ratio = sr_ratio
        self.variant = check_option(variant, "variant", VARIANTS)
        self.feature_map = check_option(feature_map, "feature_map", FEATURE_MAPS)
        if self.feature_map == "identity":
            raise ValueError("feature_map='identity' needs non-negative features, and VicinityAttention's q and k "
                             "are linear projections of any sign: use 'relu' or 'elu1', or apply your own "
                             "non-negative map and call vicinity_attention(..., feature_map='identity')")
        self.eps, self.den_floor = check_normaliser(eps, den_floor)
        self.backend = check_option(backend, "backend", BACKENDS)
        self.num_prefix_tokens = check_prefix(num_prefix_tokens)
        if causal is not None and causal not in CAUSAL_MODES:
            raise ValueError(f"causal must be None or one of {CAUSAL_MODES}, got {causal!r}")
        self.causal = causal
        factory = dict(device=device, dtype=dtype)
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **factory)
        self.k = nn.Linear(dim, dim, bias=qkv_bias, **factory)
        self.v = nn.Linear(dim, dim, bias=qkv_bias, **factory)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **factory)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio, **factory)
            self.norm = nn.LayerNorm(dim, **factory)
        self.temperature = nn.Parameter(torch.empty(num_heads, 1, 1, **factory)) if temperature else None
        self.group = group
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated-normal (std 0.02) linear weights and zero biases, as in PVT / VVT."""
        for lin in (self.q, self.k, self.v, self.proj):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        if self.sr_ratio > 1:
            self.sr.reset_parameters()
            self.norm.reset_parameters()
        if self.temperature is not None:
            nn.init.constant_(self.temperature, self.head_dim ** -0.5)

    def forward(self, x: torch.Tensor, H: int, W: int, frames: int | None = None,
                cache: FrameCache | None = None) -> torch.Tensor:
        """x [B, num_prefix_tokens + H*W, dim] -> [B, num_prefix_tokens + H*W, dim].

        Video: with ``frames=T``, x holds T frames of H x W tokens, [B, num_prefix_tokens + T*H*W, dim]
        (grid (T, H, W); ``sr_ratio`` reduces each frame), attended bidirectionally, or frame-causally
        when the layer was built with ``causal="frames"``. Streaming: with ``cache`` (from
        :meth:`frame_cache`), x holds the next frames of the stream, [B, n*H*W, dim] (the prefix tokens
        in front on the first step), and the output is the frame-causal call's for them."""
        if cache is not None:
            return self._stream(x, H, W, cache)
        if frames is not None:
            return self._video(x, H, W, frames)
        if self.causal is not None:
            raise ValueError("a causal='frames' layer attends over video: call it with frames=T (x holding T "
                             "frames of H x W tokens) or with a cache from frame_cache()")
        P = self.num_prefix_tokens
        check_layer_input(x, H, W, self.dim, "dim", P, sharded=self.group is not None)
        B, N, C = x.shape
        heads, hd = self.num_heads, self.head_dim
        q = self.q(x).view(B, N, heads, hd)
        kv_input, kv_grid = x, (H, W)
        if self.sr_ratio > 1:
            local_prefix = P if self.group is None else self._local_prefix_tokens(x, H, W)
            reduced, kv_grid = spatial_reduction(x[:, local_prefix:], H, W, self.sr_ratio, self.sr, self.norm,
                                                 sharded=self.group is not None)
            kv_input = torch.cat([x[:, :local_prefix], reduced], dim=1) if local_prefix else reduced
        Nk = kv_input.shape[1]
        k = self.k(kv_input).view(B, Nk, heads, hd)
        v = self.v(kv_input).view(B, Nk, heads, hd)
        out = vicinity_attention(q, k, v, (H, W), kv_grid, variant=self.variant, feature_map=self.feature_map,
                                 eps=self.eps, layout="bnhd", backend=self.backend, num_prefix_tokens=P,
                                 den_floor=self.den_floor, group=self.group)
        return self._finish(out, x)

    def frame_cache(self, frames: int, H: int, W: int) -> FrameCache:
        """A fresh state cache for streaming this layer over at most ``frames`` frames of H x W tokens (the
        time angle divides by ``frames``): pass it to ``forward(x, H, W, cache=...)`` frame by frame."""
        check_positive_int(frames, "frames")
        kv_grid = (frames, H // self.sr_ratio, W // self.sr_ratio)
        return FrameCache((frames, H, W), kv_grid, variant=self.variant, feature_map=self.feature_map, eps=self.eps,
                          den_floor=self.den_floor, num_prefix_tokens=self.num_prefix_tokens, layout="bnhd",
                          backend=self.backend)

    def _qkv_frames(self, x: torch.Tensor, H: int, W: int, n: int, prefix: int):
        """q, k, v [B, N, heads, head_dim] of ``n`` frames of H x W tokens after ``prefix`` prefix tokens, and the
        key grid of a frame; ``sr_ratio`` reduces each frame on its own."""
        B, N, C = x.shape
        heads, hd = self.num_heads, self.head_dim
        q = self.q(x).view(B, N, heads, hd)
        kv_input, kv_frame = x, (H, W)
        if self.sr_ratio > 1:
            per_frame = x[:, prefix:].reshape(B * n, H * W, C)
            reduced, kv_frame = spatial_reduction(per_frame, H, W, self.sr_ratio, self.sr, self.norm)
            reduced = reduced.reshape(B, -1, C)
            kv_input = torch.cat([x[:, :prefix], reduced], dim=1) if prefix else reduced
        Nk = kv_input.shape[1]
        return q, self.k(kv_input).view(B, Nk, heads, hd), self.v(kv_input).view(B, Nk, heads, hd), kv_frame

    def _finish(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.temperature is not None:
            out = out * self.temperature.view(self.num_heads, 1).to(out.dtype)
        return self.proj_drop(self.proj(self.attn_drop(out).reshape(x.shape)))

    def _video(self, x: torch.Tensor, H: int, W: int, frames: int) -> torch.Tensor:
        check_positive_int(frames, "frames")
        P = self.num_prefix_tokens
        check_layer_input(x, frames * H, W, self.dim, "dim", P, sharded=self.group is not None)
        if self.group is not None and self.sr_ratio > 1:
            raise NotImplementedError("context parallelism over video frames with sr_ratio > 1 is not supported "
                                      "by the layer; call vicinity_attention with group=... on your own k, v")
        q, k, v, kv_frame = self._qkv_frames(x, H, W, frames, P)
        out = vicinity_attention(q, k, v, (frames, H, W), (frames, *kv_frame), variant=self.variant,
                                 feature_map=self.feature_map, eps=self.eps, layout="bnhd", backend=self.backend,
                                 num_prefix_tokens=P, den_floor=self.den_floor, group=self.group, causal=self.causal)
        return self._finish(out, x)

    def _stream(self, x: torch.Tensor, H: int, W: int, cache: FrameCache) -> torch.Tensor:
        if not isinstance(cache, FrameCache):
            raise TypeError(f"cache must be a FrameCache (from frame_cache()), got {type(cache).__name__}")
        if cache.spec.grid[1:] != (H, W):
            raise ValueError(f"the cache was made for frames of {cache.spec.grid[1:]} tokens, got H, W = ({H}, {W})")
        if self.causal is None:
            raise ValueError("streaming with a cache computes frame-causal attention: build the layer with "
                             "causal='frames' (a bidirectional layer's outputs depend on later frames)")
        prefix = self.num_prefix_tokens if cache.frame == 0 else 0
        check_positive_int(H, "H")
        check_positive_int(W, "W")
        if x.dim() != 3 or (x.shape[1] - prefix) % (H * W) or x.shape[1] <= prefix:
            raise ValueError(f"x must be [B, {prefix} + n*H*W, dim] (n >= 1 whole frames of H*W = {H * W} tokens"
                             f"{', the prefix tokens first' if prefix else ''}), got {tuple(x.shape)}")
        q, k, v, _ = self._qkv_frames(x, H, W, (x.shape[1] - prefix) // (H * W), prefix)
        return self._finish(cache.step(q, k, v), x)

    def _local_prefix_tokens(self, x: torch.Tensor, H: int, W: int) -> int:
        """Under context parallelism with sr_ratio > 1: the prefix tokens in this rank's shard, after
        checking that every rank's grid tokens are whole blocks of sr_ratio rows (one all-gather)."""
        from .vicinity.context_parallel import gather_lengths
        lengths = [r[0] for r in gather_lengths([x.shape[1]], self.group, x)]
        check_sr_shards(lengths, self.num_prefix_tokens, H, W, self.sr_ratio)
        offset = sum(lengths[:torch.distributed.get_rank(self.group)])
        return max(0, min(self.num_prefix_tokens, offset + x.shape[1]) - offset)

    def extra_repr(self) -> str:
        parts = [f"dim={self.dim}", f"num_heads={self.num_heads}", f"sr_ratio={self.sr_ratio}",
                 f"variant={self.variant!r}", f"feature_map={self.feature_map!r}", f"eps={self.eps}",
                 f"backend={self.backend!r}"]
        if self.den_floor:
            parts.append(f"den_floor={self.den_floor}")
        if self.temperature is not None:
            parts.append("temperature=True")
        if self.attn_drop.p:
            parts.append(f"attn_drop={self.attn_drop.p}")
        if self.proj_drop.p:
            parts.append(f"proj_drop={self.proj_drop.p}")
        if self.num_prefix_tokens:
            parts.append(f"num_prefix_tokens={self.num_prefix_tokens}")
        if self.causal is not None:
            parts.append(f"causal={self.causal!r}")
        return ", ".join(parts)
