"""k-NN attention (KVT) kernels: a selection pass (each query row's topk-th largest score, by bisection
over the score bits), a masked FlashAttention forward, and FlashAttention-2 backward passes with the
mask recomputed from the stored threshold. Kernel parameters come grouped as pointers, strides, sizes,
constexprs: moving the sizes ahead of the strides changes the generated code (SASS)."""
from .launch import knn_backward, knn_forward

__all__ = ["knn_forward", "knn_backward"]
