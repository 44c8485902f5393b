"""The output pass: each query token contracted against the (small) reduced states.

``output_pass_kernel`` (the forward's output; without den, the clamped backward's numerator):
    out_i = out_scale * sum_m P_m(i) phi(x_i)^T M_m            [Dv]  (contract over D)
    optionally divided by den_i = max(sum_m P_m(i) phi(x_i).z_m, den_floor) + eps, den written out;
    with CLAMP, the VVT clamps instead: out_i = C(C(num_i) * C(1 / den_i)) (see clamp.py).
States M [BH, F, D, Dv] and z [BH, F, D] are contiguous in the accumulation dtype ACC (M may be a copy
in the dot operand dtype). The backward's dq pass, its mirror image over Dv, is in queries.py.

Two forms, one kernel (the RESIDENT constexpr; ``launch_forward.output_plan`` picks):
- resident (head dim D within one tile): a persistent program per (program slot, head, Dv tile) loads
  its F state tiles S_m[:, dv tile] and the z_m once, converted to the dot operand, and keeps them on chip
  (shared memory on sm_90) while it walks the head's token blocks pid, pid + n_programs, ... with the
  token loads software-pipelined;
- streaming (any D): one program per (token block, head, Dv tile) loops over D tiles and re-reads each
  feature's state tile from L2 (F tiles a token block).
Both compute every row with the same operations in the same order, so they give bitwise the same
output, and a row's result does not depend on which program (or how many) computed it.

VARLEN (packed sequences, varlen.py): B = 1, N is the packed token count of the side the kernel walks,
BH = S * H; each program reads its sequence's window and exits when its token block lies past the
sequence's end; per-token buffers [H, N] sit at row h * N + start; the per-sequence factor (factor[seq])
multiplies the scaled constants (eps, den_floor, the state scale) or the output scale, as each kernel says.
"""
import triton
import triton.language as tl

from ..common import dot_operand, feature_map, mma
from ..runtime import launch_jit
from .clamp import abs_clamp
from .frames import frame_block
from .positions import position_axes, position_feature, select_position_feature
from .varlen import sequence_window, token_block


@triton.jit
def _output_feature(phi, acc, den, M, m_base, z_base, offs_n, offs_d, mask_d, offs_e, mask_m, D, DV, n_prefix,
                    grid_0, grid_1, grid_2, N_FEAT: tl.constexpr, N_AXES: tl.constexpr, VARIANT: tl.constexpr,
                    HAS_PREFIX: tl.constexpr, IS_QUERY: tl.constexpr, WITH_DEN: tl.constexpr,
                    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, seq_ptr=None, H=None,
                    VARLEN: tl.constexpr = False):
    """acc += (P_M phi) @ M_M[d tile, dv tile];  den += (P_M phi) . z_M[d tile]. VARLEN: the grid sizes
    are read from the sequence table here, per feature, not held in registers across the loops."""
    if VARLEN:
        _start, _n, grid_0, grid_1, grid_2 = sequence_window(seq_ptr, tl.program_id(1) // H, IS_QUERY, RELOAD=True)
    p = position_feature(offs_n, M, n_prefix, grid_0, grid_1, grid_2, N_FEAT, N_AXES, VARIANT, HAS_PREFIX, IS_QUERY,
                         ACC)
    a = phi * p[:, None]
    state = tl.load(m_base + M * D * DV + offs_d[:, None] * DV + offs_e[None, :], mask=mask_m, other=0.0)
    acc = mma(a, state, acc, DOT, PREC)
    if WITH_DEN:
        zm = tl.load(z_base + M * D + offs_d, mask=mask_d, other=0.0)
        den += tl.sum(a * zm[None, :], axis=1)
    return acc, den


@triton.jit
def _output_tile(x_base, m_base, z_base, acc, den, offs_n, mask_n, d0, D, DV, e0, n_prefix, grid_0, grid_1, grid_2,
                 stride_x_n, stride_x_d, N_FEAT: tl.constexpr, N_AXES: tl.constexpr, VARIANT: tl.constexpr,
                 HAS_PREFIX: tl.constexpr, IS_QUERY: tl.constexpr, FMAP: tl.constexpr,
                 WITH_DEN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, seq_ptr=None, H=None,
                 VARLEN: tl.constexpr = False):
    """Adds the contribution of one D tile (all F features) to acc [BLOCK_N, BLOCK_DV] and den [BLOCK_N]."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    offs_e = e0 + tl.arange(0, BLOCK_DV)
    mask_d = offs_d < D
    mask_x = mask_n[:, None] & mask_d[None, :]
    x = tl.load(x_base + offs_n[:, None] * stride_x_n + offs_d[None, :] * stride_x_d, mask=mask_x, other=0.0).to(ACC)
    phi = feature_map(x, mask_x, FMAP)
    mask_m = mask_d[:, None] & (offs_e[None, :] < DV)
    # A real loop over features, not static_range: unrolled, the compiler hoists all F state-tile loads
    # at once and runs out of registers; not software-pipelined either (num_stages=1): pipelined, it
    # spills on sm_80. A one-trip loop (F = 1) is written straight, for the same reason.
    if N_FEAT == 1:
        for M in tl.static_range(N_FEAT):
            acc, den = _output_feature(phi, acc, den, M, m_base, z_base, offs_n, offs_d, mask_d, offs_e,
                                       mask_m, D, DV, n_prefix, grid_0, grid_1, grid_2, N_FEAT, N_AXES, VARIANT,
                                       HAS_PREFIX, IS_QUERY, WITH_DEN, ACC, DOT, PREC, seq_ptr, H, VARLEN)
    else:
        for M in tl.range(N_FEAT, loop_unroll_factor=1, num_stages=1):
            acc, den = _output_feature(phi, acc, den, M, m_base, z_base, offs_n, offs_d, mask_d, offs_e,
                                       mask_m, D, DV, n_prefix, grid_0, grid_1, grid_2, N_FEAT, N_AXES, VARIANT,
                                       HAS_PREFIX, IS_QUERY, WITH_DEN, ACC, DOT, PREC, seq_ptr, H, VARLEN)
    return acc, den


@triton.jit
def _finish_rows(acc, den, offs_n, mask_n, offs_e, den_row, out_base, stride_out_n, stride_out_d, eps, out_scale,
                 den_floor, clamp_lo, clamp_hi, state_scale, WITH_DEN: tl.constexpr, CLAMP: tl.constexpr, DV):
    """The epilogue of a token block: den floored (+ eps) and written (by the first Dv tile's program),
    the division or the VVT clamps, out_scale, the store of out (in out's dtype)."""
    if WITH_DEN:
        # den_floor and eps arrive scaled like den; where(), not maximum(): a NaN den stays NaN. No floor
        # at 0: identity features can give a negative sum, which stays negative as in the reference.
        # Broadcast first: triton 3.6's interpreter cannot `&` a scalar comparison with a block.
        floor = tl.zeros_like(den) + den_floor
        den = tl.where((floor > 0) & (den < floor), floor, den) + eps
        if CLAMP:
            # The clamps act on the unscaled values: num = acc / s and 1 / den_true = s / den.
            num = abs_clamp(acc * (1.0 / state_scale), clamp_lo, clamp_hi)
            inv_den = abs_clamp(state_scale / den, clamp_lo, clamp_hi)
            acc = abs_clamp(num * inv_den[:, None], clamp_lo, clamp_hi)
        else:
            # One division per row, not per element: a full-precision fp32 division is ~10 instructions.
            acc = acc * (1.0 / den)[:, None]
        tl.store(den_row + offs_n, den, mask=mask_n & ((offs_n * 0 + tl.program_id(2)) == 0))
    acc = acc * out_scale
    tl.store(out_base + offs_n[:, None] * stride_out_n + offs_e[None, :] * stride_out_d,
             acc.to(out_base.dtype.element_ty), mask=mask_n[:, None] & (offs_e[None, :] < DV))


@triton.jit
def _resident_output(x_ptr, m_ptr, z_ptr, out_ptr, den_ptr, H, N, D, DV, n_prefix, grid_0, grid_1, grid_2, eps,
                     out_scale, den_floor, clamp_lo, clamp_hi, state_scale, stride_x_b, stride_x_h, stride_x_n,
                     stride_x_d, stride_out_b, stride_out_h, stride_out_n, stride_out_d,
                     N_FEAT: tl.constexpr, N_AXES: tl.constexpr, VARIANT: tl.constexpr, HAS_PREFIX: tl.constexpr,
                     IS_QUERY: tl.constexpr, FMAP: tl.constexpr, WITH_DEN: tl.constexpr, CLAMP: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, ACC: tl.constexpr,
                     DOT: tl.constexpr, PREC: tl.constexpr, TOKEN_STAGES: tl.constexpr, seq_ptr, factor_ptr,
                     VARLEN: tl.constexpr):
    """The resident form (module docstring): D <= BLOCK_D; grid (programs per head, BH, Dv tiles)."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    e0 = tl.program_id(2) * BLOCK_DV
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = e0 + tl.arange(0, BLOCK_DV)
    mask_d = offs_d < D
    n_tok = N
    if VARLEN:
        start, n_tok, grid_0, grid_1, grid_2 = sequence_window(seq_ptr, bh // H, IS_QUERY)
        x_base = x_ptr + h * stride_x_h + start * stride_x_n
        out_base = out_ptr + h * stride_out_h + start * stride_out_n
        den_row = den_ptr + h * N + start
        factor = tl.load(factor_ptr + bh // H)
        if WITH_DEN:
            eps = eps * factor
            den_floor = den_floor * factor
            state_scale = state_scale * factor
        else:
            out_scale = out_scale * factor
    else:
        x_base = x_ptr + b * stride_x_b + h * stride_x_h
        out_base = out_ptr + b * stride_out_b + h * stride_out_h
        den_row = den_ptr + bh * N
    # The F state tiles and z vectors, loaded once and kept across the token loop (a tuple: any F).
    m_tile = m_ptr + bh.to(tl.int64) * N_FEAT * D * DV + offs_d[:, None] * DV + offs_e[None, :]
    z_vec = z_ptr + bh.to(tl.int64) * N_FEAT * D + offs_d
    mask_m = mask_d[:, None] & (offs_e[None, :] < DV)
    states = ()
    zs = ()
    for m in tl.static_range(N_FEAT):
        states = states + (dot_operand(tl.load(m_tile + m * D * DV, mask=mask_m, other=0.0), DOT, PREC),)
        if WITH_DEN:
            zs = zs + (tl.load(z_vec + m * D, mask=mask_d, other=0.0),)
    for blk in tl.range(tl.program_id(0), tl.cdiv(n_tok, BLOCK_N), tl.num_programs(0), num_stages=TOKEN_STAGES):
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_tok
        mask_x = mask_n[:, None] & mask_d[None, :]
        x = tl.load(x_base + offs_n[:, None] * stride_x_n + offs_d[None, :] * stride_x_d, mask=mask_x,
                    other=0.0).to(ACC)
        phi = feature_map(x, mask_x, FMAP)
        axes = position_axes(offs_n, n_prefix, grid_0, grid_1, grid_2, N_AXES, VARIANT, HAS_PREFIX, ACC)
        acc = tl.zeros((BLOCK_N, BLOCK_DV), ACC)
        den = tl.zeros((BLOCK_N,), ACC)
        for m in tl.static_range(N_FEAT):
            a = phi * select_position_feature(axes, m, N_FEAT, N_AXES, VARIANT, HAS_PREFIX, IS_QUERY, ACC)[:, None]
            acc = mma(a, states[m], acc, DOT, PREC)
            if WITH_DEN:
                den += tl.sum(a * zs[m][None, :], axis=1)
        _finish_rows(acc, den, offs_n, mask_n, offs_e, den_row, out_base, stride_out_n, stride_out_d, eps, out_scale,
                     den_floor, clamp_lo, clamp_hi, state_scale, WITH_DEN, CLAMP, DV)


@launch_jit
def output_pass_kernel(
    # pointers: tokens x, states M and z, outputs out and den
    x_ptr, m_ptr, z_ptr, out_ptr, den_ptr,
    # sizes (H, N, grid_*: runtime, never specialised) and scalars
    H, N, D, DV, n_prefix, grid_0, grid_1, grid_2, eps, out_scale, den_floor, clamp_lo, clamp_hi, state_scale,
    # strides
    stride_x_b, stride_x_h, stride_x_n, stride_x_d, stride_out_b, stride_out_h, stride_out_n, stride_out_d,
    # constexprs: geometry, options, tiles, dot precision
    N_FEAT: tl.constexpr, N_AXES: tl.constexpr, VARIANT: tl.constexpr, HAS_PREFIX: tl.constexpr,
    IS_QUERY: tl.constexpr, FMAP: tl.constexpr, WITH_DEN: tl.constexpr, CLAMP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
    # packed (varlen) launches only: the sequence table and the per-sequence factors
    seq_ptr=None, factor_ptr=None, VARLEN: tl.constexpr = False,
    # the resident form (module docstring) and its token-loop pipelining depth
    RESIDENT: tl.constexpr = False, TOKEN_STAGES: tl.constexpr = 1,
    # frame-causal launches only (frames.py): slots and their token counts
    n_slots=None, slot0_len=None, frame_len=None, blocks_per_slot=None, FRAMES: tl.constexpr = False,
):
    """Streaming: grid (cdiv(N, BLOCK_N), BH, n_dv_tiles); resident: grid (programs per head, BH,
    n_dv_tiles), D <= BLOCK_D. x [B, H, N, D] strided; out [B, H, N, DV] strided (written in out's dtype);
    den [BH, N] ACC (written when WITH_DEN, by the first Dv tile). VARLEN: axis 1 is S * H (streaming: axis
    0 spans the longest sequence's blocks; resident: a program walks its own sequence's blocks);
    factor[seq] multiplies eps, den_floor and state_scale with WITH_DEN, else out_scale.
    FRAMES (streaming only, frames.py): grid (n_slots * blocks_per_slot, BH, n_dv_tiles); a token of slot s
    reads the states M [BH, n_slots, F, D, Dv], z [BH, n_slots, F, D] at row bh * n_slots + s."""
    if RESIDENT:
        _resident_output(x_ptr, m_ptr, z_ptr, out_ptr, den_ptr, H, N, D, DV, n_prefix, grid_0, grid_1, grid_2, eps,
                         out_scale, den_floor, clamp_lo, clamp_hi, state_scale, stride_x_b, stride_x_h, stride_x_n,
                         stride_x_d, stride_out_b, stride_out_h, stride_out_n, stride_out_d, N_FEAT, N_AXES, VARIANT,
                         HAS_PREFIX, IS_QUERY, FMAP, WITH_DEN, CLAMP, BLOCK_N, BLOCK_D, BLOCK_DV, ACC, DOT, PREC,
                         TOKEN_STAGES, seq_ptr, factor_ptr, VARLEN)
    else:
        # Packed: the grid sizes are read per feature (``_output_feature``), not from here.
        if FRAMES:
            bh, b, h, offs_n, mask_n, slot, start, active = frame_block(H, slot0_len, frame_len, blocks_per_slot,
                                                                        BLOCK_N)
            if not active:
                return
            state_row = bh.to(tl.int64) * n_slots + slot
            n_prefix = n_prefix - start
        else:
            bh, b, h, offs_n, mask_n, start, active, _grid_0, _grid_1, _grid_2 = token_block(
                H, N, grid_0, grid_1, grid_2, seq_ptr, BLOCK_N, IS_QUERY, VARLEN)
            state_row = bh.to(tl.int64)
        e0 = tl.program_id(2) * BLOCK_DV
        x_base = x_ptr + b * stride_x_b + h * stride_x_h
        m_base = m_ptr + state_row * N_FEAT * D * DV
        z_base = z_ptr + state_row * N_FEAT * D
        out_base = out_ptr + b * stride_out_b + h * stride_out_h
        if VARLEN:
            if not active:
                return
            x_base = x_ptr + h * stride_x_h + start * stride_x_n
            out_base = out_ptr + h * stride_out_h + start * stride_out_n
        if FRAMES:
            x_base += start * stride_x_n
            out_base += start * stride_out_n

        acc = tl.zeros((BLOCK_N, BLOCK_DV), ACC)
        den = tl.zeros((BLOCK_N,), ACC)
        for d0 in range(0, D, BLOCK_D):
            acc, den = _output_tile(x_base, m_base, z_base, acc, den, offs_n, mask_n, d0, D, DV, e0, n_prefix,
                                    grid_0, grid_1, grid_2, stride_x_n, stride_x_d, N_FEAT, N_AXES, VARIANT, HAS_PREFIX,
                                    IS_QUERY, FMAP, WITH_DEN, BLOCK_D, BLOCK_DV, ACC, DOT, PREC, seq_ptr, H, VARLEN)
        if VARLEN:
            # Loaded after the loop: one register less across it (the pass is at the register limit on sm_80).
            factor = tl.load(factor_ptr + bh // H)
            if WITH_DEN:
                eps = eps * factor
                den_floor = den_floor * factor
                state_scale = state_scale * factor
            else:
                out_scale = out_scale * factor
        if VARLEN:
            den_row = den_ptr + h * N + start
        elif FRAMES:
            den_row = den_ptr + bh * N + start
        else:
            den_row = den_ptr + bh * N
        _finish_rows(acc, den, offs_n, mask_n, e0 + tl.arange(0, BLOCK_DV), den_row, out_base, stride_out_n,
                     stride_out_d, eps, out_scale, den_floor, clamp_lo, clamp_hi, state_scale, WITH_DEN, CLAMP, DV)
