"""Small @triton.jit helpers shared by the kernels: feature maps and the tensor-core dot (with its
GPU emulation for the interpreter, see ``kernels/runtime.py``)."""
import triton
import triton.language as tl


@triton.jit
def feature_map(x, mask, FMAP: tl.constexpr):
    """phi(x) in x's (accumulation) dtype, 0 where ``mask`` is false; NaN stays NaN (as in torch).
    FMAP: 0 relu, 1 elu1, 2 identity (phi(x) = x, phi' = 1; kernels/vicinity/geometry.py FMAP_CODES).

    The explicit mask matters for elu1: padded loads are 0 and elu1(0) = 1 would leak into sums.
    Selects rather than max / min: a GPU's max instruction (and tl.maximum) drops NaN.
    """
    if FMAP == 0:
        phi = tl.where(x < 0.0, 0.0, x)
    elif FMAP == 1:
        phi = tl.where(x <= 0.0, tl.exp(tl.where(x <= 0.0, x, 0.0)), x + 1.0)
    else:
        phi = x
    return tl.where(mask, phi, 0.0)


@triton.jit
def mul_feature_map_grad(acc, x, FMAP: tl.constexpr):
    """acc * phi'(x); relu'(0) = 0, elu1'(x) = exp(x) below zero, identity' = 1. As autograd's relu:
    exactly 0 where relu' = 0 even when acc is NaN / inf (a select, not a product with 0); NaN x gives
    NaN (elu1: a select, not tl.minimum, which drops NaN)."""
    if FMAP == 0:
        return tl.where(x <= 0, 0.0, acc)   # NaN x: acc passes, as in autograd
    elif FMAP == 1:
        return acc * tl.where(x > 0, 1.0, tl.exp(tl.where(x > 0, 0.0, x))).to(x.dtype)
    else:
        return acc


@triton.jit
def mul_feature_map_grad_of_phi(acc, phi, FMAP: tl.constexpr):
    """acc * phi'(x) from phi = feature_map(x) instead of x (a kernel that holds phi need not keep x):
    bitwise what ``mul_feature_map_grad`` gives. relu: phi <= 0 exactly where x <= 0 (NaN passes both).
    elu1: phi > 1 exactly where phi' = 1 (x > 0; x + 1 rounding to 1 also has phi' = 1), else phi' =
    exp(x) = phi; NaN x gives NaN phi and a NaN product. identity: acc itself."""
    if FMAP == 0:
        return tl.where(phi <= 0, 0.0, acc)
    elif FMAP == 1:
        return tl.where(phi > 1.0, acc, acc * phi)
    else:
        return acc


@triton.jit
def _round_mantissa(x, DROP: tl.constexpr, TIES_AWAY: tl.constexpr):
    """fp32 x rounded to 23 - DROP mantissa bits (bf16: DROP = 16, tf32: 13) by integer ops (the
    interpreter's fp32 -> bf16 cast truncates): to nearest, ties to even (or away from zero).
    Overflow rounds to inf; inf and NaN are kept."""
    bits = x.to(tl.uint32, bitcast=True)
    if TIES_AWAY:
        bits = bits + (1 << (DROP - 1))
    else:
        bits = bits + ((1 << (DROP - 1)) - 1) + ((bits >> DROP) & 1)
    r = ((bits >> DROP) << DROP).to(tl.float32, bitcast=True)
    return tl.where(x == x, r, x)


@triton.jit
def _truncate_mantissa(x, DROP: tl.constexpr):
    """fp32 x with its DROP lowest mantissa bits cleared (what a TF32 tensor core reads of fp32 data)."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits >> DROP) << DROP).to(tl.float32, bitcast=True)


@triton.jit
def _gpu_operand(x, PREC: tl.constexpr):
    """x as fp32, rounded as the emulated GPU dot rounds its operand."""
    x = x.to(tl.float32)
    if PREC == "emulate_fp16":
        x = x.to(tl.float16).to(tl.float32)
    elif PREC == "emulate_bf16":
        x = _round_mantissa(x, 16, False)
    elif PREC == "emulate_tf32":
        x = _round_mantissa(x, 13, True)
    return x


@triton.jit
def mma_rows(a, b, acc, rows, DOT: tl.constexpr, PREC: tl.constexpr):
    """acc + rows[:, None] * (a @ b): the product of unscaled operands, its rows scaled in fp32 afterwards
    (``mma`` into a zero accumulator). For a per-token weight rows [M] this is (rows * a) @ b without
    rounding rows * a to the dot's dtype, and an operand shared by several weights (one per position
    feature) is converted for the tensor cores once, not once per weight."""
    return acc + rows[:, None] * mma(a, b, tl.zeros(acc.shape, acc.dtype), DOT, PREC)


@triton.jit
def mma(a, b, acc, DOT: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b, accumulated in acc's dtype.

    On a GPU (PREC one of "ieee", "tf32", "tf32x3"): both operands cast to DOT (the input dtype:
    tensor cores); fp32 operands of a "tf32" dot are first rounded to TF32 (to nearest).
    Under the interpreter, PREC "emulate_<fp16|bf16|tf32|tf32x3>" computes what that GPU dot
    computes: operands rounded as the tensor core takes them, exact fp32 products and sums.
    tf32x3 follows Triton's split: big = tf32(x) (rounded to nearest, ties away), small = x - big,
    small_a big_b + big_a small_b (NaNs dropped, as Triton does) added to big_a big_b.
    """
    if PREC == "tf32" and DOT == tl.float32:
        # A TF32 tensor core reads fp32 data truncated (biased: -2^-11 relative on average); round
        # to nearest first, as cvt.rna.tf32.f32 would.
        a = _round_mantissa(a.to(tl.float32), 13, True)
        b = _round_mantissa(b.to(tl.float32), 13, True)
        return tl.dot(a, b, acc, input_precision="tf32", out_dtype=acc.dtype)
    elif PREC == "ieee" or PREC == "tf32" or PREC == "tf32x3":
        return tl.dot(a.to(DOT), b.to(DOT), acc, input_precision=PREC, out_dtype=acc.dtype)
    elif PREC == "emulate_tf32x3":
        a = a.to(tl.float32)
        b = b.to(tl.float32)
        a_big = _round_mantissa(a, 13, True)
        b_big = _round_mantissa(b, 13, True)
        a_small = _truncate_mantissa(a - a_big, 13)
        b_small = _truncate_mantissa(b - b_big, 13)
        small = tl.dot(a_small, b_big, input_precision="ieee")
        small = tl.dot(a_big, b_small, small, input_precision="ieee")
        small = tl.where(small == small, small, 0.0)
        return tl.dot(a_big, b_big, acc, input_precision="ieee", out_dtype=acc.dtype) + small
    else:
        return tl.dot(_gpu_operand(a, PREC), _gpu_operand(b, PREC), acc, input_precision="ieee",
                      out_dtype=acc.dtype)


@triton.jit
def dot_operand(x, DOT: tl.constexpr, PREC: tl.constexpr):
    """x as :func:`mma` takes it as an operand, for an operand reused across a loop (a state tile kept on
    chip): converted once, ahead of the loop, instead of every iteration. Bitwise neutral, since each of
    these roundings is idempotent: mma(a, dot_operand(b)) == mma(a, b). tf32x3 (a split, not a rounding)
    and fp64 keep x as it is."""
    if PREC == "tf32" and DOT == tl.float32:
        return _round_mantissa(x.to(tl.float32), 13, True)
    elif PREC == "ieee" or PREC == "tf32":
        return x.to(DOT)
    elif PREC == "tf32x3" or PREC == "emulate_tf32x3":
        return x
    else:
        return _gpu_operand(x, PREC)
