"""Triton kernels (installed as vicinity_attn.kernels): one subpackage per operation, the jit helpers
and launch-time facts they share beside them (``common``, ``runtime``)."""
