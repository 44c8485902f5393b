"""The VVT authors' magnitude clamp (``abs_clamp``) and its backward, for the fused path.

    C(x) = sign(x) * min(max(|x|, lo), hi)     (zeros stay 0, NaN stays NaN)
    C'(x) = 1 where lo <= |x| <= hi and x != 0, else 0

Forward: the states S are clamped in place between the state pass and the output pass
(``state_clamp_kernel``); the output kernel clamps the numerator, 1/den and the output in its
epilogue (``output.py``). Backward (``clamped_row_weights_kernel``), with n_pre the unclamped
numerator recomputed from the clamped states, r_pre = 1/den, n = C(n_pre), r = C(r_pre), u = n r:
    dU = dO C'(u),   g = dU r C'(n_pre),   c = -(dU . n) C'(r_pre) r_pre^2   (0 where the floor is active)
replace g = dO/den and c = -(dO.o)/den of the unclamped backward, and dS is masked by C'(S)
(``state_grad_mask_kernel``, read off the clamped state: strictly inside (lo, hi)).
All values arrive scaled by the power of two s_k of ``vicinity_forward``; the clamps act on the
unscaled values, so bounds are scaled by s_k (or values unscaled by 1/s_k), exactly.
VARLEN (packed sequences, varlen.py): s_k is per sequence, the factor table's entry (factor[seq]).
"""
import triton
import triton.language as tl

from ..runtime import launch_jit
from .varlen import token_block


@triton.jit
def abs_clamp(x, lo, hi):
    """|x| into [lo, hi], sign kept; zeros and NaN pass through (where(), not min/max)."""
    a = tl.abs(x)
    a = tl.where(a < lo, lo, tl.where(a > hi, hi, a))
    return tl.where(x < 0, -a, tl.where(x > 0, a, x))


@triton.jit
def without_floor_rows(x, den, den_floor, eps):
    """x, with 0 in the rows whose den is the floor (den = den_floor + eps): there den is a constant and
    carries no gradient. The threshold is computed the way the forward computed a floored den (in ACC)."""
    return tl.where((den_floor > 0) & (den <= (tl.zeros_like(den) + den_floor) + eps), 0.0, x)


@triton.jit
def clamp_passes(x, lo, hi):
    """C'(x): 1.0 where lo <= |x| <= hi and x != 0, else 0.0, in x's dtype."""
    a = tl.abs(x)
    return tl.where((a >= lo) & (a <= hi) & (a > 0), 1.0, 0.0).to(x.dtype)


@launch_jit
def state_clamp_kernel(s_ptr, n_rows, lo, hi, BLOCK: tl.constexpr, factor_ptr=None, rows_per_seq=None,
                       VARLEN: tl.constexpr = False):
    """s = C(s) in place over n_rows contiguous ACC values (bounds already scaled like s; VARLEN: bounds
    times factor[value index // rows_per_seq], the scale of the value's sequence)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_rows
    s = tl.load(s_ptr + offs, mask=mask, other=0.0)
    if VARLEN:
        factor = tl.load(factor_ptr + offs // rows_per_seq, mask=mask, other=1.0)
        tl.store(s_ptr + offs, abs_clamp(s, lo * factor, hi * factor), mask=mask)
    else:
        tl.store(s_ptr + offs, abs_clamp(s, lo, hi), mask=mask)


@launch_jit
def state_grad_mask_kernel(ds_ptr, s_ptr, n_rows, lo, hi, BLOCK: tl.constexpr, factor_ptr=None, rows_per_seq=None,
                           VARLEN: tl.constexpr = False):
    """ds *= [lo < |s| < hi] over n_rows contiguous ACC values, s the clamped state (bounds scaled like s;
    VARLEN: as state_clamp_kernel)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_rows
    s = tl.abs(tl.load(s_ptr + offs, mask=mask, other=0.0))
    ds = tl.load(ds_ptr + offs, mask=mask, other=0.0)
    if VARLEN:
        factor = tl.load(factor_ptr + offs // rows_per_seq, mask=mask, other=1.0)
        tl.store(ds_ptr + offs, tl.where((s > lo * factor) & (s < hi * factor), ds, 0.0), mask=mask)
    else:
        tl.store(ds_ptr + offs, tl.where((s > lo) & (s < hi), ds, 0.0), mask=mask)


@launch_jit
def clamped_row_weights_kernel(
    # pointers: dO, the unclamped numerator n, den; outputs g, row weights rs / rz
    do_ptr, n_ptr, den_ptr, g_ptr, rs_ptr, rz_ptr,
    # sizes (H, N: runtime, never specialised) and scalars
    H, N, DV, den_floor, eps, lo, hi, state_scale,
    # strides
    stride_do_b, stride_do_h, stride_do_n, stride_do_d, stride_g_b, stride_g_h, stride_g_n, stride_g_d,
    # constexprs: tiles, accumulation dtype
    BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, ACC: tl.constexpr,
    # packed (varlen) launches only: the sequence table and the per-sequence factors
    seq_ptr=None, factor_ptr=None, VARLEN: tl.constexpr = False,
):
    """Grid (cdiv(N, BLOCK_N), BH). dO [B, H, N, DV] strided; n [BH, N, DV] contiguous ACC, the scaled
    unclamped numerator s_k n_pre; den [BH, N] ACC (scaled). Writes g / s_k into g [B, H, N, DV] (strided,
    dO's dtype), rs = 1 and rz = c / s_k [BH, N] ACC (module docstring). VARLEN (over the
    queries): n [H, N, DV], factor[seq] multiplies den_floor, eps and state_scale."""
    bh, b, h, offs_n, mask_n, start, active, _grid_0, _grid_1, _grid_2 = token_block(
        H, N, 1, 1, 1, seq_ptr, BLOCK_N, True, VARLEN)
    if VARLEN:
        if not active:
            return
        factor = tl.load(factor_ptr + bh // H)
        # A [BLOCK_N] vector, not a scalar: the interpreter cannot '&' a loaded scalar's comparison.
        den_floor = tl.zeros((BLOCK_N,), ACC) + den_floor * factor
        eps = eps * factor
        state_scale = state_scale * factor
        # The sequence's window: batch 0, rows h * N + start of the [H, N] buffers (h is int64).
        b = b * 0
        do_ptr += start * stride_do_n
        g_ptr += start * stride_g_n
        row0 = h * N + start
    else:
        row0 = bh.to(tl.int64) * N
    inv_scale = 1.0 / state_scale
    den = tl.load(den_ptr + row0 + offs_n, mask=mask_n, other=1.0)
    r_pre = state_scale / den
    r = abs_clamp(r_pre, lo, hi)
    n_base = n_ptr + row0 * DV
    dr = tl.zeros((BLOCK_N,), ACC)
    for e0 in range(0, DV, BLOCK_DV):
        offs_e = e0 + tl.arange(0, BLOCK_DV)
        mask = mask_n[:, None] & (offs_e[None, :] < DV)
        do = tl.load(do_ptr + b * stride_do_b + h * stride_do_h + offs_n[:, None] * stride_do_n
                     + offs_e[None, :] * stride_do_d, mask=mask, other=0.0).to(ACC)
        n_pre = tl.load(n_base + offs_n[:, None] * DV + offs_e[None, :], mask=mask, other=0.0) * inv_scale
        n = abs_clamp(n_pre, lo, hi)
        du = do * clamp_passes(n * r[:, None], lo, hi)
        dr += tl.sum(du * n, axis=1)
        g = du * r[:, None] * clamp_passes(n_pre, lo, hi) * inv_scale
        tl.store(g_ptr + b * stride_g_b + h * stride_g_h + offs_n[:, None] * stride_g_n
                 + offs_e[None, :] * stride_g_d, g.to(g_ptr.dtype.element_ty), mask=mask)
    c = -dr * clamp_passes(r_pre, lo, hi) * r_pre * r_pre * inv_scale
    c = without_floor_rows(c, den, den_floor, eps)
    tl.store(rs_ptr + row0 + offs_n, tl.full((BLOCK_N,), 1.0, ACC), mask=mask_n)
    tl.store(rz_ptr + row0 + offs_n, c, mask=mask_n)
