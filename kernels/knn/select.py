"""Selection pass: tau_i, the topk-th largest score of each query row, without storing the row.

Bisection over the bits of the scores' order-preserving keys (``tiles.order_key``), most significant
first: the answer is built bit by bit as the largest key t with #{j: key_ij >= t} >= topk, which is
exactly the topk-th largest key of the row. Each of the NBITS steps (32 for fp32 scores, 64 for
fp64) counts over the row; the scores are recomputed from q and k per step (a dot per key tile)
unless the whole row fits one key tile (ROW_ON_CHIP), in which case the keys are computed once and
the bisection runs on the tile in registers.
"""
import triton
import triton.language as tl

from .tiles import key_to_score, order_key, score_tile


@triton.jit
def knn_threshold_kernel(
    # pointers: q, k; output tau
    q_ptr, k_ptr, tau_ptr,
    # strides
    stride_q_b, stride_q_h, stride_q_n, stride_q_d, stride_k_b, stride_k_h, stride_k_n, stride_k_d,
    # sizes, topk and the score scale
    n_heads, n_queries, n_keys, head_dim, topk, scale,
    # constexprs: tiles, row-dot chunks, dot precision, order-key type, whether a row fits one key tile
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, N_K: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
    KEY: tl.constexpr, NBITS: tl.constexpr, ROW_ON_CHIP: tl.constexpr,
):
    """grid (cdiv(Nq, BLOCK_M), B * H): tau [B*H, Nq] (ACC) for one block of query rows."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // n_heads).to(tl.int64), (bh % n_heads).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_base, k_base = q_ptr + b * stride_q_b + h * stride_q_h, k_ptr + b * stride_k_b + h * stride_k_h
    # 1 << (NBITS - 1) built by a shift in KEY: a literal 2**63 would not fit a signed constant.
    top_bit = tl.full((BLOCK_M,), 1, dtype=KEY) << (NBITS - 1)
    answer = tl.zeros((BLOCK_M,), dtype=KEY)
    # score_tile's mask without the cut (CUT = False): only the tile's real entries; its tau argument is
    # unused here (scale stands in).
    if ROW_ON_CHIP:
        cols = tl.arange(0, BLOCK_N)
        s, valid = score_tile(q_base, rows, n_queries, stride_q_n, stride_q_d, k_base, cols, n_keys, stride_k_n,
                              stride_k_d, head_dim, scale, scale, BLOCK_M, BLOCK_N, BLOCK_K, N_K, ACC, DOT, PREC, False,
                              True)
        key = order_key(s, top_bit[:, None])
        for i in range(NBITS):
            cand = answer | (top_bit >> i)
            count = tl.sum(((key >= cand[:, None]) & valid).to(tl.int32), axis=1)
            answer = tl.where(count >= topk, cand, answer)
    else:
        for i in range(NBITS):
            cand = answer | (top_bit >> i)
            count = tl.zeros((BLOCK_M,), dtype=tl.int32)
            for n0 in range(0, n_keys, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                s, valid = score_tile(q_base, rows, n_queries, stride_q_n, stride_q_d, k_base, cols, n_keys,
                                      stride_k_n, stride_k_d, head_dim, scale, scale, BLOCK_M, BLOCK_N, BLOCK_K, N_K,
                                      ACC, DOT, PREC, False, True)
                hit = (order_key(s, top_bit[:, None]) >= cand[:, None]) & valid
                count += tl.sum(hit.to(tl.int32), axis=1)
            answer = tl.where(count >= topk, cand, answer)
    tau = key_to_score(answer, top_bit, ACC)
    tl.store(tau_ptr + bh.to(tl.int64) * n_queries + rows, tau, mask=rows < n_queries)
