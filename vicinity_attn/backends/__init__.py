"""The backends: ``reference`` (quadratic, for tests), ``torch_backend`` (linear, pure PyTorch, any
device) and ``triton_backend`` (the fused kernels). Each exposes plain functions over a
:class:`~vicinity_attn.spec.VicinitySpec`; none imports the custom ops (:mod:`vicinity_attn.ops`) or
the public API back, so data flows one way: public function -> validation -> custom op -> backend ->
kernels.
"""
