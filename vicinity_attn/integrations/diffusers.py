"""diffusers' Sana with this op: an attention processor and its installer.

Sana's self-attention (diffusers' ``SanaLinearAttnProcessor2_0``) is relu linear attention computed in
float32 with a "pad v with ones" normaliser:

    o_i = relu(q_i)^T (sum_j relu(k_j) v_j^T) / (relu(q_i) . sum_j relu(k_j) + 1e-15)

which is exactly ``vicinity_attention(q, k, v, grid, variant="none", feature_map="relu", eps=1e-15)``.
:class:`SanaVicinityAttnProcessor` computes it with this op (``variant="none"``: Sana's math; the
float32 core, the cast back, ``to_out`` and the float16 clip to +-65504 as diffusers does), or with
vicinity weights over the latent's (height, width) token grid (``variant="sum"`` / ``"product"``).

The grid. ``SanaTransformerBlock`` calls its ``attn1`` with the hidden states alone, but receives the
post-patch ``height`` and ``width`` itself (it needs them for its conv feed-forward).
:func:`use_vicinity_attention` registers a forward pre-hook on every block it converts that hands those
two to the block's processor before each call (gradient checkpointing re-runs the block, and the hook
with it). A processor used without such a hook needs ``grid=`` (or variant "none", which needs no grid).

diffusers is imported only by :func:`use_vicinity_attention`; the processor needs only torch.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..common.custom_ops import autocast_disabled
from ..common.validation import normalize_grid
from ..functional import vicinity_attention
from ._common import op_options, options_repr, require

__all__ = ["SanaVicinityAttnProcessor", "use_vicinity_attention", "SANA_EPS"]

SANA_EPS = 1e-15   # SanaLinearAttnProcessor2_0: hidden_states[:, :, -1:] + 1e-15
FP16_MAX = 65504.0


class SanaVicinityAttnProcessor:
    """An attention processor for diffusers' ``Attention`` computing Sana's linear attention with this op.

    ``processor(attn, hidden_states, encoder_hidden_states=None, attention_mask=None)``:
    hidden_states [B, N, C] -> [B, N, C_out], hidden_states' dtype. As ``SanaLinearAttnProcessor2_0``:
    ``to_q`` / ``to_k`` / ``to_v``, ``norm_q`` / ``norm_k`` when present, ``attn.heads`` heads, relu
    features, the core in float32 (float64 stays float64) with autocast off, cast back, ``to_out[0]``,
    ``to_out[1]``, and for float16 a clip to [-65504, 65504].

    Args:
        variant: "none" (Sana's own attention, exactly), "sum" or "product" (vicinity weights on the
            token grid, which then must be known: from the block hook of :func:`use_vicinity_attention`,
            or ``grid``).
        grid: a fixed (height, width) token grid (post-patch), or None.
        eps: the normaliser's constant; Sana's 1e-15 by default.
        feature_map, den_floor, clamp, backend: the op's options.

    ``attention_mask`` is not supported (Sana's self-attention is never given one; diffusers' processor
    ignores it): anything but None raises a ValueError. ``encoder_hidden_states`` (keys from another
    sequence) is supported with ``variant="none"`` only.
    """

    def __init__(self, variant: str = "none", *, grid: Sequence[int] | None = None, eps: float = SANA_EPS,
                 **options: Any) -> None:
        self.options = op_options(dict(variant=variant, eps=eps, **options))
        self.grid = normalize_grid(grid, "grid") if grid is not None else None

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("attention_mask is not supported by SanaVicinityAttnProcessor (Sana's linear "
                             "self-attention takes none); pass attention_mask=None")
        original_dtype = hidden_states.dtype
        B, N, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        variant = self.options["variant"]
        if encoder_hidden_states is not None and variant != "none":
            raise ValueError(f"encoder_hidden_states is supported with variant='none' only (keys from another "
                             f"sequence have no place on the query grid), got variant={variant!r}")
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        heads = attn.heads
        query = query.unflatten(-1, (heads, -1))      # [B, N, heads, D]
        key = key.unflatten(-1, (heads, -1))          # [B, Nk, heads, D]
        value = value.unflatten(-1, (heads, -1))      # [B, Nk, heads, Dv]
        if variant == "none":
            grid, kv_grid = N, key.shape[1]           # no locality: any 1-d grid of the right length
        else:
            grid = kv_grid = self.current_grid(N)
        compute = torch.promote_types(original_dtype, torch.float32)
        with autocast_disabled(hidden_states.device):
            out = vicinity_attention(query.to(compute), key.to(compute), value.to(compute), grid, kv_grid,
                                     layout="bnhd", **self.options)
        out = out.flatten(2).to(original_dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if original_dtype == torch.float16:
            out = out.clip(-FP16_MAX, FP16_MAX)
        return out

    def current_grid(self, n_tokens: int) -> tuple[int, ...]:
        """The token grid of this call: ``grid``, or the (height, width) the block hook handed over; checked."""
        grid = self.grid
        if grid is None:
            raise ValueError(f"variant={self.options['variant']!r} needs the token grid: install the processor with "
                             f"use_vicinity_attention(transformer, ...) (which reads each block's height and "
                             f"width), or give grid=(height, width)")
        if math.prod(grid) != n_tokens:
            raise ValueError(f"the hidden states have {n_tokens} tokens, but the grid {grid} holds {math.prod(grid)}")
        return grid

    def __repr__(self) -> str:
        return f"SanaVicinityAttnProcessor({options_repr(self.options)}, grid={self.grid})"


class _BlockGridHook:
    """Forward pre-hook of a ``SanaTransformerBlock``: hands its (height, width) arguments to its processor.
    An object (not a closure) so that deep copies of the model copy hook and processor consistently."""

    def __init__(self, processor: SanaVicinityAttnProcessor, block: nn.Module) -> None:
        self.processor = processor
        names = list(inspect.signature(type(block).forward).parameters)[1:]   # without self
        if "height" not in names or "width" not in names:
            raise TypeError(f"{type(block).__name__}.forward takes no height and width: cannot track the grid")
        self.positions = names.index("height"), names.index("width")

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hw = [kwargs.get(name, args[pos] if len(args) > pos else None)
              for name, pos in zip(("height", "width"), self.positions)]
        if hw[0] is not None and hw[1] is not None:
            self.processor.grid = (int(hw[0]), int(hw[1]))


def _remove_grid_hooks(block: nn.Module) -> None:
    for key, hook in list(block._forward_pre_hooks.items()):
        if isinstance(hook, _BlockGridHook):
            del block._forward_pre_hooks[key]
            block._forward_pre_hooks_with_kwargs.pop(key, None)


def use_vicinity_attention(transformer: nn.Module, **options: Any) -> nn.Module:
    """Install :class:`SanaVicinityAttnProcessor` on every linear-attention block of a diffusers
    ``SanaTransformer2DModel`` (each block's ``attn1`` whose processor is ``SanaLinearAttnProcessor2_0``),
    in place; the cross-attention (``attn2``, softmax) is left alone. No parameter changes: the state dict
    is the same. ``variant="none"`` computes Sana's own attention (the same outputs, float rounding aside);
    ``variant="sum"`` / ``"product"`` adds locality on each block's (height, width) post-patch grid, which a
    forward pre-hook on each block passes to its processor (module docstring).

    Args:
        transformer: a ``diffusers.SanaTransformer2DModel``.
        **options: ``variant`` (default "none"), ``eps`` (default Sana's 1e-15), ``feature_map``,
            ``den_floor``, ``clamp``, ``backend``.

    Returns:
        transformer, converted. TypeError for another model; ValueError if no block has Sana's linear
        attention processor (e.g. it was already replaced).
    """
    diffusers = require("diffusers", "use_vicinity_attention")
    if not isinstance(transformer, diffusers.SanaTransformer2DModel):
        raise TypeError(f"use_vicinity_attention: transformer must be a diffusers SanaTransformer2DModel, got "
                        f"{type(transformer).__name__}")
    from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0
    SanaVicinityAttnProcessor(**options)    # the options' errors before anything changes
    converted = 0
    for block in transformer.transformer_blocks:
        attn = getattr(block, "attn1", None)
        if attn is None or not isinstance(attn.processor, (SanaLinearAttnProcessor2_0, SanaVicinityAttnProcessor)):
            continue
        _remove_grid_hooks(block)
        processor = SanaVicinityAttnProcessor(**options)
        block.register_forward_pre_hook(_BlockGridHook(processor, block), with_kwargs=True)
        attn.set_processor(processor)
        converted += 1
    if not converted:
        raise ValueError("use_vicinity_attention: no block of the transformer has Sana's linear attention "
                         "(attn1 with SanaLinearAttnProcessor2_0)")
    return transformer
