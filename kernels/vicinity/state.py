"""State kernels: per-chunk partial states and their fixed-order reduction by the last program.

Forward (x = k, y = v, no row weights):
    S_m = sum_j P_m(j) phi(k_j) v_j^T   [D, Dv],   z_m = sum_j P_m(j) phi(k_j)   [D]
Backward query pass (x = q, y = dO, row weights rs = 1/den, rz = -(dO.o)/den):
    dS_m = sum_i P_m(i) phi(q_i) rs_i dO_i^T,    dz_m = sum_i P_m(i) phi(q_i) rz_i
Each program owns one (chunk, batch*head, D tile, Dv tile) and computes ALL F states of it in one
pass over its tokens: every token block of x and y is read once, phi(x) and the position features
are computed once per token, and the F states come out of one stacked GEMM
    [F_PAD * BLOCK_D, BLOCK_N] x [BLOCK_N, BLOCK_DV]
whose left operand holds the F position-weighted copies of phi(x)^T (F_PAD = F rounded up to a power
of two; the padding features are zero and never stored). z comes from the same stacked operand times
a [BLOCK_N, Z_COLS] column block whose first column is the token weight (1, or rz / rs in the
backward) and the rest zeros (Z_COLS = 16, the smallest dot operand): a second, narrow tensor-core
dot instead of a cross-warp reduction per token block, and z rounded exactly as S is.
With several chunks per (bh, D tile, Dv tile) group, each program writes its chunk's partials and the
group's last program to finish, elected by one atomic increment of a per-group counter, sums them in
chunk order and writes the states (``finish_states``): no reduction launch, and bitwise reproducible,
since the atomic decides only who sums, never the order or the operands. With a single chunk the
program applies the scale and writes the states directly.

VARLEN (packed sequences, see varlen.py): a program's bh is (sequence, head); it reads its sequence's
window, scales by its sequence's factor, and a chunk past its sequence's chunk count exits at once;
the election counts the sequence's own chunks.
"""
import triton
import triton.language as tl

from ..common import feature_map, mma
from ..runtime import launch_jit
from .frames import frame_span
from .positions import position_feature
from .varlen import sequence_window


@triton.jit
def feature_columns(offs_n, n_prefix, grid_0, grid_1, grid_2, COLS: tl.constexpr, N_FEAT: tl.constexpr,
                    N_AXES: tl.constexpr, VARIANT: tl.constexpr, HAS_PREFIX: tl.constexpr,
                    IS_QUERY: tl.constexpr, ACC: tl.constexpr):
    """[BLOCK_N, COLS] position features of the tokens offs_n: column m is P_m (0 for m >= N_FEAT)."""
    feat = tl.arange(0, COLS)[None, :]
    p = position_feature(offs_n[:, None], feat, n_prefix, grid_0, grid_1, grid_2, N_FEAT, N_AXES, VARIANT, HAS_PREFIX,
                         IS_QUERY, ACC)
    return tl.where(feat < N_FEAT, p, 0.0)


@triton.jit
def _state_block(x_ptr, y_ptr, rs_ptr, rz_ptr, s_acc, z_acc, bh, n0, N, D, DV, n_prefix, grid_0, grid_1, grid_2,
                 d0, e0, stride_x_n, stride_x_d, stride_y_n, stride_y_d,
                 N_FEAT: tl.constexpr, F_PAD: tl.constexpr, Z_COLS: tl.constexpr, N_AXES: tl.constexpr,
                 VARIANT: tl.constexpr, HAS_PREFIX: tl.constexpr, IS_QUERY: tl.constexpr, FMAP: tl.constexpr,
                 ROW_WEIGHTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DV: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                 n_seq=None, row0=None, VARLEN: tl.constexpr = False):
    """Adds one BLOCK_N slice of tokens to the stacked [F_PAD * BLOCK_D, BLOCK_DV] state tile (row
    m * BLOCK_D + d: feature m, head row d) and to the [F_PAD * BLOCK_D, Z_COLS] z tile (z in column 0).
    VARLEN: ``n_seq`` tokens in the window, row weights at ``row0`` (else N tokens, rows at bh * N)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = d0 + tl.arange(0, BLOCK_D)
    offs_e = e0 + tl.arange(0, BLOCK_DV)
    if VARLEN:
        mask_n = offs_n < n_seq
    else:
        mask_n = offs_n < N
    mask_x = mask_n[:, None] & (offs_d[None, :] < D)
    x = tl.load(x_ptr + offs_n[:, None] * stride_x_n + offs_d[None, :] * stride_x_d, mask=mask_x,
                other=0.0).to(ACC)
    y = tl.load(y_ptr + offs_n[:, None] * stride_y_n + offs_e[None, :] * stride_y_d,
                mask=mask_n[:, None] & (offs_e[None, :] < DV), other=0.0)
    a = feature_map(x, mask_x, FMAP)
    p = feature_columns(offs_n, n_prefix, grid_0, grid_1, grid_2, F_PAD, N_FEAT, N_AXES, VARIANT, HAS_PREFIX,
                        IS_QUERY, ACC)
    # z's column: z_m = sum_n stacked[n, m] * w_n with w = 1 (forward) or rz / rs (backward, where the
    # stacked operand carries rs), so z comes from the same rounded operand as S.
    if ROW_WEIGHTS:
        if VARLEN:
            rs = tl.load(rs_ptr + row0 + offs_n, mask=mask_n, other=0.0)
            rz = tl.load(rz_ptr + row0 + offs_n, mask=mask_n, other=0.0)
        else:
            rs = tl.load(rs_ptr + bh * N + offs_n, mask=mask_n, other=0.0)
            rz = tl.load(rz_ptr + bh * N + offs_n, mask=mask_n, other=0.0)
        a = a * rs[:, None]
        w = tl.where(mask_n, rz / tl.where(mask_n, rs, 1.0), 0.0)
    else:
        w = tl.where(mask_n, 1.0, 0.0)
    return accumulate_states(a, y, p, w, s_acc, z_acc, F_PAD, Z_COLS, BLOCK_N, BLOCK_D, DOT, PREC)


@triton.jit
def accumulate_states(a, y, p, w, s_acc, z_acc, F_PAD: tl.constexpr, Z_COLS: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """s_acc += the stacked [F_PAD * BLOCK_D, BLOCK_N] operand (column m * BLOCK_D + d of its transpose:
    p[:, m] a[:, d]) times y [BLOCK_N, BLOCK_DV]; z_acc += the same operand times the column block whose
    first column is the token weight w [BLOCK_N] (0 for masked tokens) and the rest zeros."""
    cols = tl.arange(0, Z_COLS)[None, :]
    ones = tl.where(cols == 0, w[:, None], 0.0)
    stacked = tl.trans(tl.reshape(a[:, None, :] * p[:, :, None], (BLOCK_N, F_PAD * BLOCK_D)))
    s_acc = mma(stacked, y, s_acc, DOT, PREC)
    z_acc = mma(stacked, ones, z_acc, DOT, PREC)
    return s_acc, z_acc


@launch_jit
def state_partial_kernel(
    # pointers: tokens x and y, row weights rs / rz; outputs S and z; the chunk partials; election counters
    x_ptr, y_ptr, rs_ptr, rz_ptr, s_ptr, z_ptr, s_part_ptr, z_part_ptr, count_ptr,
    # sizes (H, N, grid_*, blocks_per_chunk, n_chunks: runtime, never specialised) and scalars
    H, N, D, DV, n_prefix, grid_0, grid_1, grid_2, blocks_per_chunk, n_chunks, part_stride, scale,
    # strides
    stride_x_b, stride_x_h, stride_x_n, stride_x_d, stride_y_b, stride_y_h, stride_y_n, stride_y_d,
    # constexprs: geometry, row weights, tiles, dot precision, stacked-state shape, chunking
    N_FEAT: tl.constexpr, N_AXES: tl.constexpr, VARIANT: tl.constexpr, HAS_PREFIX: tl.constexpr,
    IS_QUERY: tl.constexpr, FMAP: tl.constexpr, ROW_WEIGHTS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
    PREC: tl.constexpr, F_PAD: tl.constexpr, Z_COLS: tl.constexpr, CHUNKED: tl.constexpr,
    # packed (varlen) launches only: the sequence table, chunk counts and factors per sequence
    seq_ptr=None, chunks_ptr=None, factor_ptr=None, VARLEN: tl.constexpr = False,
    # a copy of S in its dot operand dtype
    s_copy_ptr=None, COPY: tl.constexpr = False,
    # frame-causal launches only (frames.py): the slots' token counts
    slot0_len=None, frame_len=None, FRAMES: tl.constexpr = False,
):
    """Grid (BH * n_d_tiles * n_dv_tiles, n_chunks): one program per (bh, D tile, Dv tile) group and chunk.

    x [B, H, N, D], y [B, H, N, DV] (strided, any float dtype); rs, rz [BH, N] ACC (if ROW_WEIGHTS).
    Writes S [BH, N_FEAT, D, DV] and z [BH, N_FEAT, D] (ACC), scaled by ``scale``: see ``finish_states``.
    CHUNKED (n_chunks > 1): each program writes its chunk's partials to s_part / z_part + chunk *
    part_stride (unscaled, ACC), and the group's last program (elected on count [group], int32, zero
    before the launch and after it) sums them in chunk order. F_PAD: the next power of two >= N_FEAT
    (stacked features); Z_COLS: the width of z's column block (16).

    VARLEN: B = 1, N the packed token count, BH = S * H (sequence, head); the window comes from seq
    [S, SEQ_COLS] (varlen.py), the scale is scale * factor[seq], sequence seq has chunks[seq] chunks (a
    program past them exits at once; the election counts chunks[seq]).
    COPY: S is also written to s_copy ([BH, N_FEAT, D, DV], its own dtype: a dot operand copy, see
    ``compute_states``).

    FRAMES (frames.py): chunk c is slot c of n_chunks slots (slot 0: the first slot0_len tokens, slot 1 + f:
    the frame_len tokens of frame f); the program walks the slot's token blocks (the last one masked to the
    slot) and writes the slot's own states, scaled, to S [BH, n_chunks, N_FEAT, D, DV] and z [BH, n_chunks,
    N_FEAT, D] at row bh * n_chunks + c (CHUNKED False: no partials, no election).
    """
    n_d_tiles = tl.cdiv(D, BLOCK_D)
    n_e_tiles = tl.cdiv(DV, BLOCK_DV)
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    e_tile = pid % n_e_tiles
    d_tile = (pid // n_e_tiles) % n_d_tiles
    bh = pid // (n_e_tiles * n_d_tiles)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    x_base = x_ptr + b * stride_x_b + h * stride_x_h
    y_base = y_ptr + b * stride_y_b + h * stride_y_h
    d0 = d_tile * BLOCK_D
    e0 = e_tile * BLOCK_DV
    n_seq = N
    row0 = bh * N
    if VARLEN:
        seq = bh // H
        n_chunks = tl.load(chunks_ptr + seq)
        if chunk >= n_chunks:
            return
        start, n_seq, grid_0, grid_1, grid_2 = sequence_window(seq_ptr, seq, IS_QUERY)
        h = bh % H
        x_base = x_ptr + h.to(tl.int64) * stride_x_h + start * stride_x_n
        y_base = y_ptr + h.to(tl.int64) * stride_y_h + start * stride_y_n
        row0 = h * N + start
        scale = scale * tl.load(factor_ptr + seq)

    s_acc = tl.zeros((F_PAD * BLOCK_D, BLOCK_DV), ACC)
    z_acc = tl.zeros((F_PAD * BLOCK_D, Z_COLS), ACC)
    if FRAMES:
        lo, hi = frame_span(chunk, slot0_len, frame_len)
        # The slot as a window (the VARLEN form of the block): tokens from lo (the pointers and the position
        # offset moved there, so block offsets stay multiples of BLOCK_N: wide, pipelined loads), masked
        # to the slot's hi - lo tokens, row weights at bh * N + lo.
        x_slot = x_base + lo * stride_x_n     # int32: token offsets within a (batch, head) fit (checked)
        y_slot = y_base + lo * stride_y_n
        for n0 in range(0, hi - lo, BLOCK_N):
            s_acc, z_acc = _state_block(x_slot, y_slot, rs_ptr, rz_ptr, s_acc, z_acc, bh, n0, N, D, DV,
                                        n_prefix - lo, grid_0, grid_1, grid_2, d0, e0, stride_x_n, stride_x_d,
                                        stride_y_n, stride_y_d, N_FEAT, F_PAD, Z_COLS, N_AXES, VARIANT, HAS_PREFIX,
                                        IS_QUERY, FMAP, ROW_WEIGHTS, BLOCK_N, BLOCK_D, BLOCK_DV, ACC, DOT, PREC,
                                        hi - lo, bh * N + lo, True)
        finish_states(s_acc, z_acc, s_ptr, z_ptr, s_part_ptr, z_part_ptr, count_ptr, pid, chunk, n_chunks,
                      part_stride, bh * n_chunks + chunk, d0, e0, e_tile, D, DV, scale, N_FEAT, F_PAD, Z_COLS,
                      BLOCK_D, BLOCK_DV, False, s_copy_ptr, COPY)
    else:
        first = chunk * blocks_per_chunk
        for blk in range(first, first + blocks_per_chunk):
            s_acc, z_acc = _state_block(x_base, y_base, rs_ptr, rz_ptr, s_acc, z_acc, bh, blk * BLOCK_N,
                                        N, D, DV, n_prefix, grid_0, grid_1, grid_2, d0, e0, stride_x_n, stride_x_d,
                                        stride_y_n, stride_y_d, N_FEAT, F_PAD, Z_COLS, N_AXES, VARIANT, HAS_PREFIX,
                                        IS_QUERY, FMAP, ROW_WEIGHTS, BLOCK_N, BLOCK_D, BLOCK_DV, ACC, DOT, PREC, n_seq,
                                        row0, VARLEN)
        finish_states(s_acc, z_acc, s_ptr, z_ptr, s_part_ptr, z_part_ptr, count_ptr, pid, chunk, n_chunks,
                      part_stride, bh, d0, e0, e_tile, D, DV, scale, N_FEAT, F_PAD, Z_COLS, BLOCK_D, BLOCK_DV, CHUNKED,
                      s_copy_ptr, COPY)


@triton.jit
def finish_states(s_acc, z_acc, s_ptr, z_ptr, s_part_ptr, z_part_ptr, count_ptr, group, chunk, n_chunks, part_stride,
                  bh, d0, e0, e_tile, D, DV, scale, N_FEAT: tl.constexpr, F_PAD: tl.constexpr, Z_COLS: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CHUNKED: tl.constexpr, s_copy_ptr, COPY: tl.constexpr):
    """Writes scale * the stacked accumulators of ``accumulate_states`` summed over the group's chunks:
    S [BH, N_FEAT, D, DV] at s_ptr, z [BH, N_FEAT, D] at z_ptr (z by the first Dv tile; COPY: S also to
    s_copy, its own dtype).

    One chunk (not CHUNKED): the accumulators are the states. CHUNKED, a last-program election: the
    program stores its partials at s_part / z_part + chunk * part_stride, a CTA barrier orders every
    thread's stores before one acq_rel atomic increment of count[group] (release: the partials are
    visible to whoever acquires the count after it), and the program that sees n_chunks - 1 (the
    group's last to arrive) sums all n_chunks partials in chunk order 0, 1, ... from L2 (``_sum_chunks``),
    applies the scale, writes the states and re-arms count[group] to 0 for the next launch. The atomic only elects:
    the sum, its order and its operands are the same whichever program is last, so the states are
    bitwise reproducible run to run."""
    first_row = bh.to(tl.int64) * N_FEAT  # index of this bh's state m = 0
    # Stacked row r holds feature r // BLOCK_D, head row d0 + r % BLOCK_D.
    offs_r = tl.arange(0, F_PAD * BLOCK_D)
    offs_m = offs_r // BLOCK_D
    offs_rd = d0 + offs_r % BLOCK_D
    offs_e = e0 + tl.arange(0, BLOCK_DV)
    offs_s = (first_row + offs_m[:, None]) * D * DV + offs_rd[:, None] * DV + offs_e[None, :]
    mask_s = ((offs_m < N_FEAT) & (offs_rd < D))[:, None] & (offs_e[None, :] < DV)
    offs_z = (first_row + offs_m) * D + offs_rd
    # z (column 0 of the z tile) does not depend on the Dv tile: the first Dv tile writes it.
    mask_z = (offs_m < N_FEAT) & (offs_rd < D) & ((offs_r * 0 + e_tile) == 0)
    z_rows = tl.sum(tl.where(tl.arange(0, Z_COLS)[None, :] == 0, z_acc, 0.0), axis=1)
    if CHUNKED:
        part = chunk.to(tl.int64) * part_stride
        tl.store(s_part_ptr + part + offs_s, s_acc, mask=mask_s)
        tl.store(z_part_ptr + part + offs_z, z_rows, mask=mask_z)
        tl.debug_barrier()     # every thread's partial stored before the release below
        arrived = tl.atomic_add(count_ptr + group, 1, sem="acq_rel", scope="gpu")
        if arrived == n_chunks - 1:
            _sum_chunks(s_ptr, z_ptr, s_part_ptr, z_part_ptr, n_chunks, part_stride, first_row, d0, e0, e_tile, D, DV,
                        scale, N_FEAT, F_PAD, BLOCK_D, BLOCK_DV, s_copy_ptr, COPY)
            tl.atomic_xchg(count_ptr + group, 0)     # re-armed: the next launch finds it at zero
    else:
        _write_states(s_acc, z_rows, s_ptr, z_ptr, offs_s, offs_z, mask_s, mask_z, scale, s_copy_ptr, COPY)


# Elements the elected program sums at a time (16 a thread at 8 warps): whole states, several at once
# when they are small, so that the loads stay wide (a 16 x 16 fp32 state alone is one element a thread).
SUM_ELEMENTS = tl.constexpr(4096)


@triton.jit
def _sum_chunks(s_ptr, z_ptr, s_part_ptr, z_part_ptr, n_chunks, part_stride, first_row, d0, e0, e_tile, D, DV, scale,
                N_FEAT: tl.constexpr, F_PAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                s_copy_ptr, COPY: tl.constexpr):
    """The elected program's reduction: for each state m of the group (states first_row + m, head rows d0..,
    Dv columns e0..), S and z = scale * the sum of the n_chunks partials in chunk order, loaded from L2
    (.cg: the other programs' stores are there, not in this SM's L1). G states [G * BLOCK_D, BLOCK_DV] at a
    time (G * BLOCK_D * BLOCK_DV <= SUM_ELEMENTS, at least one state; a power of two <= F_PAD): few
    registers, whatever the stacked tile's size."""
    FIT: tl.constexpr = SUM_ELEMENTS // (BLOCK_D * BLOCK_DV)      # powers of two, as F_PAD is
    G: tl.constexpr = (F_PAD if F_PAD < FIT else FIT) if FIT > 1 else 1
    offs_r = tl.arange(0, G * BLOCK_D)
    offs_g = offs_r // BLOCK_D
    offs_d = d0 + offs_r % BLOCK_D
    offs_e = e0 + tl.arange(0, BLOCK_DV)
    tile_s = offs_g[:, None] * D * DV + offs_d[:, None] * DV + offs_e[None, :]   # within the G states (int32)
    tile_z = offs_g * D + offs_d
    for m0 in tl.range(0, N_FEAT, G, num_stages=1):
        in_g = (m0 + offs_g < N_FEAT) & (offs_d < D)
        mask_s = in_g[:, None] & (offs_e < DV)[None, :]
        mask_z = in_g & ((offs_r * 0 + e_tile) == 0)     # z: the first Dv tile's group
        s_state = (first_row + m0) * D * DV
        z_state = (first_row + m0) * D
        s_part = s_part_ptr + s_state
        z_part = z_part_ptr + z_state
        s_sum = tl.load(s_part + tile_s, mask=mask_s, other=0.0, cache_modifier=".cg")
        z_sum = tl.load(z_part + tile_z, mask=mask_z, other=0.0, cache_modifier=".cg")
        for _ in tl.range(1, n_chunks, num_stages=1):
            s_part += part_stride      # pointer steps: chunk * part_stride could overflow int32
            z_part += part_stride
            s_sum += tl.load(s_part + tile_s, mask=mask_s, other=0.0, cache_modifier=".cg")
            z_sum += tl.load(z_part + tile_z, mask=mask_z, other=0.0, cache_modifier=".cg")
        _write_states(s_sum, z_sum, s_ptr + s_state, z_ptr + z_state, tile_s, tile_z, mask_s, mask_z, scale,
                      s_copy_ptr + s_state if COPY else s_copy_ptr, COPY)


@triton.jit
def _write_states(s, z, s_ptr, z_ptr, offs_s, offs_z, mask_s, mask_z, scale, s_copy_ptr, COPY: tl.constexpr):
    """S = scale * s at s_ptr + offs_s, z = scale * z at z_ptr + offs_z; COPY: S also at s_copy_ptr + offs_s
    (in that dtype)."""
    tl.store(s_ptr + offs_s, s * scale, mask=mask_s)
    if COPY:
        tl.store(s_copy_ptr + offs_s, s * scale, mask=mask_s)
    tl.store(z_ptr + offs_z, z * scale, mask=mask_z)
