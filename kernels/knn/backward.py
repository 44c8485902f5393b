"""Backward passes, FlashAttention-2 style, with the mask recomputed from tau:

    p_ij = [s_ij >= tau_i] exp(s_ij - lse_i),   delta_i = dO_i . o_i,   ds_ij = p_ij (dO_i . v_j - delta_i)
    dq_i = scale sum_j ds_ij k_j,   dk_j = scale sum_i ds_ij q_i,   dv_j = sum_i p_ij dO_i

``row_delta_kernel`` computes delta; ``knn_dq_kernel`` owns a block of query rows and loops over the
keys; ``knn_dkdv_kernel`` owns a block of key rows and loops over the queries. Each program writes its
own rows: no atomics, deterministic. Scores are recomputed as [BLOCK_M, BLOCK_N] tiles by
``tiles.score_tile``, bitwise as the selection and forward passes computed them.
"""
import triton
import triton.language as tl

from ..common import mma
from .tiles import load_rows, row_dots, score_tile, store_rows


@triton.jit
def row_delta_kernel(
    # pointers: dO, o; output delta
    do_ptr, o_ptr, delta_ptr,
    # strides
    stride_do_b, stride_do_h, stride_do_n, stride_do_d, stride_o_b, stride_o_h, stride_o_n, stride_o_d,
    # sizes
    n_heads, n_queries, head_dim_v,
    # constexprs: tiles, accumulation dtype
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, ACC: tl.constexpr,
):
    """grid (cdiv(Nq, BLOCK_M), B * H): delta [B*H, Nq] = rowsum(dO * o) in ACC."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // n_heads).to(tl.int64), (bh % n_heads).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    do = load_rows(do_ptr + b * stride_do_b + h * stride_do_h, rows, n_queries, stride_do_n, stride_do_d, head_dim_v,
                   BLOCK_DV).to(ACC)
    o = load_rows(o_ptr + b * stride_o_b + h * stride_o_h, rows, n_queries, stride_o_n, stride_o_d, head_dim_v,
                  BLOCK_DV).to(ACC)
    tl.store(delta_ptr + bh.to(tl.int64) * n_queries + rows, tl.sum(do * o, axis=1), mask=rows < n_queries)


@triton.jit
def _p_and_ds(q_base, stride_q_n, stride_q_d, k_base, stride_k_n, stride_k_d, v_base, stride_v_n, stride_v_d,
              do_base, stride_do_n, stride_do_d, rows, cols,
              n_queries, n_keys, head_dim, head_dim_v, scale, tau, lse, delta,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, N_K: tl.constexpr,
              BLOCK_KV: tl.constexpr, N_KV: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
              PREC: tl.constexpr, NEED_DS: tl.constexpr, MASK_KEYS: tl.constexpr):
    """p and ds for one [BLOCK_M, BLOCK_N] tile: the forward's probabilities (0 off the mask and on
    padded query rows; on padded key columns too when MASK_KEYS) and p * (dO v^T - delta), exactly 0 off
    the mask as the gradient of the reference's where, even where dO v^T - delta is not finite (only when
    NEED_DS; else p is returned twice)."""
    s, keep = score_tile(q_base, rows, n_queries, stride_q_n, stride_q_d, k_base, cols, n_keys, stride_k_n,
                         stride_k_d, head_dim, scale, tau, BLOCK_M, BLOCK_N, BLOCK_K, N_K, ACC, DOT, PREC, True,
                         MASK_KEYS)
    p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
    if NEED_DS:
        dp = row_dots(do_base, rows, n_queries, stride_do_n, stride_do_d, v_base, cols, n_keys, stride_v_n,
                      stride_v_d, head_dim_v, tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC), BLOCK_KV, N_KV, DOT, PREC)
        return p, tl.where(keep, p * (dp - delta[:, None]), 0.0)
    return p, p


@triton.jit
def knn_dq_kernel(
    # pointers: q, k, v, dO; output dq; per-row state tau, lse, delta
    q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, tau_ptr, lse_ptr, delta_ptr,
    # strides
    stride_q_b, stride_q_h, stride_q_n, stride_q_d, stride_k_b, stride_k_h, stride_k_n, stride_k_d,
    stride_v_b, stride_v_h, stride_v_n, stride_v_d, stride_do_b, stride_do_h, stride_do_n, stride_do_d,
    stride_dq_b, stride_dq_h, stride_dq_n, stride_dq_d,
    # sizes and the score scale
    n_heads, n_queries, n_keys, head_dim, head_dim_v, scale,
    # constexprs: tiles, row-dot chunks, dot precision
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    N_K: tl.constexpr, BLOCK_KV: tl.constexpr, N_KV: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):
    """grid (cdiv(Nq, BLOCK_M), B * H): dq for one block of query rows."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // n_heads).to(tl.int64), (bh % n_heads).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_queries
    stat_off = bh.to(tl.int64) * n_queries + rows
    tau = tl.load(tau_ptr + stat_off, mask=row_ok, other=0.0)
    lse = tl.load(lse_ptr + stat_off, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + stat_off, mask=row_ok, other=0.0)
    q_base, k_base = q_ptr + b * stride_q_b + h * stride_q_h, k_ptr + b * stride_k_b + h * stride_k_h
    v_base = v_ptr + b * stride_v_b + h * stride_v_h
    do_base = do_ptr + b * stride_do_b + h * stride_do_h
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    for n0 in range(0, n_keys, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        p, ds = _p_and_ds(q_base, stride_q_n, stride_q_d, k_base, stride_k_n, stride_k_d, v_base, stride_v_n,
                          stride_v_d, do_base, stride_do_n, stride_do_d, rows, cols,
                          n_queries, n_keys, head_dim, head_dim_v, scale, tau, lse, delta,
                          BLOCK_M, BLOCK_N, BLOCK_K, N_K, BLOCK_KV, N_KV, ACC, DOT, PREC, True, True)
        k = load_rows(k_base, cols, n_keys, stride_k_n, stride_k_d, head_dim, BLOCK_D)
        dq = mma(ds, k, dq, DOT, PREC)
    store_rows(dq_ptr + b * stride_dq_b + h * stride_dq_h, dq * scale, rows, n_queries, stride_dq_n, stride_dq_d,
               head_dim, BLOCK_D)


@triton.jit
def knn_dkdv_kernel(
    # pointers: q, k, v, dO; outputs dk, dv; per-row state tau, lse, delta
    q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, tau_ptr, lse_ptr, delta_ptr,
    # strides
    stride_q_b, stride_q_h, stride_q_n, stride_q_d, stride_k_b, stride_k_h, stride_k_n, stride_k_d,
    stride_v_b, stride_v_h, stride_v_n, stride_v_d, stride_do_b, stride_do_h, stride_do_n, stride_do_d,
    stride_dk_b, stride_dk_h, stride_dk_n, stride_dk_d, stride_dv_b, stride_dv_h, stride_dv_n, stride_dv_d,
    # sizes and the score scale
    n_heads, n_queries, n_keys, head_dim, head_dim_v, scale,
    # constexprs: tiles, row-dot chunks, dot precision, gradients wanted
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_K: tl.constexpr, N_K: tl.constexpr, BLOCK_KV: tl.constexpr, N_KV: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, NEED_DK: tl.constexpr, NEED_DV: tl.constexpr,
):
    """grid (cdiv(Nk, BLOCK_N), B * H): dk and / or dv for one block of key rows."""
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // n_heads).to(tl.int64), (bh % n_heads).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    q_base, k_base = q_ptr + b * stride_q_b + h * stride_q_h, k_ptr + b * stride_k_b + h * stride_k_h
    v_base = v_ptr + b * stride_v_b + h * stride_v_h
    do_base = do_ptr + b * stride_do_b + h * stride_do_h
    stat_base = bh.to(tl.int64) * n_queries
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=ACC)
    nan_rows = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for m0 in range(0, n_queries, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n_queries
        tau = tl.load(tau_ptr + stat_base + rows, mask=row_ok, other=0.0)
        lse = tl.load(lse_ptr + stat_base + rows, mask=row_ok, other=0.0)
        nan_rows += (lse != lse).to(tl.int32)
        delta = lse    # a placeholder: without dk, ds is not formed
        if NEED_DK:
            delta = tl.load(delta_ptr + stat_base + rows, mask=row_ok, other=0.0)
        # The key rows are this program's own: a padded key's p / ds column reaches only its own dk / dv
        # row (never stored), so the key mask is left out (MASK_KEYS = False: fewer live registers).
        p, ds = _p_and_ds(q_base, stride_q_n, stride_q_d, k_base, stride_k_n, stride_k_d, v_base, stride_v_n,
                          stride_v_d, do_base, stride_do_n, stride_do_d, rows, cols,
                          n_queries, n_keys, head_dim, head_dim_v, scale, tau, lse, delta,
                          BLOCK_M, BLOCK_N, BLOCK_K, N_K, BLOCK_KV, N_KV, ACC, DOT, PREC, NEED_DK, False)
        if NEED_DV:
            do = load_rows(do_base, rows, n_queries, stride_do_n, stride_do_d, head_dim_v, BLOCK_DV)
            dv = mma(tl.trans(p), do, dv, DOT, PREC)
        if NEED_DK:
            q = load_rows(q_base, rows, n_queries, stride_q_n, stride_q_d, head_dim, BLOCK_D)
            dk = mma(tl.trans(ds), q, dk, DOT, PREC)
    # The stores address the same rows counted from this program's first key: with the loads' row
    # indices their masks would be the k / v loads' masks, computed once before the loop and held through
    # it, which makes ptxas spill those predicates.
    first = pid_n * BLOCK_N
    own = tl.arange(0, BLOCK_N)
    if NEED_DK:
        store_rows(dk_ptr + b * stride_dk_b + h * stride_dk_h + first * stride_dk_n, dk * scale, own,
                   n_keys - first, stride_dk_n, stride_dk_d, head_dim, BLOCK_D)
    if NEED_DV:
        # A NaN row (lse NaN) has p = NaN at every key, dropped ones too (the reference's softmax): every dv
        # of the head is NaN. Applied here, per head, instead of as a NaN in every p of the row.
        dv = tl.where(tl.sum(nan_rows, axis=0) > 0, float("nan"), dv)
        store_rows(dv_ptr + b * stride_dv_b + h * stride_dv_h + first * stride_dv_n, dv, own, n_keys - first,
                   stride_dv_n, stride_dv_d, head_dim_v, BLOCK_DV)
