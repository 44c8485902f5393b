"""Conversions for other libraries' models, each importing its library only when used.

- :mod:`vicinity_attn.integrations.timm`: ``convert_pvt_v2``, ``convert_vit``, ``convert_efficientvit``
  and the layers they install (``PvtV2Attention``, ``VitAttention``, ``LiteMLAAttention``).
- :mod:`vicinity_attn.integrations.diffusers`: ``SanaVicinityAttnProcessor`` and
  ``use_vicinity_attention`` for diffusers' ``SanaTransformer2DModel``.

Importing this package, or either module, imports neither timm nor diffusers: the conversion
functions import their library when called (an ``ImportError`` naming the package to install
otherwise), and the layers themselves need only torch. docs/integrations.md has the details.
"""
