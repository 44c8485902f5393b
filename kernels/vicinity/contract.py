"""Per-token kernels that contract tokens against the (small) reduced states.

``contract_d_kernel``  (forward output pass; without den, the clamped backward's numerator):
    out_i = out_scale * sum_m P_m(i) phi(x_i)^T M_m            [Dv]  (contract over D)
    optionally divided by den_i = max(sum_m P_m(i) phi(x_i).z_m, den_floor) + eps, den written out;
    with CLAMP, the VVT clamps instead: out_i = C(C(num_i) * C(1 / den_i)) (see clamp.py).
``contract_dv_kernel`` (backward dq; dk and dv come from the key pass, keys.py):
    out_i = out_scale * phi'(x_i) * (rs_i sum_m P_m(i) M_m y_i + rz_i sum_m P_m(i) z_m)   [D]
    (contract over Dv) with x = q, y = dO, rs = 1/den, rz = -(dO.o)/den.
    The dq pass computes rs, rz itself (1/den and dO.o: ``ROWS_FROM_ACC`` from its accumulator when D
    fits one tile, ``ROWS_COMPUTE`` from dO and o otherwise) and writes them for the state pass that
    follows; the clamped backward's dq loads them (``ROWS_LOAD``).
``row_weights_kernel`` (backward preprocessing when dq is not wanted): the same rs, rz (0 where the floor
    is active), from the same helpers (``row_delta``, ``row_weights``).
States M [BH, F, D, Dv] and z [BH, F, D] are contiguous in the accumulation dtype ACC.

VARLEN (packed sequences, varlen.py): B = 1, N is the packed token count of the side the kernel walks,
BH = S * H; each program reads its sequence's window and exits when its token block lies past the
sequence's end; per-token buffers [H, N] sit at row h * N + start; the per-sequence factor (factor[seq])
multiplies the scaled constants (eps, den_floor, the state scale) or the output scale, as each kernel says.
"""
import triton
import triton.language as tl

from ..common import feature_map, mma, mul_feature_map_grad
from ..runtime import launch_jit
from .clamp import abs_clamp, without_floor_rows
from .positions import position_axes, position_feature, select_position_feature
from .varlen import sequence_window, token_block


@triton.jit
def _contract_d_feature(phi, acc, den, M, m_base, z_base, offs_n, offs_d, mask_d, offs_e, mask_m, D, DV, n_prefix,
                        s0, s1, s2, N_FEAT: tl.constexpr, N_AXES: tl.constexpr, VARIANT: tl.constexpr,
                        HAS_PREFIX: tl.constexpr, IS_QUERY: tl.constexpr, WITH_DEN: tl.constexpr,
                        ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, seq_ptr=None, H=None,
                        VARLEN: tl.constexpr = False):
    """acc += (P_M phi) @ M_M[d tile, dv tile];  den += (P_M phi) . z_M[d tile]. VARLEN: the grid sizes
    are read from the sequence table here, per feature, not held in registers across the loops."""
    if VARLEN:
        _start, _n, s0, s1, s2 = sequence_window(seq_ptr, tl.program_id(1) // H, IS_QUERY, RELOAD=True)
    p = position_feature(offs_n, M, n_prefix, s0, s1, s2, N_FEAT, N_AXES, VARIANT, HAS_PREFIX, IS_QUERY, ACC)
    a = phi * p[:, None]
    state = tl.load(m_base + M * D * DV + offs_d[:, None] * DV + offs_e[None, :], mask=mask_m, other=0.0)
    acc = mma(a, state, acc, DOT, PREC)
    if WITH_DEN:
        zm = tl.load(z_base + M * D + offs_d, mask=mask_d, other=0.0)
        den += tl.sum(a * zm[None, :], axis=1)
    return acc, den


@triton.jit
def _contract_d_tile(x_base, m_base, z_base, acc, den, offs_n, mask_n, d0, D, DV, e0, n_prefix, s0, s1, s2,
                     sxn, sxd, N_FEAT: tl.constexpr, N_AXES: tl.constexpr, VARIANT: tl.constexpr,
                     HAS_PREFIX: tl.constexpr, IS_QUERY: tl.constexpr, FMAP: tl.constexpr,
                     WITH_DEN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, seq_ptr=None, H=None,
                     VARLEN: tl.constexpr = False):
    """Adds the contribution of one D tile (all F features) to acc [BLOCK_N, BLOCK_DV] and den [BLOCK_N]."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    offs_e = e0 + tl.arange(0, BLOCK_DV)
    mask_d = offs_d < D
    mask_x = mask_n[:, None] & mask_d[None, :]
    x = tl.load(x_base + offs_n[:, None] * sxn + offs_d[None, :] * sxd, mask=mask_x, other=0.0).to(ACC)
    phi = feature_map(x, mask_x, FMAP)
    mask_m = mask_d[:, None] & (offs_e[None, :] < DV)
    # A real loop over features, not static_range: unrolled, the compiler hoists all F state-tile loads
    # at once and runs out of registers; not software-pipelined either (num_stages=1), which on sm_80
    # made ptxas spill a few bytes. A one-trip loop (F = 1) is written straight, for the same reason.
    if N_FEAT == 1:
        for M in tl.static_range(N_FEAT):
            acc, den = _contract_d_feature(phi, acc, den, M, m_base, z_base, offs_n, offs_d, mask_d, offs_e,
                                           mask_m, D, DV, n_prefix, s0, s1, s2, N_FEAT, N_AXES, VARIANT,
                                           HAS_PREFIX, IS_QUERY, WITH_DEN, ACC, DOT, PREC, seq_ptr, H, VARLEN)
    else:
        for M in tl.range(N_FEAT, loop_unroll_factor=1, num_stages=1):
            acc, den = _contract_d_feature(phi, acc, den, M, m_base, z_base, offs_n, offs_d, mask_d, offs_e,
                                           mask_m, D, DV, n_prefix, s0, s1, s2, N_FEAT, N_AXES, VARIANT,
                                           HAS_PREFIX, IS_QUERY, WITH_DEN, ACC, DOT, PREC, seq_ptr, H, VARLEN)
    return acc, den


@launch_jit
def contract_d_kernel(x_ptr, m_ptr, z_ptr, out_ptr, den_ptr, H, N, D, DV, n_prefix, s0, s1, s2, eps, out_scale,
                      den_floor, clamp_lo, clamp_hi, state_scale,
                      sxb, sxh, sxn, sxd, sob, soh, son, sod,
                      N_FEAT: tl.constexpr, N_AXES: tl.constexpr, VARIANT: tl.constexpr,
                      HAS_PREFIX: tl.constexpr, IS_QUERY: tl.constexpr, FMAP: tl.constexpr,
                      WITH_DEN: tl.constexpr, CLAMP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_DV: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                      seq_ptr=None, factor_ptr=None, VARLEN: tl.constexpr = False):
    """Grid (cdiv(N, BLOCK_N), BH, n_dv_tiles). x [B, H, N, D] strided; out [B, H, N, DV] strided
    (written in out's dtype); den [BH, N] ACC (written when WITH_DEN, by the first Dv tile).
    VARLEN: grid (cdiv(longest sequence, BLOCK_N), S * H, n_dv_tiles); factor[seq] multiplies eps,
    den_floor and state_scale with WITH_DEN, else out_scale."""
    # Packed: the grid sizes are read per feature (``_contract_d_feature``), not from here.
    bh, b, h, offs_n, mask_n, start, active, _s0, _s1, _s2 = token_block(H, N, s0, s1, s2, seq_ptr, BLOCK_N,
                                                                         IS_QUERY, VARLEN)
    e0 = tl.program_id(2) * BLOCK_DV
    x_base = x_ptr + b * sxb + h * sxh
    m_base = m_ptr + bh.to(tl.int64) * N_FEAT * D * DV
    z_base = z_ptr + bh.to(tl.int64) * N_FEAT * D
    out_base = out_ptr + b * sob + h * soh
    if VARLEN:
        if not active:
            return
        x_base = x_ptr + h * sxh + start * sxn
        out_base = out_ptr + h * soh + start * son

    acc = tl.zeros((BLOCK_N, BLOCK_DV), ACC)
    den = tl.zeros((BLOCK_N,), ACC)
    for d0 in range(0, D, BLOCK_D):
        acc, den = _contract_d_tile(x_base, m_base, z_base, acc, den, offs_n, mask_n, d0, D, DV, e0, n_prefix,
                                    s0, s1, s2, sxn, sxd, N_FEAT, N_AXES, VARIANT, HAS_PREFIX, IS_QUERY,
                                    FMAP, WITH_DEN, BLOCK_D, BLOCK_DV, ACC, DOT, PREC, seq_ptr, H, VARLEN)
    if VARLEN:
        # Loaded after the loop: one register less across it (it sat at the 255 limit on sm_80 as the dv pass).
        factor = tl.load(factor_ptr + bh // H)
        if WITH_DEN:
            eps = eps * factor
            den_floor = den_floor * factor
            state_scale = state_scale * factor
        else:
            out_scale = out_scale * factor
    if WITH_DEN:
        # den_floor and eps arrive scaled like den; where(), not maximum(): a NaN den stays NaN.
        den = tl.where(den < den_floor, den_floor, den) + eps
        if CLAMP:
            # The clamps act on the unscaled values: num = acc / s and 1 / den_true = s / den.
            num = abs_clamp(acc * (1.0 / state_scale), clamp_lo, clamp_hi)
            inv_den = abs_clamp(state_scale / den, clamp_lo, clamp_hi)
            acc = abs_clamp(num * inv_den[:, None], clamp_lo, clamp_hi)
        else:
            # One division per row, not per element (a full-precision fp32 division is ~10 instructions;
            # per element it was 150 of the output pass's 1200 a program at bf16 D64, 128 tokens).
            acc = acc * (1.0 / den)[:, None]
        if VARLEN:
            den_row = den_ptr + h * N + start
        else:
            den_row = den_ptr + bh * N
        tl.store(den_row + offs_n, den, mask=mask_n & ((offs_n * 0 + tl.program_id(2)) == 0))
    acc = acc * out_scale
    offs_e = e0 + tl.arange(0, BLOCK_DV)
    tl.store(out_base + offs_n[:, None] * son + offs_e[None, :] * sod, acc.to(out_ptr.dtype.element_ty),
             mask=mask_n[:, None] & (offs_e[None, :] < DV))


# How contract_dv_kernel (the dq pass) gets its row weights (constexpr ROWS): loaded (the clamped
# backward's dq, clamp.py), or computed in the kernel and written out for the state pass (no separate
# row-weights launch). ROWS_COMPUTE takes dO . o from dO and o; ROWS_FROM_ACC (the head dim D in one
# tile) from the kernel's own accumulator, without reading o or dO again:
#     dO_i . o_i = sum_m P_m(i) phi(q_i) . (S_m dO_i) / den_i = phi(q_i) . acc_i / den_i.
ROWS_LOAD = tl.constexpr(1)
ROWS_COMPUTE = tl.constexpr(2)
ROWS_FROM_ACC = tl.constexpr(3)


@triton.jit
def row_delta(do_base, o_base, offs_n, mask_n, DV, sgn, sgd, son, sod, BLOCK_N: tl.constexpr,
              BLOCK_DV: tl.constexpr, ACC: tl.constexpr):
    """delta = dO . o [BLOCK_N] (ACC) of the rows offs_n (under mask_n), summed over the Dv tiles in order:
    dO at do_base (strides sgn, sgd), o at o_base (strides son, sod)."""
    delta = tl.zeros((BLOCK_N,), ACC)
    for e0 in range(0, DV, BLOCK_DV):
        offs_e = e0 + tl.arange(0, BLOCK_DV)
        mask = mask_n[:, None] & (offs_e[None, :] < DV)
        g = tl.load(do_base + offs_n[:, None] * sgn + offs_e[None, :] * sgd, mask=mask, other=0.0).to(ACC)
        o = tl.load(o_base + offs_n[:, None] * son + offs_e[None, :] * sod, mask=mask, other=0.0).to(ACC)
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
def contract_dv_feature(y, acc, M, m_base, axes, offs_d, mask_d, offs_e, mask_e, D, DV,
                        N_FEAT: tl.constexpr, N_AXES: tl.constexpr, VARIANT: tl.constexpr,
                        HAS_PREFIX: tl.constexpr, IS_QUERY: tl.constexpr, ACC: tl.constexpr,
                        DOT: tl.constexpr, PREC: tl.constexpr):
    """acc += P_M * (y @ M_M[d tile, dv tile]^T).

    With TF32 dots (fp16 and fp32 inputs) P_M scales the product, not the operand y: y (dO) is
    an input, exact as a TF32 operand, while y * P_M would be rounded. With dO constant along a row
    that rounding error is the same for the whole row, and dq = phi' (S g + z c) cancels its two
    terms: the rounded S g against the exact fp32 z c gave errors ~30x the inputs' rounding (fp16,
    positive inputs). bf16 dots keep the product in the operand: the extra fp32 tile spills on sm_80.
    """
    p = select_position_feature(axes, M, N_FEAT, N_AXES, VARIANT, HAS_PREFIX, IS_QUERY, ACC)
    state = tl.load(m_base + M * D * DV + offs_d[:, None] * DV + offs_e[None, :],
                    mask=mask_d[:, None] & mask_e[None, :], other=0.0)
    if DOT == tl.bfloat16 or PREC == "emulate_bf16":
        return mma(y * p[:, None], tl.trans(state), acc, DOT, PREC)
    else:
        return acc + p[:, None] * mma(y, tl.trans(state), tl.zeros(acc.shape, acc.dtype), DOT, PREC)


@triton.jit
def _contract_dv_tile(y_base, m_base, acc, axes, offs_n, mask_n, offs_d, mask_d, e0, D, DV,
                      syn, syd, N_FEAT: tl.constexpr, N_AXES: tl.constexpr, VARIANT: tl.constexpr,
                      HAS_PREFIX: tl.constexpr, IS_QUERY: tl.constexpr, BLOCK_DV: tl.constexpr,
                      ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """Adds sum_m P_m(i) y_i M_m^T over one Dv tile to acc [BLOCK_N, BLOCK_D]."""
    offs_e = e0 + tl.arange(0, BLOCK_DV)
    mask_e = offs_e < DV
    y = tl.load(y_base + offs_n[:, None] * syn + offs_e[None, :] * syd,
                mask=mask_n[:, None] & mask_e[None, :], other=0.0).to(ACC)
    return contract_dv_features(y, acc, m_base, axes, offs_d, mask_d, offs_e, mask_e, D, DV, N_FEAT, N_AXES, VARIANT,
                                HAS_PREFIX, IS_QUERY, ACC, DOT, PREC)


@triton.jit
def contract_dv_features(y, acc, m_base, axes, offs_d, mask_d, offs_e, mask_e, D, DV, N_FEAT: tl.constexpr,
                         N_AXES: tl.constexpr, VARIANT: tl.constexpr, HAS_PREFIX: tl.constexpr,
                         IS_QUERY: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """acc [BLOCK_N, BLOCK_D] += sum_m P_m y M_m[d tile, dv tile]^T for the y [BLOCK_N, BLOCK_DV] tile (ACC)."""
    if N_FEAT == 1:  # see _contract_d_tile
        for M in tl.static_range(N_FEAT):
            acc = contract_dv_feature(y, acc, M, m_base, axes, offs_d, mask_d, offs_e, mask_e, D, DV,
                                      N_FEAT, N_AXES, VARIANT, HAS_PREFIX, IS_QUERY, ACC, DOT, PREC)
    else:
        for M in tl.range(N_FEAT, loop_unroll_factor=1, num_stages=1):
            acc = contract_dv_feature(y, acc, M, m_base, axes, offs_d, mask_d, offs_e, mask_e, D, DV,
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
def contract_dv_kernel(x_ptr, y_ptr, m_ptr, z_ptr, rs_ptr, rz_ptr, o_ptr, den_ptr, out_ptr, H, N, D, DV, n_prefix,
                       s0, s1, s2, out_scale, den_floor, eps, sxb, sxh, sxn, sxd, syb, syh, syn, syd,
                       s_ob, s_oh, s_on, s_od, sob, soh, son, sod,
                       N_FEAT: tl.constexpr, N_AXES: tl.constexpr, VARIANT: tl.constexpr,
                       HAS_PREFIX: tl.constexpr, IS_QUERY: tl.constexpr, FMAP: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DV: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                       seq_ptr=None, factor_ptr=None, VARLEN: tl.constexpr = False):
    """Grid (cdiv(N, BLOCK_N), BH, n_d_tiles). x [B, H, N, D], y [B, H, N, DV], out [B, H, N, D] strided;
    rs, rz [BH, N] ACC: read (ROWS_LOAD), or computed here (ROWS_COMPUTE / ROWS_FROM_ACC: y = dO, den
    [BH, N] ACC, den_floor and eps scaled like den; ROWS_COMPUTE also reads o [B, H, N, DV] strided
    (strides s_o*); written by the first D tile). ROWS_FROM_ACC needs D <= BLOCK_D.
    VARLEN: grid (cdiv(longest sequence, BLOCK_N), S * H, n_d_tiles); factor[seq]
    multiplies den_floor and eps when the row weights are computed here, else out_scale."""
    bh, b, h, offs_n, mask_n, start, active, s0, s1, s2 = token_block(H, N, s0, s1, s2, seq_ptr, BLOCK_N, IS_QUERY,
                                                                      VARLEN)
    d0 = tl.program_id(2) * BLOCK_D
    m_base = m_ptr + bh.to(tl.int64) * N_FEAT * D * DV
    z_base = z_ptr + bh.to(tl.int64) * N_FEAT * D
    y_base = y_ptr + b * syb + h * syh
    offs_d = d0 + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    if VARLEN:
        if not active:
            return
        y_base = y_ptr + h * syh + start * syn
        # The other pointers move into the sequence's window (tokens from start, rows h * N + start of
        # the [H, N] buffers) where they are used, not here: held across the loop, they cost registers
        # the kernel parameters do not.

    # Every feature is picked from the same per-axis cos / sin: computed once per program (per feature,
    # each of the F features re-evaluated its axes' polynomials for every row a thread holds).
    axes = position_axes(offs_n, n_prefix, s0, s1, s2, N_AXES, VARIANT, HAS_PREFIX, ACC)
    acc = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    for e0 in range(0, DV, BLOCK_DV):
        acc = _contract_dv_tile(y_base, m_base, acc, axes, offs_n, mask_n, offs_d, mask_d, e0, D, DV,
                                syn, syd, N_FEAT, N_AXES, VARIANT, HAS_PREFIX, IS_QUERY, BLOCK_DV, ACC, DOT, PREC)
    rows = bh * N
    if VARLEN:
        rows = h * N + start
        x_base = x_ptr + h * sxh + start * sxn
    else:
        x_base = x_ptr + b * sxb + h * sxh
    mask = mask_n[:, None] & mask_d[None, :]
    if ROWS == ROWS_FROM_ACC:
        # q in its own dtype until phi' is applied: half the registers of phi in ACC (the dq pass sits at
        # the 255-register limit on sm_80).
        x = tl.load(x_base + offs_n[:, None] * sxn + offs_d[None, :] * sxd, mask=mask, other=0.0)
    if ROWS == ROWS_COMPUTE or ROWS == ROWS_FROM_ACC:
        if ROWS == ROWS_FROM_ACC:
            den = tl.load(den_ptr + rows + offs_n, mask=mask_n, other=1.0)
            delta = tl.sum(feature_map(x.to(ACC), mask, FMAP) * acc, axis=1) / den
        else:
            # After the main loop, as its own loop over the Dv tiles (their dO tiles come again, from
            # L2): summed inside the main loop (sm_80, bf16 D128 packed, 3.9) or before it (sm_90a,
            # fp32 D40 unaligned, 3.9), ptxas spilled 8 B.
            if VARLEN:
                o_base = o_ptr + h * s_oh + start * s_on
            else:
                o_base = o_ptr + b * s_ob + h * s_oh
            delta = row_delta(y_base, o_base, offs_n, mask_n, DV, syn, syd, s_on, s_od, BLOCK_N, BLOCK_DV, ACC)
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
        x = tl.load(x_base + offs_n[:, None] * sxn + offs_d[None, :] * sxd, mask=mask, other=0.0)
    acc = mul_feature_map_grad(acc, x.to(ACC), FMAP) * out_scale
    if VARLEN:
        out_base = out_ptr + h * soh + start * son
    else:
        out_base = out_ptr + b * sob + h * soh
    tl.store(out_base + offs_n[:, None] * son + offs_d[None, :] * sod, acc.to(out_ptr.dtype.element_ty), mask=mask)


@launch_jit
def row_weights_kernel(do_ptr, o_ptr, den_ptr, rs_ptr, rz_ptr, H, N, DV, den_floor, eps,
                       sgb, sgh, sgn, sgd, sob, soh, son, sod,
                       BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, ACC: tl.constexpr,
                       seq_ptr=None, factor_ptr=None, VARLEN: tl.constexpr = False):
    """rs_i = 1 / den_i, rz_i = -(dO_i . o_i) / den_i (0 where den_i = den_floor + eps: the floor is active
    and den carries no gradient; den_floor, eps scaled like den). Grid (cdiv(N, BLOCK_N), BH). dO, o [B, H, N, DV]
    strided; den, rs, rz [BH, N] ACC. VARLEN (over the queries): factor[seq] multiplies den_floor and eps."""
    bh, b, h, offs_n, mask_n, start, active, _s0, _s1, _s2 = token_block(H, N, 1, 1, 1, seq_ptr, BLOCK_N, True,
                                                                         VARLEN)
    if VARLEN:
        if not active:
            return
        factor = tl.load(factor_ptr + bh // H)
        den_floor = den_floor * factor
        eps = eps * factor
        # Base pointers shifted into the sequence's window (see contract_dv_kernel).
        b = b * 0
        do_ptr += start * sgn
        o_ptr += start * son
        den_ptr += h * N + start - bh * N
        rs_ptr += h * N + start - bh * N
        rz_ptr += h * N + start - bh * N
    delta = row_delta(do_ptr + b * sgb + h * sgh, o_ptr + b * sob + h * soh, offs_n, mask_n, DV, sgn, sgd, son, sod,
                      BLOCK_N, BLOCK_DV, ACC)
    den = tl.load(den_ptr + bh * N + offs_n, mask=mask_n, other=1.0)
    rs, rz = row_weights(delta, den, den_floor, eps)
    tl.store(rs_ptr + bh * N + offs_n, rs, mask=mask_n)
    tl.store(rz_ptr + bh * N + offs_n, rz, mask=mask_n)
