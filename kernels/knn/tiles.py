"""jit helpers every k-NN pass shares: tile loads, the (masked) score tile, and the order-preserving key.

The mask of every pass is ``s >= tau`` with tau found by the selection pass, so every pass must
compute a score bitwise as the selection pass did: :func:`score_tile` is the one place scores are
computed, always on a [BLOCK_M, BLOCK_N] tile of (query rows, key rows), over the head dim in the
same chunks, with the same launch config (see ``configs.py``), whatever the pass loops over.
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
def row_dots(a_base, a_rows, n_a, stride_a_n, stride_a_d, b_base, b_rows, n_b, stride_b_n, stride_b_d, dim, acc,
             BLOCK_K: tl.constexpr, N_K: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """acc + a[a_rows, :dim] @ b[b_rows, :dim]^T, over the head dim in N_K chunks of BLOCK_K loaded
    here: a full-width operand tile would sit whole in every warp's registers (the head dim is the
    dots' K), which for head dims up to 256 (and fp32's tf32x3 operand splits) does not fit."""
    for c in range(N_K):
        a = load_rows(a_base + c * BLOCK_K * stride_a_d, a_rows, n_a, stride_a_n, stride_a_d, dim - c * BLOCK_K,
                      BLOCK_K)
        b = load_rows(b_base + c * BLOCK_K * stride_b_d, b_rows, n_b, stride_b_n, stride_b_d, dim - c * BLOCK_K,
                      BLOCK_K)
        acc = mma(a, tl.trans(b), acc, DOT, PREC)
    return acc


@triton.jit
def score_tile(q_base, rows, n_queries, stride_q_n, stride_q_d, k_base, cols, n_keys, stride_k_n, stride_k_d,
               head_dim, scale, tau,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, N_K: tl.constexpr,
               ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, CUT: tl.constexpr,
               MASK_KEYS: tl.constexpr):
    """(s, keep) for one [BLOCK_M, BLOCK_N] tile of (query rows, key rows), the only place scores and
    their mask are formed:

        s    = scale * q[rows] @ k[cols]^T      in ACC, 0 where padded
        keep = rows < n_queries                  (the tile's real entries)
               & cols < n_keys                   when MASK_KEYS
               & not s < tau[:, None]            when CUT (the k-NN mask; tau [BLOCK_M] in ACC)

    The selection pass, which is finding tau, passes CUT = False (its ``tau`` is unused). A pass whose
    keys are its own rows of output (the dk / dv pass) may pass MASK_KEYS = False: its padded keys'
    entries then reach only its padded output rows, which it never stores."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    acc = row_dots(q_base, rows, n_queries, stride_q_n, stride_q_d, k_base, cols, n_keys, stride_k_n, stride_k_d,
                   head_dim, acc, BLOCK_K, N_K, DOT, PREC)
    s = acc * scale
    if MASK_KEYS:
        keep = (rows[:, None] < n_queries) & (cols[None, :] < n_keys)
    else:
        keep = tl.broadcast_to(rows[:, None] < n_queries, (BLOCK_M, BLOCK_N))
    if CUT:
        # Dropped only if ordered below tau: a NaN score is always kept, and a NaN tau (NaNs fill the top-k)
        # keeps the whole row (docs/knn.md, "Non-finite inputs").
        keep = keep & ~(s < tau[:, None])
    return s, keep


@triton.jit
def order_key(s, top_bit):
    """An unsigned int (top_bit's dtype: uint32 for fp32 scores, uint64 for fp64) ordered like the
    float s: negative floats get every bit flipped, the others the sign bit set (the radix-sort key).
    Every NaN, whatever its sign bit, gets the largest key (all bits set): NaN ranks above +inf, as in
    torch.topk, and a tau found at that key is a NaN (:func:`key_to_score`)."""
    bits = s.to(top_bit.dtype, bitcast=True)
    negative = (bits & top_bit) != 0
    return tl.where(s != s, top_bit | (top_bit - 1), tl.where(negative, ~bits, bits | top_bit))


@triton.jit
def key_to_score(key, top_bit, ACC: tl.constexpr):
    """The inverse of :func:`order_key`: the float whose key is ``key``."""
    positive = (key & top_bit) != 0
    return tl.where(positive, key ^ top_bit, ~key).to(ACC, bitcast=True)
