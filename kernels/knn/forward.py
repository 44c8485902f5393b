"""Forward pass: FlashAttention's online softmax over the keys with the mask s >= tau.

One program per (block of query rows, batch x head). The running maximum starts at tau (no kept score
is below it), so a key tile with nothing kept needs no special case. Stores o and the logsumexp of the
kept scores, the backward's only per-row state besides tau.

Non-finite scores (docs/knn.md, "Non-finite inputs"): a row that keeps a NaN or +inf score, or only -inf
ones, is NaN (o and lse), as the reference's softmax makes it; a kept NaN or +inf makes the row's sum l
NaN or inf whatever the maximum did with it, so the row is found from l at the end. A row that keeps no
key at all (only if a pass computed a score otherwise than the selection pass) stores o = 0 and
lse = +inf (its backward then gets p = 0), not 0 / 0.
"""
import triton
import triton.language as tl

from ..common import mma
from .tiles import load_rows, score_tile, store_rows


@triton.jit
def knn_forward_kernel(
    # pointers: q, k, v; output o; per-row state tau (in), lse (out)
    q_ptr, k_ptr, v_ptr, o_ptr, tau_ptr, lse_ptr,
    # strides
    stride_q_b, stride_q_h, stride_q_n, stride_q_d, stride_k_b, stride_k_h, stride_k_n, stride_k_d,
    stride_v_b, stride_v_h, stride_v_n, stride_v_d, stride_o_b, stride_o_h, stride_o_n, stride_o_d,
    # sizes and the score scale
    n_heads, n_queries, n_keys, head_dim, head_dim_v, scale,
    # constexprs: tiles, row-dot chunks, dot precision
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, N_K: tl.constexpr,
    BLOCK_DV: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):
    """grid (cdiv(Nq, BLOCK_M), B * H): o rows [BLOCK_M, Dv] and lse [B*H, Nq] (ACC)."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // n_heads).to(tl.int64), (bh % n_heads).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_queries
    stat_off = bh.to(tl.int64) * n_queries + rows
    tau = tl.load(tau_ptr + stat_off, mask=row_ok, other=0.0)
    q_base, k_base = q_ptr + b * stride_q_b + h * stride_q_h, k_ptr + b * stride_k_b + h * stride_k_h
    v_base = v_ptr + b * stride_v_b + h * stride_v_h
    # At tau = -inf (every key kept) the maximum starts at the lowest finite number, so that a kept -inf
    # gives exp(-inf) = 0 and never exp(-inf + inf).
    if ACC == tl.float64:
        lowest = -1.7976931348623157e308
    else:
        lowest = -3.4028234663852886e38
    m = tl.where(tau > -float("inf"), tau, lowest)
    l = tl.zeros((BLOCK_M,), dtype=ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=ACC)
    for n0 in range(0, n_keys, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        s, keep = score_tile(q_base, rows, n_queries, stride_q_n, stride_q_d, k_base, cols, n_keys, stride_k_n,
                             stride_k_d, head_dim, scale, tau, BLOCK_M, BLOCK_N, BLOCK_K, N_K, ACC, DOT, PREC, True,
                             True)
        m_new = tl.maximum(m, tl.max(tl.where(keep, s, -float("inf")), axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.where(keep, tl.exp(s - m_new[:, None]), 0.0)
        l = l * alpha + tl.sum(p, axis=1)
        v = load_rows(v_base, cols, n_keys, stride_v_n, stride_v_d, head_dim_v, BLOCK_DV)
        acc = mma(p, v, acc * alpha[:, None], DOT, PREC)
        m = m_new
    nan_row = ~(l < float("inf")) | ((l == 0) & (tau == -float("inf")))
    empty = l == 0      # no key kept (or a padded row), unless a NaN row
    l = tl.where(empty, 1.0, l)
    o = tl.where(nan_row[:, None], float("nan"), acc / l[:, None])
    lse = tl.where(nan_row, float("nan"), tl.where(empty, float("inf"), m + tl.log(l)))
    store_rows(o_ptr + b * stride_o_b + h * stride_o_h, o, rows, n_queries, stride_o_n, stride_o_d, head_dim_v,
               BLOCK_DV)
    tl.store(lse_ptr + stat_off, lse, mask=row_ok)
