"""Layers that reproduce a paper's released code under the authors' parameter names, so that their
checkpoints load with ``strict=True``: ``vvt`` (Vicinity Vision Transformer), ``l2vit`` (L2ViT's
enhanced linear attention, LCM and block) and ``kvt`` (k-NN attention). The generic drop-in module,
:class:`vicinity_attn.VicinityAttention`, lives in :mod:`vicinity_attn.modules`."""
from .kvt import KNNAttention
from .l2vit import LCM, LGABlock, LinearAttention
from .vvt import VicinityVisionAttention

__all__ = ["VicinityVisionAttention", "LinearAttention", "LCM", "LGABlock", "KNNAttention"]
