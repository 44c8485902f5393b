"""The backward key pass: dk and dv of a block of keys in one launch.

    dv_j = key_scale * sum_m P_m(j) dS_m^T phi(k_j)                    [Dv]  (contract over D)
    dk_j = key_scale * phi'(k_j) * sum_m P_m(j) (dS_m v_j + dz_m)       [D]   (contract over Dv)

Both contract the same F state-gradient tiles dS_m [D, Dv] against one token block, so one program
reads each dS_m tile once for both (rather than a dv and a dk pass each reloading all F tiles from
L2 for every token block, and each reading k). Head dims wider than one tile: program j of a token block
computes dk's D tile j and dv's Dv tile j, looping over the other dimension's tiles t; the diagonal
step t = j comes first and its dS_m tile (rows of D tile j, columns of Dv tile j) serves both, the
other steps read dS_m[j, t] for dk and dS_m[t, j] for dv. dk's z term (dz_m of D tile j) is added in
the diagonal step. NEED_DK / NEED_DV: a gradient not asked for is neither computed nor stored.

Two forms, one kernel (the RESIDENT constexpr; ``launch_backward._key_plan`` picks):
- resident (D and Dv within one tile): a persistent program per (program slot, head) loads the F dS_m
  tiles once, converted to the dot operand, as [D, Dv] (dv) and as [Dv, D] (dk), and keeps them on chip
  (shared memory on sm_90) while it walks the head's token blocks pid, pid + n_programs, ..., the token
  loads (and the small dz_m vectors) software-pipelined;
- streaming (any head dims): one program per (token block, head, tile j) re-reads the dS_m tiles from
  L2 for every token block, as described above.
Both compute every row with the same operations in the same order (bitwise the same dk, dv).

States dS [BH, F, D, Dv] and dz [BH, F, D] are contiguous in the accumulation dtype ACC (scaled as
``launch_backward.vicinity_backward`` says: key_scale undoes it). VARLEN (packed sequences, varlen.py):
as in output.py, over the key side; factor[seq] multiplies key_scale.
"""
import triton
import triton.language as tl

from ..common import dot_operand, feature_map, mma_rows, mul_feature_map_grad_of_phi
from ..runtime import launch_jit
from .frames import frame_block
from .positions import position_axes, position_feature, select_position_feature
from .varlen import sequence_window, token_block


@triton.jit
def _load_tile(base, offs_n, mask_n, offs_c, mask_c, stride_n, stride_c, ACC: tl.constexpr):
    """A [BLOCK_N, BLOCK_C] tile of a strided token tensor, in ACC (0 where masked)."""
    return tl.load(base + offs_n[:, None] * stride_n + offs_c[None, :] * stride_c,
                   mask=mask_n[:, None] & mask_c[None, :], other=0.0).to(ACC)


@triton.jit
def _key_feature(phi, v, acc_dk, acc_dv, M, ds_base, dz_base, offs_n, dk_rows, dk_rows_mask, dk_cols, dk_cols_mask,
                 dv_rows, dv_rows_mask, dv_cols, dv_cols_mask, H, D, DV, n_prefix, grid_0, grid_1, grid_2,
                 N_FEAT: tl.constexpr, N_AXES: tl.constexpr, VARIANT: tl.constexpr, HAS_PREFIX: tl.constexpr,
                 NEED_DK: tl.constexpr, NEED_DV: tl.constexpr, SHARED: tl.constexpr, Z_TERM: tl.constexpr,
                 ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, seq_ptr=None,
                 VARLEN: tl.constexpr = False):
    """Feature M's contribution: acc_dk += P_M (v @ dS_M[dk_rows, dk_cols]^T) (+ P_M dz_M[dk_rows] with
    Z_TERM), acc_dv += P_M (phi @ dS_M[dv_rows, dv_cols]). SHARED: both tiles are the same (the caller
    passes the same offsets) and it is read once.

    Both dots take the unscaled token tiles v and phi and P_M scales their fp32 products (``mma_rows``), at
    every dtype: v is exact as an operand (see ``queries.dq_feature`` for why that matters to dk), and the
    F features share one operand conversion per token block instead of one per feature (on sm_90 each
    scaled operand went registers -> shared memory -> registers, with its barriers).
    VARLEN: the grid sizes are read from the sequence table here, per feature, not held in registers
    across the loops (held, they make the packed launches spill).
    """
    if VARLEN:
        _start, _n, grid_0, grid_1, grid_2 = sequence_window(seq_ptr, tl.program_id(1) // H, False, RELOAD=True)
    p = position_feature(offs_n, M, n_prefix, grid_0, grid_1, grid_2, N_FEAT, N_AXES, VARIANT, HAS_PREFIX, False,
                         ACC)
    state_base = ds_base + M * D * DV
    if NEED_DK:
        state_k = tl.load(state_base + dk_rows[:, None] * DV + dk_cols[None, :],
                          mask=dk_rows_mask[:, None] & dk_cols_mask[None, :], other=0.0)
        # The dk dot sits in a region of its own: a branch always taken (H >= 1 is a runtime value the
        # compiler cannot fold). Triton's sm_80 layout choice takes dots of one region that share
        # operands (the state tile, P_M) for a chain and puts all warps on the token axis, so that every
        # warp holds both whole state operands in registers and spills.
        if H > 0:
            acc_dk = mma_rows(v, tl.trans(state_k), acc_dk, p, DOT, PREC)
        if Z_TERM:
            zm = tl.load(dz_base + M * D + dk_rows, mask=dk_rows_mask, other=0.0)
            acc_dk += p[:, None] * zm[None, :]
    if NEED_DV:
        if SHARED and NEED_DK:
            state_v = state_k
        else:
            state_v = tl.load(state_base + dv_rows[:, None] * DV + dv_cols[None, :],
                              mask=dv_rows_mask[:, None] & dv_cols_mask[None, :], other=0.0)
        acc_dv = mma_rows(phi, state_v, acc_dv, p, DOT, PREC)
    return acc_dk, acc_dv


@triton.jit
def _key_tile(phi, v, acc_dk, acc_dv, ds_base, dz_base, offs_n, dk_rows, dk_rows_mask, dk_cols, dk_cols_mask,
              dv_rows, dv_rows_mask, dv_cols, dv_cols_mask, H, D, DV, n_prefix, grid_0, grid_1, grid_2,
              N_FEAT: tl.constexpr, N_AXES: tl.constexpr, VARIANT: tl.constexpr, HAS_PREFIX: tl.constexpr,
              NEED_DK: tl.constexpr, NEED_DV: tl.constexpr, SHARED: tl.constexpr, Z_TERM: tl.constexpr,
              ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, seq_ptr=None, VARLEN: tl.constexpr = False):
    """All F features of one tile step (phi: D tile of dv's operand, v: Dv tile of dk's)."""
    # A real loop over features, not static_range, and not software-pipelined (see output.py's _output_tile);
    # a one-trip loop (F = 1) is written straight.
    if N_FEAT == 1:
        for M in tl.static_range(N_FEAT):
            acc_dk, acc_dv = _key_feature(phi, v, acc_dk, acc_dv, M, ds_base, dz_base, offs_n, dk_rows, dk_rows_mask,
                                          dk_cols, dk_cols_mask, dv_rows, dv_rows_mask, dv_cols, dv_cols_mask, H, D, DV,
                                          n_prefix, grid_0, grid_1, grid_2, N_FEAT, N_AXES, VARIANT, HAS_PREFIX,
                                          NEED_DK, NEED_DV, SHARED, Z_TERM, ACC, DOT, PREC, seq_ptr, VARLEN)
    else:
        for M in tl.range(N_FEAT, loop_unroll_factor=1, num_stages=1):
            acc_dk, acc_dv = _key_feature(phi, v, acc_dk, acc_dv, M, ds_base, dz_base, offs_n, dk_rows, dk_rows_mask,
                                          dk_cols, dk_cols_mask, dv_rows, dv_rows_mask, dv_cols, dv_cols_mask, H, D, DV,
                                          n_prefix, grid_0, grid_1, grid_2, N_FEAT, N_AXES, VARIANT, HAS_PREFIX,
                                          NEED_DK, NEED_DV, SHARED, Z_TERM, ACC, DOT, PREC, seq_ptr, VARLEN)
    return acc_dk, acc_dv


@triton.jit
def _resident_keys(k_ptr, v_ptr, ds_ptr, dz_ptr, dk_ptr, dv_ptr, H, N, D, DV, n_prefix, grid_0, grid_1, grid_2,
                   key_scale, stride_k_b, stride_k_h, stride_k_n, stride_k_d, stride_v_b, stride_v_h, stride_v_n,
                   stride_v_d, stride_dk_b, stride_dk_h, stride_dk_n, stride_dk_d, stride_dv_b, stride_dv_h,
                   stride_dv_n, stride_dv_d, N_FEAT: tl.constexpr, N_AXES: tl.constexpr, VARIANT: tl.constexpr,
                   HAS_PREFIX: tl.constexpr, FMAP: tl.constexpr, NEED_DK: tl.constexpr, NEED_DV: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, ACC: tl.constexpr,
                   DOT: tl.constexpr, PREC: tl.constexpr, TOKEN_STAGES: tl.constexpr, seq_ptr, factor_ptr,
                   VARLEN: tl.constexpr):
    """The resident form (module docstring): D <= BLOCK_D, DV <= BLOCK_DV; grid (programs per head, BH, 1)."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    mask_d = offs_d < D
    mask_e = offs_e < DV
    n_tok = N
    if VARLEN:
        start, n_tok, grid_0, grid_1, grid_2 = sequence_window(seq_ptr, bh // H, False)
        key_scale = key_scale * tl.load(factor_ptr + bh // H)
        k_base = k_ptr + h * stride_k_h + start * stride_k_n
        v_base = v_ptr + h * stride_v_h + start * stride_v_n
        dk_base = dk_ptr + h * stride_dk_h + start * stride_dk_n
        dv_base = dv_ptr + h * stride_dv_h + start * stride_dv_n
    else:
        k_base = k_ptr + b * stride_k_b + h * stride_k_h
        v_base = v_ptr + b * stride_v_b + h * stride_v_h
        dk_base = dk_ptr + b * stride_dk_b + h * stride_dk_h
        dv_base = dv_ptr + b * stride_dv_b + h * stride_dv_h
    # The F dS_m tiles, loaded once and kept across the token loop (tuples: any F): as [D, Dv] for dv's
    # dots and, read transposed from memory, as [Dv, D] for dk's (a transposed view of the one tile
    # spills under triton 3.6). The dz_m vectors are read per token block instead, through the
    # pipelined token loads (held in registers, they make the 64-wide tiles spill).
    head = ds_ptr + bh.to(tl.int64) * N_FEAT * D * DV
    dz_vec = dz_ptr + bh.to(tl.int64) * N_FEAT * D + offs_d
    states = ()
    states_t = ()
    for m in tl.static_range(N_FEAT):
        if NEED_DV:
            states = states + (dot_operand(tl.load(head + m * D * DV + offs_d[:, None] * DV + offs_e[None, :],
                                                   mask=mask_d[:, None] & mask_e[None, :], other=0.0), DOT, PREC),)
        if NEED_DK:
            states_t = states_t + (dot_operand(tl.load(head + m * D * DV + offs_e[:, None] + offs_d[None, :] * DV,
                                                       mask=mask_e[:, None] & mask_d[None, :], other=0.0), DOT, PREC),)
    for blk in tl.range(tl.program_id(0), tl.cdiv(n_tok, BLOCK_N), tl.num_programs(0), num_stages=TOKEN_STAGES):
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_tok
        phi = feature_map(_load_tile(k_base, offs_n, mask_n, offs_d, mask_d, stride_k_n, stride_k_d, ACC),
                          mask_n[:, None] & mask_d[None, :], FMAP)
        if NEED_DK:
            v = _load_tile(v_base, offs_n, mask_n, offs_e, mask_e, stride_v_n, stride_v_d, ACC)
        axes = position_axes(offs_n, n_prefix, grid_0, grid_1, grid_2, N_AXES, VARIANT, HAS_PREFIX, ACC)
        acc_dk = tl.zeros((BLOCK_N, BLOCK_D), ACC)
        acc_dv = tl.zeros((BLOCK_N, BLOCK_DV), ACC)
        for m in tl.static_range(N_FEAT):
            p = select_position_feature(axes, m, N_FEAT, N_AXES, VARIANT, HAS_PREFIX, False, ACC)
            # The precision choices of _key_feature (its docstring), in the same order.
            if NEED_DK:
                acc_dk = mma_rows(v, states_t[m], acc_dk, p, DOT, PREC)
                acc_dk += p[:, None] * tl.load(dz_vec + m * D, mask=mask_d, other=0.0)[None, :]
            if NEED_DV:
                acc_dv = mma_rows(phi, states[m], acc_dv, p, DOT, PREC)
        if NEED_DV:
            tl.store(dv_base + offs_n[:, None] * stride_dv_n + offs_e[None, :] * stride_dv_d,
                     (acc_dv * key_scale).to(dv_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_e[None, :])
        if NEED_DK:
            acc_dk = mul_feature_map_grad_of_phi(acc_dk, phi, FMAP) * key_scale
            tl.store(dk_base + offs_n[:, None] * stride_dk_n + offs_d[None, :] * stride_dk_d,
                     acc_dk.to(dk_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])


@launch_jit
def key_pass_kernel(
    # pointers: k, v, the state gradients dS and dz; outputs dk and dv
    k_ptr, v_ptr, ds_ptr, dz_ptr, dk_ptr, dv_ptr,
    # sizes (H, N, grid_*: runtime, never specialised) and scalars
    H, N, D, DV, n_prefix, grid_0, grid_1, grid_2, key_scale,
    # strides
    stride_k_b, stride_k_h, stride_k_n, stride_k_d, stride_v_b, stride_v_h, stride_v_n, stride_v_d,
    stride_dk_b, stride_dk_h, stride_dk_n, stride_dk_d, stride_dv_b, stride_dv_h, stride_dv_n, stride_dv_d,
    # constexprs: geometry, gradients wanted, tiles, dot precision
    N_FEAT: tl.constexpr, N_AXES: tl.constexpr, VARIANT: tl.constexpr, HAS_PREFIX: tl.constexpr,
    FMAP: tl.constexpr, NEED_DK: tl.constexpr, NEED_DV: tl.constexpr, ONE_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, ACC: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr,
    # packed (varlen) launches only: the sequence table and the per-sequence factors
    seq_ptr=None, factor_ptr=None, VARLEN: tl.constexpr = False,
    # the resident form (module docstring) and its token-loop pipelining depth
    RESIDENT: tl.constexpr = False, TOKEN_STAGES: tl.constexpr = 1,
    # frame-causal launches only (frames.py): slots and their token counts
    n_slots=None, slot0_len=None, frame_len=None, blocks_per_slot=None, FRAMES: tl.constexpr = False,
):
    """Resident (ONE_TILE only): grid (programs per head, BH, 1). Streaming: grid (cdiv(N, BLOCK_N), BH,
    n_programs): k [B, H, N, D], v [B, H, N, DV], dk [B, H, N, D], dv
    [B, H, N, DV], all strided; dk, dv written in their own dtype. Program j of
    a token block writes dk's D tile j (NEED_DK) and dv's Dv tile j (NEED_DV), so n_programs is the
    number of tiles of the gradients asked for (the larger when both). ONE_TILE: D <= BLOCK_D and
    DV <= BLOCK_DV. VARLEN: grid (cdiv(longest sequence, BLOCK_N), S * H, n_programs).
    FRAMES (streaming only, frames.py): grid (n_slots * blocks_per_slot, BH, n_programs); a key of slot s reads
    dS [BH, n_slots, F, D, DV], dz [BH, n_slots, F, D] at row bh * n_slots + s."""
    if RESIDENT:
        _resident_keys(k_ptr, v_ptr, ds_ptr, dz_ptr, dk_ptr, dv_ptr, H, N, D, DV, n_prefix, grid_0, grid_1, grid_2,
                       key_scale, stride_k_b, stride_k_h, stride_k_n, stride_k_d, stride_v_b, stride_v_h, stride_v_n,
                       stride_v_d, stride_dk_b, stride_dk_h, stride_dk_n, stride_dk_d, stride_dv_b, stride_dv_h,
                       stride_dv_n, stride_dv_d, N_FEAT, N_AXES, VARIANT, HAS_PREFIX, FMAP, NEED_DK, NEED_DV, BLOCK_N,
                       BLOCK_D, BLOCK_DV, ACC, DOT, PREC, TOKEN_STAGES, seq_ptr, factor_ptr, VARLEN)
    else:
        # Packed: the grid sizes are read per feature (``_key_feature``), not from here.
        if FRAMES:
            bh, b, h, offs_n, mask_n, slot, start, active = frame_block(H, slot0_len, frame_len, blocks_per_slot,
                                                                        BLOCK_N)
            if not active:
                return
            state_row = bh.to(tl.int64) * n_slots + slot
            n_prefix = n_prefix - start
        else:
            bh, b, h, offs_n, mask_n, start, active, _grid_0, _grid_1, _grid_2 = token_block(
                H, N, grid_0, grid_1, grid_2, seq_ptr, BLOCK_N, False, VARLEN)
            state_row = bh.to(tl.int64)
        j = tl.program_id(2)
        if VARLEN:
            if not active:
                return
            k_base = k_ptr + h * stride_k_h + start * stride_k_n
            v_base = v_ptr + h * stride_v_h + start * stride_v_n
        else:
            k_base = k_ptr + b * stride_k_b + h * stride_k_h
            v_base = v_ptr + b * stride_v_b + h * stride_v_h
        if FRAMES:
            k_base += start * stride_k_n
            v_base += start * stride_v_n
        ds_base = ds_ptr + state_row * N_FEAT * D * DV
        dz_base = dz_ptr + state_row * N_FEAT * D
        offs_dj = j * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_ej = j * BLOCK_DV + tl.arange(0, BLOCK_DV)
        mask_dj = offs_dj < D
        mask_ej = offs_ej < DV

        acc_dk = tl.zeros((BLOCK_N, BLOCK_D), ACC)
        acc_dv = tl.zeros((BLOCK_N, BLOCK_DV), ACC)
        # The diagonal step (D tile j, Dv tile j): one dS_m tile for both gradients, and dk's z term.
        # phi(k) of D tile j is also what dk's phi' is taken from.
        phi_j = feature_map(_load_tile(k_base, offs_n, mask_n, offs_dj, mask_dj, stride_k_n, stride_k_d, ACC),
                            mask_n[:, None] & mask_dj[None, :], FMAP)
        if NEED_DK:
            v_j = _load_tile(v_base, offs_n, mask_n, offs_ej, mask_ej, stride_v_n, stride_v_d, ACC)
        else:
            v_j = phi_j  # not read
        acc_dk, acc_dv = _key_tile(phi_j, v_j, acc_dk, acc_dv, ds_base, dz_base, offs_n, offs_dj, mask_dj,
                                   offs_ej, mask_ej, offs_dj, mask_dj, offs_ej, mask_ej, H, D, DV, n_prefix, grid_0,
                                   grid_1, grid_2, N_FEAT, N_AXES, VARIANT, HAS_PREFIX, NEED_DK, NEED_DV, True, NEED_DK,
                                   ACC, DOT, PREC, seq_ptr, VARLEN)
        if not ONE_TILE:
            # The other tile steps, from j + 1 round to j - 1 (a fixed order per program: deterministic).
            n_steps = tl.maximum(tl.cdiv(D, BLOCK_D), tl.cdiv(DV, BLOCK_DV))
            for step in range(1, n_steps):
                t = (j + step) % n_steps
                offs_dt = t * BLOCK_D + tl.arange(0, BLOCK_D)
                offs_et = t * BLOCK_DV + tl.arange(0, BLOCK_DV)
                mask_dt = offs_dt < D
                mask_et = offs_et < DV
                if NEED_DV:
                    phi_t = feature_map(_load_tile(k_base, offs_n, mask_n, offs_dt, mask_dt, stride_k_n, stride_k_d,
                                                   ACC), mask_n[:, None] & mask_dt[None, :], FMAP)
                else:
                    phi_t = phi_j  # not read
                if NEED_DK:
                    v_t = _load_tile(v_base, offs_n, mask_n, offs_et, mask_et, stride_v_n, stride_v_d, ACC)
                else:
                    v_t = v_j  # not read
                acc_dk, acc_dv = _key_tile(phi_t, v_t, acc_dk, acc_dv, ds_base, dz_base, offs_n, offs_dj, mask_dj,
                                           offs_et, mask_et, offs_dt, mask_dt, offs_ej, mask_ej, H, D, DV,
                                           n_prefix, grid_0, grid_1, grid_2, N_FEAT, N_AXES, VARIANT, HAS_PREFIX,
                                           NEED_DK, NEED_DV, False, False, ACC, DOT, PREC, seq_ptr, VARLEN)
        if VARLEN:
            # Loaded after the loops: one register less across them.
            key_scale = key_scale * tl.load(factor_ptr + bh // H)
            dk_base = dk_ptr + h * stride_dk_h + start * stride_dk_n
            dv_base = dv_ptr + h * stride_dv_h + start * stride_dv_n
        else:
            dk_base = dk_ptr + b * stride_dk_b + h * stride_dk_h
            dv_base = dv_ptr + b * stride_dv_b + h * stride_dv_h
        if FRAMES:
            dk_base += start * stride_dk_n
            dv_base += start * stride_dv_n
        if NEED_DV:
            tl.store(dv_base + offs_n[:, None] * stride_dv_n + offs_ej[None, :] * stride_dv_d,
                     (acc_dv * key_scale).to(dv_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_ej[None, :])
        if NEED_DK:
            acc_dk = mul_feature_map_grad_of_phi(acc_dk, phi_j, FMAP) * key_scale
            tl.store(dk_base + offs_n[:, None] * stride_dk_n + offs_dj[None, :] * stride_dk_d,
                     acc_dk.to(dk_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_dj[None, :])
