"""k-NN attention (KVT): its custom ops (``ops``), the dense oracle (``reference``), the memory-bounded
pure-PyTorch backend (``torch_backend``), the fused backend over ``vicinity_attn.kernels.knn``
(``triton_backend``) and forward-mode AD (``tangent``)."""
