"""Layers that reproduce a paper's released code under the authors' parameter names, so that their
checkpoints load with ``strict=True``: ``vvt`` (Vicinity Vision Transformer). The generic drop-in
module, :class:`vicinity_attn.VicinityAttention`, lives in :mod:`vicinity_attn.modules`."""
from .vvt import VicinityVisionAttention

__all__ = ["VicinityVisionAttention"]
