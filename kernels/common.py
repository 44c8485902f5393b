"""Small @triton.jit helpers shared by the kernels: feature maps and the tensor-core dot."""
import triton
import triton.language as tl


@triton.jit
def feature_map(x, mask, FMAP: tl.constexpr):
    """phi(x) in x's (accumulation) dtype, 0 where ``mask`` is false.

    The explicit mask matters for elu1: padded loads are 0 and elu1(0) = 1 would leak into sums.
    """
    if FMAP == 0:
        phi = tl.maximum(x, 0.0)
    else:
        phi = tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    return tl.where(mask, phi, 0.0)


@triton.jit
def mul_feature_map_grad(acc, x, FMAP: tl.constexpr):
    """acc * phi'(x); relu'(0) = 0, elu1'(x) = exp(x) below zero. As autograd's relu: exactly 0 where
    relu' = 0 even when acc is NaN / inf (a select, not a product with 0)."""
    if FMAP == 0:
        return tl.where(x <= 0, 0.0, acc)   # NaN x: acc passes, as in autograd
    else:
        return acc * tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0))).to(x.dtype)


@triton.jit
def mma(a, b, acc, DOT: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b with both operands cast to DOT (the input dtype on a GPU: tensor cores; fp32/fp64
    under the interpreter, whose bf16 dot is wrong) and accumulation in acc's dtype."""
    return tl.dot(a.to(DOT), b.to(DOT), acc, input_precision=PREC, out_dtype=acc.dtype)
