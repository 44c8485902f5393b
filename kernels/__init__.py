"""Triton kernels for vicinity attention (installed as vicinity_attn.kernels)."""
