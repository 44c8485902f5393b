"""jit helpers every k-NN pass shares: tile loads, the score tile, and the order-preserving key.

The mask of every pass is ``s >= tau`` with tau found by the selection pass, so every pass must
compute a score bitwise as the selection pass did: :func:`score_tile` is the one place scores are
computed, always on a [BLOCK_M, BLOCK_N] tile of (query rows, key rows) with the same launch
config (see ``configs.py``), whatever the pass loops over.
"""
import triton
import triton.language as tl

from ..common import mma


@triton.jit
def load_rows(base_ptr, rows, n_rows, stride_n, stride_d, n_cols, BLOCK_COLS: tl.constexpr):
    """x[rows, :n_cols] as a [len(rows), BLOCK_COLS] tile, 0 outside (rows >= n_rows, cols >= n_cols)."""
    cols = tl.arange(0, BLOCK_COLS)
    ptrs = base_ptr + rows[:, None] * stride_n + cols[None, :] * stride_d
    return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def store_rows(base_ptr, x, rows, n_rows, stride_n, stride_d, n_cols, BLOCK_COLS: tl.constexpr):
    cols = tl.arange(0, BLOCK_COLS)
    ptrs = base_ptr + rows[:, None] * stride_n + cols[None, :] * stride_d
    tl.store(ptrs, x.to(base_ptr.dtype.element_ty), mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@triton.jit
def score_tile(q, k, scale, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """scale * q @ k^T: [BLOCK_M, BLOCK_N] in ACC from q [BLOCK_M, BLOCK_D] and k [BLOCK_N, BLOCK_D]."""
    acc = tl.zeros((q.shape[0], k.shape[0]), dtype=ACC)
    return mma(q, tl.trans(k), acc, DOT, PREC) * scale


@triton.jit
def order_key(s, top_bit):
    """An unsigned int (top_bit's dtype: uint32 for fp32 scores, uint64 for fp64) ordered like the
    float s: negative floats get every bit flipped, the others the sign bit set (the radix-sort key)."""
    bits = s.to(top_bit.dtype, bitcast=True)
    negative = (bits & top_bit) != 0
    return tl.where(negative, ~bits, bits | top_bit)


@triton.jit
def key_to_score(key, top_bit, ACC: tl.constexpr):
    """The inverse of :func:`order_key`: the float whose key is ``key``."""
    positive = (key & top_bit) != 0
    return tl.where(positive, key ^ top_bit, ~key).to(ACC, bitcast=True)
