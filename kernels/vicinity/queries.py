"""The backward's query-side passes: dq, the row weights, and the fused query pass.

With rs = 1/den and rz = -(dO . o)/den per query row (den, S, z: the forward's, see launch_backward.py):
    dq_i  = phi'(q_i) * (rs_i sum_m P_m(i) S_m dO_i + rz_i sum_m P_m(i) z_m)        [D]  (contract over Dv)
    dS_m += sum_i P_m(i) rs_i phi(q_i) dO_i^T,  dz_m += sum_i P_m(i) rz_i phi(q_i)    (state.py's state pass)
and dO_i . o_i = phi(q_i) . (sum_m P_m(i) S_m dO_i) / den_i from dq's own accumulator (o is not read).

``dq_pass_kernel`` (the dq pass; dk and dv come from the key pass, keys.py):
    out_i = out_scale * phi'(x_i) * (rs_i sum_m P_m(i) M_m y_i + rz_i sum_m P_m(i) z_m)   [D]
    with x = q, y = dO. It computes rs, rz itself (1/den and dO.o: ``ROWS_FROM_ACC`` from its
    accumulator when D fits one tile, ``ROWS_COMPUTE`` from dO and o otherwise) and writes them for the
    state pass that follows; the clamped backward's dq loads them (``ROWS_LOAD``).
``row_weights_kernel`` (when dq is not wanted): the same rs, rz (0 where the floor is active), from the
    same helpers (``row_delta``, ``row_weights``).
``query_pass_kernel`` (the fused query pass): dq and the state gradients in one launch,
    reading q and dO once. A program owns one (batch*head, chunk) and walks its chunk's token blocks as
    the state pass does: each block of q and dO is loaded once and serves both the dq rows (written at
    once) and the stacked state GEMM (state.py's ``accumulate_states``); the row weights never leave
    registers (the separate passes read q and dO twice and write / read rs, rz in between). The states
    go out as state.py's do (``finish_states``: the same last-program, fixed-order chunk reduction). Head dims of
    one tile each (D <= BLOCK_D, DV <= BLOCK_DV): dq contracts over all of Dv and dS needs every (D, Dv)
    tile, so wider heads keep the separate passes (launch_backward.py decides).
    Resident form (RESIDENT > 0, sm_90 launches where the tiles fit: configs.resident_query_features):
    the S_m tiles of the first RESIDENT features are loaded once per program, before the token loop,
    converted to the dot operand, and kept on chip (shared memory on sm_90) for every block's dq dots;
    the rest stream from L2 per block as in the streaming form, in the same feature order, so both forms
    give bitwise the same results. With every feature resident the token loads are pipelined.
    Every value is computed by the same helpers, in the same order, as by the separate passes; the dq
    dots take the state pass's tiles here, so a rare dq element may round differently
    (tests/vicinity/test_query_pass.py bounds how many).
States M [BH, F, D, Dv] and z [BH, F, D] are contiguous in the accumulation dtype ACC (M may be a copy
in the dot operand dtype). VARLEN (packed sequences): as in output.py, over the query side.
"""
import triton
import triton.language as tl

from ..common import dot_operand, feature_map, mma, mma_rows, mul_feature_map_grad, mul_feature_map_grad_of_phi
from ..runtime import launch_jit
from .clamp import without_floor_rows
from .frames import frame_block
from .positions import position_axes, select_position_feature
from .state import accumulate_states, feature_columns, finish_states
from .varlen import token_block

# How dq_pass_kernel gets its row weights (constexpr ROWS): loaded (the clamped backward's dq,
# clamp.py), or computed in the kernel and written out for the state pass (no separate row-weights
# launch). ROWS_COMPUTE takes dO . o from dO and o; ROWS_FROM_ACC (the head dim D in one tile) from the
# kernel's own accumulator, without reading o or dO again:
#     dO_i . o_i = sum_m P_m(i) phi(q_i) . (S_m dO_i) / den_i = phi(q_i) . acc_i / den_i.
ROWS_LOAD = tl.constexpr(1)
ROWS_COMPUTE = tl.constexpr(2)
ROWS_FROM_ACC = tl.constexpr(3)


@triton.jit
def row_delta(do_base, o_base, offs_n, mask_n, DV, stride_do_n, stride_do_d, stride_o_n, stride_o_d,
              BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, ACC: tl.constexpr):
    """delta = dO . o [BLOCK_N] (ACC) of the rows offs_n (under mask_n), summed over the Dv tiles in order:
    dO at do_base, o at o_base."""
    delta = tl.zeros((BLOCK_N,), ACC)
    for e0 in range(0, DV, BLOCK_DV):
        offs_e = e0 + tl.arange(0, BLOCK_DV)
        mask = mask_n[:, None] & (offs_e[None, :] < DV)
        g = tl.load(do_base + offs_n[:, None] * stride_do_n + offs_e[None, :] * stride_do_d, mask=mask,
                    other=0.0).to(ACC)
        o = tl.load(o_base + offs_n[:, None] * stride_o_n + offs_e[None, :] * stride_o_d, mask=mask,
                    other=0.0).to(ACC)
        delta += tl.sum(g * o, axis=1)
    return delta


@triton.jit
def row_weights(delta, den, den_floor, eps):
    """(rs, rz) = (1 / den, -delta / den) per row, rz = 0 where the floor is active (den = den_floor + eps:
    den carries no gradient there; den_floor, eps scaled like den). den_floor may be a scalar tensor
    (the packed launches' den_floor * factor[seq]): it is broadcast to den's shape here, since the
    interpreter cannot '&' a loaded scalar's comparison."""
    rs = 1.0 / den
    return rs, without_floor_rows(-delta * rs, den, tl.zeros_like(den) + den_floor, eps)


@triton.jit
def dq_feature(y, acc, M, m_base, axes, offs_d, mask_d, offs_e, mask_e, D, DV,
               N_FEAT: tl.constexpr, N_AXES: tl.constexpr, VARIANT: tl.constexpr,
               HAS_PREFIX: tl.constexpr, IS_QUERY: tl.constexpr, ACC: tl.constexpr,
               DOT: tl.constexpr, PREC: tl.constexpr):
    """acc += P_M * (y @ M_M[d tile, dv tile]^T).

    With TF32 dots (fp16 and fp32 inputs) P_M scales the product, not the operand y: y (dO) is
    an input, exact as a TF32 operand, while y * P_M would be rounded. With dO constant along a row
    that rounding error is the same for the whole row, and dq = phi' (S g + z c) cancels its two
    terms: a rounded S g against the exact fp32 z c loses the cancellation. bf16 dots keep the product
    in the operand: the extra fp32 tile spills on sm_80.
    """
    p = select_position_feature(axes, M, N_FEAT, N_AXES, VARIANT, HAS_PREFIX, IS_QUERY, ACC)
    state = tl.load(m_base + M * D * DV + offs_d[:, None] * DV + offs_e[None, :],
                    mask=mask_d[:, None] & mask_e[None, :], other=0.0)
    return dq_feature_dot(y, acc, p, state, DOT, PREC)


@triton.jit
def dq_feature_dot(y, acc, p, state, DOT: tl.constexpr, PREC: tl.constexpr):
    """acc += p * (y @ state^T) for one feature's position weights p [BLOCK_N] and state tile
    [BLOCK_D, BLOCK_DV] (as loaded, or kept on chip as ``dot_operand`` gives it: the same product)."""
    if DOT == tl.bfloat16 or PREC == "emulate_bf16":
        return mma(y * p[:, None], tl.trans(state), acc, DOT, PREC)
    else:
        return mma_rows(y, tl.trans(state), acc, p, DOT, PREC)


@triton.jit
def _dq_tile(y_base, m_base, acc, axes, offs_n, mask_n, offs_d, mask_d, e0, D, DV,
             stride_y_n, stride_y_d, N_FEAT: tl.constexpr, N_AXES: tl.constexpr, VARIANT: tl.constexpr,
             HAS_PREFIX: tl.constexpr, IS_QUERY: tl.constexpr, BLOCK_DV: tl.constexpr,
             ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """Adds sum_m P_m(i) y_i M_m^T over one Dv tile to acc [BLOCK_N, BLOCK_D]."""
    offs_e = e0 + tl.arange(0, BLOCK_DV)
    mask_e = offs_e < DV
    y = tl.load(y_base + offs_n[:, None] * stride_y_n + offs_e[None, :] * stride_y_d,
                mask=mask_n[:, None] & mask_e[None, :], other=0.0).to(ACC)
    return dq_features(y, acc, m_base, axes, offs_d, mask_d, offs_e, mask_e, D, DV, N_FEAT, N_AXES, VARIANT,
                       HAS_PREFIX, IS_QUERY, ACC, DOT, PREC)


@triton.jit
def dq_features(y, acc, m_base, axes, offs_d, mask_d, offs_e, mask_e, D, DV, N_FEAT: tl.constexpr,
                N_AXES: tl.constexpr, VARIANT: tl.constexpr, HAS_PREFIX: tl.constexpr,
                IS_QUERY: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """acc [BLOCK_N, BLOCK_D] += sum_m P_m y M_m[d tile, dv tile]^T for the y [BLOCK_N, BLOCK_DV] tile (ACC)."""
    if N_FEAT == 1:  # see output.py's _output_tile
        for M in tl.static_range(N_FEAT):
            acc = dq_feature(y, acc, M, m_base, axes, offs_d, mask_d, offs_e, mask_e, D, DV,
                             N_FEAT, N_AXES, VARIANT, HAS_PREFIX, IS_QUERY, ACC, DOT, PREC)
    else:
        for M in tl.range(N_FEAT, loop_unroll_factor=1, num_stages=1):
            acc = dq_feature(y, acc, M, m_base, axes, offs_d, mask_d, offs_e, mask_e, D, DV,
                             N_FEAT, N_AXES, VARIANT, HAS_PREFIX, IS_QUERY, ACC, DOT, PREC)
    return acc


@triton.jit
def weigh_dq_rows(acc, rs, rz, axes, z_base, offs_d, mask_d, D, N_FEAT: tl.constexpr, N_AXES: tl.constexpr,
                  VARIANT: tl.constexpr, HAS_PREFIX: tl.constexpr, IS_QUERY: tl.constexpr, ACC: tl.constexpr):
    """rs_i acc_i + rz_i sum_m P_m(i) z_m[d tile]: dq before phi' (acc = sum_m P_m S_m dO, z at z_base)."""
    acc = acc * rs[:, None]
    # The z term goes straight into acc (no second BLOCK_N x BLOCK_D tile: registers are tight).
    for M in tl.static_range(N_FEAT):
        p = select_position_feature(axes, M, N_FEAT, N_AXES, VARIANT, HAS_PREFIX, IS_QUERY, ACC) * rz
        zm = tl.load(z_base + M * D + offs_d, mask=mask_d, other=0.0)
        acc += p[:, None] * zm[None, :]
    return acc


@launch_jit
def dq_pass_kernel(
    # pointers: tokens x (q) and y (dO), states M and z, row weights rs / rz, o, den, output out (dq)
    x_ptr, y_ptr, m_ptr, z_ptr, rs_ptr, rz_ptr, o_ptr, den_ptr, out_ptr,
    # sizes (H, N, grid_*: runtime, never specialised) and scalars
    H, N, D, DV, n_prefix, grid_0, grid_1, grid_2, out_scale, den_floor, eps,
    # strides
    stride_x_b, stride_x_h, stride_x_n, stride_x_d, stride_y_b, stride_y_h, stride_y_n, stride_y_d,
    stride_o_b, stride_o_h, stride_o_n, stride_o_d, stride_out_b, stride_out_h, stride_out_n, stride_out_d,
    # constexprs: geometry, row-weights mode, tiles, dot precision
    N_FEAT: tl.constexpr, N_AXES: tl.constexpr, VARIANT: tl.constexpr, HAS_PREFIX: tl.constexpr,
    IS_QUERY: tl.constexpr, FMAP: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
    # packed (varlen) launches only: the sequence table and the per-sequence factors
    seq_ptr=None, factor_ptr=None, VARLEN: tl.constexpr = False,
    # frame-causal launches only (frames.py): slots and their token counts
    n_slots=None, slot0_len=None, frame_len=None, blocks_per_slot=None, FRAMES: tl.constexpr = False,
):
    """Grid (cdiv(N, BLOCK_N), BH, n_d_tiles). x [B, H, N, D], y [B, H, N, DV], out [B, H, N, D] strided;
    rs, rz [BH, N] ACC: read (ROWS_LOAD), or computed here (ROWS_COMPUTE / ROWS_FROM_ACC: y = dO, den
    [BH, N] ACC, den_floor and eps scaled like den; ROWS_COMPUTE also reads o [B, H, N, DV] strided;
    written by the first D tile). ROWS_FROM_ACC needs D <= BLOCK_D.
    VARLEN: grid (cdiv(longest sequence, BLOCK_N), S * H, n_d_tiles); factor[seq]
    multiplies den_floor and eps when the row weights are computed here, else out_scale.
    FRAMES (frames.py): grid (n_slots * blocks_per_slot, BH, n_d_tiles); a query of slot s reads the states M
    [BH, n_slots, F, D, DV], z [BH, n_slots, F, D] at row bh * n_slots + s."""
    if FRAMES:
        bh, b, h, offs_n, mask_n, slot, start, active = frame_block(H, slot0_len, frame_len, blocks_per_slot,
                                                                    BLOCK_N)
        if not active:
            return
        state_row = bh.to(tl.int64) * n_slots + slot
        n_prefix = n_prefix - start
    else:
        bh, b, h, offs_n, mask_n, start, active, grid_0, grid_1, grid_2 = token_block(
            H, N, grid_0, grid_1, grid_2, seq_ptr, BLOCK_N, IS_QUERY, VARLEN)
        state_row = bh.to(tl.int64)
    d0 = tl.program_id(2) * BLOCK_D
    m_base = m_ptr + state_row * N_FEAT * D * DV
    z_base = z_ptr + state_row * N_FEAT * D
    y_base = y_ptr + b * stride_y_b + h * stride_y_h
    offs_d = d0 + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    if VARLEN:
        if not active:
            return
        y_base = y_ptr + h * stride_y_h + start * stride_y_n
        # The other pointers move into the sequence's window (tokens from start, rows h * N + start of
        # the [H, N] buffers) where they are used, not here: held across the loop, they cost registers
        # the kernel parameters do not.
    if FRAMES:
        y_base += start * stride_y_n

    # Every feature is picked from the same per-axis cos / sin: computed once per program, not per feature.
    axes = position_axes(offs_n, n_prefix, grid_0, grid_1, grid_2, N_AXES, VARIANT, HAS_PREFIX, ACC)
    acc = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    for e0 in range(0, DV, BLOCK_DV):
        acc = _dq_tile(y_base, m_base, acc, axes, offs_n, mask_n, offs_d, mask_d, e0, D, DV,
                       stride_y_n, stride_y_d, N_FEAT, N_AXES, VARIANT, HAS_PREFIX, IS_QUERY, BLOCK_DV, ACC, DOT, PREC)
    if VARLEN:
        rows = h * N + start
        x_base = x_ptr + h * stride_x_h + start * stride_x_n
    elif FRAMES:
        rows = bh * N + start
        x_base = x_ptr + b * stride_x_b + h * stride_x_h + start * stride_x_n
    else:
        rows = bh * N   # B * H * N < 2^31: checked by the library
        x_base = x_ptr + b * stride_x_b + h * stride_x_h
    mask = mask_n[:, None] & mask_d[None, :]
    if ROWS == ROWS_FROM_ACC:
        # q in its own dtype until phi' is applied: half the registers of phi in ACC (the dq pass sits at
        # the 255-register limit on sm_80).
        x = tl.load(x_base + offs_n[:, None] * stride_x_n + offs_d[None, :] * stride_x_d, mask=mask, other=0.0)
    if ROWS == ROWS_COMPUTE or ROWS == ROWS_FROM_ACC:
        if ROWS == ROWS_FROM_ACC:
            den = tl.load(den_ptr + rows + offs_n, mask=mask_n, other=1.0)
            delta = tl.sum(feature_map(x.to(ACC), mask, FMAP) * acc, axis=1) / den
        else:
            # After the main loop, as its own loop over the Dv tiles (their dO tiles come again, from
            # L2): summed inside or ahead of the main loop, it makes ptxas spill.
            if VARLEN:
                o_base = o_ptr + h * stride_o_h + start * stride_o_n
            else:
                o_base = o_ptr + b * stride_o_b + h * stride_o_h
            if FRAMES:
                o_base += start * stride_o_n
            delta = row_delta(y_base, o_base, offs_n, mask_n, DV, stride_y_n, stride_y_d, stride_o_n, stride_o_d,
                              BLOCK_N, BLOCK_DV, ACC)
            den = tl.load(den_ptr + rows + offs_n, mask=mask_n, other=1.0)
        if VARLEN:
            factor = tl.load(factor_ptr + bh // H)
            den_floor = den_floor * factor
            eps = eps * factor
        rs, rz = row_weights(delta, den, den_floor, eps)
        # Every D tile computes them (they are needed here); the first one writes them.
        first = mask_n & ((offs_n * 0 + tl.program_id(2)) == 0)
        tl.store(rs_ptr + rows + offs_n, rs, mask=first)
        tl.store(rz_ptr + rows + offs_n, rz, mask=first)
    else:
        rs = tl.load(rs_ptr + rows + offs_n, mask=mask_n, other=0.0)
        rz = tl.load(rz_ptr + rows + offs_n, mask=mask_n, other=0.0)
    acc = weigh_dq_rows(acc, rs, rz, axes, z_base, offs_d, mask_d, D, N_FEAT, N_AXES, VARIANT, HAS_PREFIX, IS_QUERY,
                        ACC)
    if VARLEN and ROWS == ROWS_LOAD:
        out_scale = out_scale * tl.load(factor_ptr + bh // H)
    if ROWS != ROWS_FROM_ACC:
        x = tl.load(x_base + offs_n[:, None] * stride_x_n + offs_d[None, :] * stride_x_d, mask=mask, other=0.0)
    acc = mul_feature_map_grad(acc, x.to(ACC), FMAP) * out_scale
    if VARLEN:
        out_base = out_ptr + h * stride_out_h + start * stride_out_n
    else:
        out_base = out_ptr + b * stride_out_b + h * stride_out_h
    if FRAMES:
        out_base += start * stride_out_n
    tl.store(out_base + offs_n[:, None] * stride_out_n + offs_d[None, :] * stride_out_d,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@launch_jit
def row_weights_kernel(
    # pointers: dO, o, den, row weights rs / rz
    do_ptr, o_ptr, den_ptr, rs_ptr, rz_ptr,
    # sizes (H, N: runtime, never specialised) and scalars
    H, N, DV, den_floor, eps,
    # strides
    stride_do_b, stride_do_h, stride_do_n, stride_do_d, stride_o_b, stride_o_h, stride_o_n, stride_o_d,
    # constexprs: tiles, accumulation dtype
    BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, ACC: tl.constexpr,
    # packed (varlen) launches only: the sequence table and the per-sequence factors
    seq_ptr=None, factor_ptr=None, VARLEN: tl.constexpr = False,
):
    """rs_i = 1 / den_i, rz_i = -(dO_i . o_i) / den_i (0 where den_i = den_floor + eps: the floor is active
    and den carries no gradient; den_floor, eps scaled like den). Grid (cdiv(N, BLOCK_N), BH). dO, o [B, H, N, DV]
    strided; den, rs, rz [BH, N] ACC. VARLEN (over the queries): factor[seq] multiplies den_floor and eps."""
    bh, b, h, offs_n, mask_n, start, active, _grid_0, _grid_1, _grid_2 = token_block(
        H, N, 1, 1, 1, seq_ptr, BLOCK_N, True, VARLEN)
    if VARLEN:
        if not active:
            return
        factor = tl.load(factor_ptr + bh // H)
        den_floor = den_floor * factor
        eps = eps * factor
        # The sequence's window: batch 0, rows h * N + start of the [H, N] buffers (h is int64).
        b = b * 0
        do_ptr += start * stride_do_n
        o_ptr += start * stride_o_n
        row0 = h * N + start
    else:
        row0 = bh * N   # B * H * N < 2^31: checked by the library
    delta = row_delta(do_ptr + b * stride_do_b + h * stride_do_h, o_ptr + b * stride_o_b + h * stride_o_h, offs_n,
                      mask_n, DV, stride_do_n, stride_do_d, stride_o_n, stride_o_d, BLOCK_N, BLOCK_DV, ACC)
    den = tl.load(den_ptr + row0 + offs_n, mask=mask_n, other=1.0)
    rs, rz = row_weights(delta, den, den_floor, eps)
    tl.store(rs_ptr + row0 + offs_n, rs, mask=mask_n)
    tl.store(rz_ptr + row0 + offs_n, rz, mask=mask_n)


@launch_jit
def query_pass_kernel(
    # pointers: q, dO, the forward's states M (S) and z, den; outputs dq, dS and dz; the chunk partials;
    # election counters
    q_ptr, do_ptr, m_ptr, z_ptr, den_ptr, dq_ptr, ds_ptr, dz_ptr, s_part_ptr, z_part_ptr, count_ptr,
    # sizes (H, N, grid_*, blocks_per_chunk, n_chunks: runtime, never specialised) and scalars
    H, N, D, DV, n_prefix, grid_0, grid_1, grid_2, blocks_per_chunk, n_chunks, part_stride, scale, den_floor, eps,
    # strides
    stride_q_b, stride_q_h, stride_q_n, stride_q_d, stride_do_b, stride_do_h, stride_do_n, stride_do_d,
    stride_dq_b, stride_dq_h, stride_dq_n, stride_dq_d,
    # constexprs: geometry, tiles, dot precision, stacked-state shape
    N_FEAT: tl.constexpr, N_AXES: tl.constexpr, VARIANT: tl.constexpr, HAS_PREFIX: tl.constexpr,
    IS_QUERY: tl.constexpr, FMAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, ACC: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr, F_PAD: tl.constexpr, Z_COLS: tl.constexpr, CHUNKED: tl.constexpr,
    # a copy of dS in its dot operand dtype
    s_copy_ptr=None, COPY: tl.constexpr = False,
    # the features whose S tiles stay on chip across the token loop (module docstring) and that loop's
    # pipelining depth (None: the launch's num_stages)
    RESIDENT: tl.constexpr = 0, TOKEN_STAGES: tl.constexpr = None,
):
    """Grid (BH, n_chunks). q [B, H, N, D], dO [B, H, N, DV], dq [B, H, N, D] strided; S
    [BH, F, D, DV] (its own dtype: the dq dots' operand), z [BH, F, D] and den [BH, N] ACC; den_floor,
    eps scaled like den. Writes dq in its dtype and scale * dS [BH, N_FEAT, D, DV], dz [BH, N_FEAT, D]
    (ACC) as ``state_partial_kernel`` writes S and z: CHUNKED, through the chunk partials at s_part /
    z_part + c * part_stride and the last program of each bh (elected on count[bh]); COPY: dS also to
    s_copy. F_PAD, Z_COLS: as there. RESIDENT (0..F): the tiles S_m of the first RESIDENT features are
    loaded once, before the token loop, the others (and the z_m) per token block
    (``launch_forward.fused_query_options`` decides); the results are bitwise those of RESIDENT = 0."""
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = q_ptr + b * stride_q_b + h * stride_q_h
    do_base = do_ptr + b * stride_do_b + h * stride_do_h
    dq_base = dq_ptr + b * stride_dq_b + h * stride_dq_h
    m_base = m_ptr + bh.to(tl.int64) * N_FEAT * D * DV
    z_base = z_ptr + bh.to(tl.int64) * N_FEAT * D
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    mask_d = offs_d < D
    mask_e = offs_e < DV

    s_acc = tl.zeros((F_PAD * BLOCK_D, BLOCK_DV), ACC)
    z_acc = tl.zeros((F_PAD * BLOCK_D, Z_COLS), ACC)
    # The resident features' state tiles (the dq dots' operand, in shared memory on sm_90), loaded once:
    # a tuple, unrolled over at compile time.
    states = ()
    for m in tl.static_range(RESIDENT):
        states = states + (dot_operand(tl.load(m_base + m * D * DV + offs_d[:, None] * DV + offs_e[None, :],
                                               mask=mask_d[:, None] & mask_e[None, :], other=0.0), DOT, PREC),)
    first = chunk * blocks_per_chunk
    for blk in tl.range(first, first + blocks_per_chunk, num_stages=TOKEN_STAGES):
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask_x = mask_n[:, None] & mask_d[None, :]
        y = tl.load(do_base + offs_n[:, None] * stride_do_n + offs_e[None, :] * stride_do_d,
                    mask=mask_n[:, None] & mask_e[None, :], other=0.0)
        # q in its own dtype, issued beside dO: its latency overlaps the dq dots.
        x = tl.load(q_base + offs_n[:, None] * stride_q_n + offs_d[None, :] * stride_q_d, mask=mask_x, other=0.0)
        # den too: loaded where it is first needed, after the dq dots, it was a round trip of its own.
        den = tl.load(den_ptr + bh * N + offs_n, mask=mask_n, other=1.0)
        axes = position_axes(offs_n, n_prefix, grid_0, grid_1, grid_2, N_AXES, VARIANT, HAS_PREFIX, ACC)
        if RESIDENT > 0:
            acc = tl.zeros((BLOCK_N, BLOCK_D), ACC)
            for m in tl.static_range(RESIDENT):
                p = select_position_feature(axes, m, N_FEAT, N_AXES, VARIANT, HAS_PREFIX, IS_QUERY, ACC)
                acc = dq_feature_dot(y, acc, p, states[m], DOT, PREC)
            if RESIDENT < N_FEAT:
                for M in tl.range(RESIDENT, N_FEAT, loop_unroll_factor=1, num_stages=1):
                    acc = dq_feature(y, acc, M, m_base, axes, offs_d, mask_d, offs_e, mask_e, D, DV,
                                     N_FEAT, N_AXES, VARIANT, HAS_PREFIX, IS_QUERY, ACC, DOT, PREC)
        else:
            acc = dq_features(y, tl.zeros((BLOCK_N, BLOCK_D), ACC), m_base, axes, offs_d, mask_d,
                              offs_e, mask_e, D, DV, N_FEAT, N_AXES, VARIANT, HAS_PREFIX, IS_QUERY, ACC, DOT, PREC)
        phi = feature_map(x.to(ACC), mask_x, FMAP)
        rs, rz = row_weights(tl.sum(phi * acc, axis=1) / den, den, den_floor, eps)
        dq = weigh_dq_rows(acc, rs, rz, axes, z_base, offs_d, mask_d, D, N_FEAT, N_AXES, VARIANT, HAS_PREFIX,
                           IS_QUERY, ACC)
        # phi' from phi (bitwise the same as from x): x is dead once phi exists, a tile of registers less.
        tl.store(dq_base + offs_n[:, None] * stride_dq_n + offs_d[None, :] * stride_dq_d,
                 mul_feature_map_grad_of_phi(dq, phi, FMAP).to(dq_ptr.dtype.element_ty), mask=mask_x)
        # The state gradients of the block, weighted as the separate state pass weighs them (masked rows:
        # rs = 0 there, so a = 0 and w = 0).
        rs = tl.where(mask_n, rs, 0.0)
        w = tl.where(mask_n, rz / tl.where(mask_n, rs, 1.0), 0.0)
        p = feature_columns(offs_n, n_prefix, grid_0, grid_1, grid_2, F_PAD, N_FEAT, N_AXES, VARIANT, HAS_PREFIX,
                            IS_QUERY, ACC)
        s_acc, z_acc = accumulate_states(phi * rs[:, None], y, p, w, s_acc, z_acc, F_PAD, Z_COLS, BLOCK_N,
                                         BLOCK_D, DOT, PREC)
    finish_states(s_acc, z_acc, ds_ptr, dz_ptr, s_part_ptr, z_part_ptr, count_ptr, bh, chunk, n_chunks, part_stride,
                  bh, 0, 0, 0, D, DV, scale, N_FEAT, F_PAD, Z_COLS, BLOCK_D, BLOCK_DV, CHUNKED, s_copy_ptr, COPY)
