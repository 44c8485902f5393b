"""The backward query pass in one launch: dq and the state gradients' chunk partials, reading q and dO once.

With rs = 1/den and rz = -(dO . o)/den per query row (den, S, z: the forward's, see backward.py):
    dq_i  = phi'(q_i) * (rs_i sum_m P_m(i) S_m dO_i + rz_i sum_m P_m(i) z_m)        (contract.py's dq pass)
    dS_m += sum_i P_m(i) rs_i phi(q_i) dO_i^T,  dz_m += sum_i P_m(i) rz_i phi(q_i)    (state.py's state pass)
and dO_i . o_i = phi(q_i) . (sum_m P_m(i) S_m dO_i) / den_i from dq's own accumulator (o is not read).

A program owns one (batch*head, chunk) and walks its chunk's token blocks as the state pass does: each
block of q and dO is loaded once and serves both the dq rows (written at once) and the stacked state
GEMM (state.py's ``accumulate_states``); the row weights never leave registers. The separate passes
read q and dO twice and wrote / read rs, rz in between. The partials go out as state.py's do
(``store_state_partials``), for the same fixed-order reduction. Head dims of one tile each (D <=
BLOCK_D, DV <= BLOCK_DV): dq contracts over all of Dv and dS needs every (D, Dv) tile, so wider heads
keep the separate passes (backward.py decides). Every value is computed by the same helpers, in the
same order, as by the separate passes; the dq dots take the state pass's tiles here, so a rare dq
element may round differently (tests/vicinity/test_query_pass.py bounds how many).
"""
import triton.language as tl

from ..common import feature_map, mul_feature_map_grad
from ..runtime import launch_jit
from .contract import contract_dv_features, row_weights, weigh_dq_rows
from .positions import position_axes
from .state import accumulate_states, feature_columns, store_state_partials


@launch_jit
def query_pass_kernel(q_ptr, do_ptr, m_ptr, z_ptr, den_ptr, dq_ptr, s_part_ptr, z_part_ptr,
                      H, N, D, DV, n_prefix, s0, s1, s2, blocks_per_chunk, part_stride, scale, den_floor, eps,
                      sqb, sqh, sqn, sqd, sgb, sgh, sgn, sgd, sab, sah, san, sad,
                      N_FEAT: tl.constexpr, N_AXES: tl.constexpr, VARIANT: tl.constexpr,
                      HAS_PREFIX: tl.constexpr, IS_QUERY: tl.constexpr, FMAP: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, ACC: tl.constexpr,
                      DOT: tl.constexpr, PREC: tl.constexpr, F_PAD: tl.constexpr, Z_COLS: tl.constexpr,
                      s_copy_ptr=None, COPY: tl.constexpr = False):
    """Grid (BH, n_chunks). q [B, H, N, D], dO [B, H, N, DV], dq [B, H, N, D] (strides sa*) strided; S
    [BH, F, D, DV] (its own dtype: the dq dots' operand), z [BH, F, D] and den [BH, N] ACC; den_floor,
    eps scaled like den. Writes dq in its dtype and scale * chunk c's dS, dz partials to s_part / z_part
    + c * part_stride ([BH, N_FEAT, D, DV] and [BH, N_FEAT, D], ACC), as ``state_partial_kernel`` does
    (COPY: dS also to s_copy). F_PAD, Z_COLS: as there."""
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = q_ptr + b * sqb + h * sqh
    do_base = do_ptr + b * sgb + h * sgh
    dq_base = dq_ptr + b * sab + h * sah
    m_base = m_ptr + bh.to(tl.int64) * N_FEAT * D * DV
    z_base = z_ptr + bh.to(tl.int64) * N_FEAT * D
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    mask_d = offs_d < D
    mask_e = offs_e < DV

    s_acc = tl.zeros((F_PAD * BLOCK_D, BLOCK_DV), ACC)
    z_acc = tl.zeros((F_PAD * BLOCK_D, Z_COLS), ACC)
    first = chunk * blocks_per_chunk
    for blk in range(first, first + blocks_per_chunk):
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask_x = mask_n[:, None] & mask_d[None, :]
        y = tl.load(do_base + offs_n[:, None] * sgn + offs_e[None, :] * sgd, mask=mask_n[:, None] & mask_e[None, :],
                    other=0.0)
        axes = position_axes(offs_n, n_prefix, s0, s1, s2, N_AXES, VARIANT, HAS_PREFIX, ACC)
        acc = contract_dv_features(y, tl.zeros((BLOCK_N, BLOCK_D), ACC), m_base, axes, offs_d, mask_d,
                                   offs_e, mask_e, D, DV, N_FEAT, N_AXES, VARIANT, HAS_PREFIX, IS_QUERY, ACC, DOT,
                                   PREC)
        x = tl.load(q_base + offs_n[:, None] * sqn + offs_d[None, :] * sqd, mask=mask_x, other=0.0).to(ACC)
        phi = feature_map(x, mask_x, FMAP)
        den = tl.load(den_ptr + bh * N + offs_n, mask=mask_n, other=1.0)
        rs, rz = row_weights(tl.sum(phi * acc, axis=1) / den, den, den_floor, eps)
        dq = weigh_dq_rows(acc, rs, rz, axes, z_base, offs_d, mask_d, D, N_FEAT, N_AXES, VARIANT, HAS_PREFIX,
                           IS_QUERY, ACC)
        tl.store(dq_base + offs_n[:, None] * san + offs_d[None, :] * sad,
                 mul_feature_map_grad(dq, x, FMAP).to(dq_ptr.dtype.element_ty), mask=mask_x)
        # The state gradients of the block, weighted as the separate state pass weighs them (masked rows:
        # rs = 0 there, so a = 0 and w = 0).
        rs = tl.where(mask_n, rs, 0.0)
        w = tl.where(mask_n, rz / tl.where(mask_n, rs, 1.0), 0.0)
        p = feature_columns(offs_n, n_prefix, s0, s1, s2, F_PAD, N_FEAT, N_AXES, VARIANT, HAS_PREFIX, IS_QUERY, ACC)
        s_acc, z_acc = accumulate_states(phi * rs[:, None], y, p, w, s_acc, z_acc, F_PAD, Z_COLS, BLOCK_N,
                                         BLOCK_D, DOT, PREC)
    store_state_partials(s_acc, z_acc, s_part_ptr, z_part_ptr, chunk, part_stride, bh, 0, 0, 0, D, DV, scale, N_FEAT,
                         F_PAD, Z_COLS, BLOCK_D, BLOCK_DV, s_copy_ptr, COPY)
