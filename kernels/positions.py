"""Position features P computed inside the kernels from token indices (never stored).

Mirrors ``vicinity_attn.positions.position_features`` exactly, feature order included:
"none" -> [1]; "sum" -> [cos t_0, sin t_0, cos t_1, sin t_1, ...]; "product" -> all products
choosing cos or sin per axis, axis a taking sin when bit (N_AXES - 1 - a) of m is set; with
prefix tokens two features are appended (grid query [P, 1, 0], grid key [P, 0, 1],
prefix query [0, 1, 1], prefix key [0, 1, 0]); prefix tokens come first in the sequence.

Grid sizes are runtime integers so a new resolution does not recompile; the number of axes,
the variant, the prefix flag and the side (query / key) are constexprs.
"""
import triton
import triton.language as tl

VARIANT_NONE = 0
VARIANT_SUM = 1
VARIANT_PRODUCT = 2

HALF_PI = 1.5707963267948966


@triton.jit
def axis_angle(g, s0, s1, s2, A: tl.constexpr, N_AXES: tl.constexpr, DTYPE: tl.constexpr):
    """theta_A = (pi/2) * coord_A / size_A for grid-token indices g (int tensor, row-major, >= 0)."""
    if N_AXES == 1:
        c = g
        s = s0
    elif N_AXES == 2:
        if A == 0:
            c = g // s1
            s = s0
        else:
            c = g % s1
            s = s1
    else:
        if A == 0:
            c = g // (s1 * s2)
            s = s0
        elif A == 1:
            c = (g // s2) % s1
            s = s1
        else:
            c = g % s2
            s = s2
    # Same operation order as the PyTorch side: (c * pi/2) / size.
    return (c.to(DTYPE) * HALF_PI) / s.to(DTYPE)


@triton.jit
def position_feature(tok, n_prefix, s0, s1, s2, M: tl.constexpr, N_FEAT: tl.constexpr,
                     N_AXES: tl.constexpr, VARIANT: tl.constexpr, HAS_PREFIX: tl.constexpr,
                     IS_QUERY: tl.constexpr, DTYPE: tl.constexpr):
    """Feature M (a constexpr) of the tokens ``tok`` ([BLOCK] int32 sequence indices) -> [BLOCK] DTYPE."""
    if HAS_PREFIX:
        g = tok - n_prefix
        is_grid = g >= 0
        g = tl.maximum(g, 0)
    else:
        g = tok
        is_grid = tok >= 0
    BASE: tl.constexpr = N_FEAT - 2 * HAS_PREFIX
    one = tl.full(tok.shape, 1.0, DTYPE)
    zero = tl.zeros(tok.shape, DTYPE)
    if M < BASE:
        if VARIANT == 0:
            val = one
        elif VARIANT == 1:
            theta = axis_angle(g, s0, s1, s2, M // 2, N_AXES, DTYPE)
            if M % 2 == 0:
                val = tl.cos(theta)
            else:
                val = tl.sin(theta)
        else:
            val = one
            for a in tl.static_range(N_AXES):
                theta = axis_angle(g, s0, s1, s2, a, N_AXES, DTYPE)
                if (M >> (N_AXES - 1 - a)) % 2 == 1:
                    val = val * tl.sin(theta)
                else:
                    val = val * tl.cos(theta)
        if HAS_PREFIX:
            val = tl.where(is_grid, val, zero)
    elif M == BASE:
        # query: 1 for grid and prefix tokens; key: 0 for grid tokens, 1 for prefix tokens
        if IS_QUERY:
            val = one
        else:
            val = tl.where(is_grid, zero, one)
    else:
        # query: 0 for grid tokens, 1 for prefix tokens; key: 1 for grid tokens, 0 for prefix tokens
        if IS_QUERY:
            val = tl.where(is_grid, zero, one)
        else:
            val = tl.where(is_grid, one, zero)
    return val


@triton.jit
def position_feature_dyn(tok, m, n_prefix, s0, s1, s2, N_FEAT: tl.constexpr, N_AXES: tl.constexpr,
                         VARIANT: tl.constexpr, HAS_PREFIX: tl.constexpr, IS_QUERY: tl.constexpr,
                         DTYPE: tl.constexpr):
    """Feature m (a runtime int, e.g. from the program id) of tokens ``tok`` -> [BLOCK] DTYPE.

    Evaluates every feature and selects one: F <= 10 cheap elementwise terms per token, small next to
    the D x Dv dot each token feeds.
    """
    val = tl.zeros(tok.shape, DTYPE)
    for M in tl.static_range(N_FEAT):
        val = tl.where(m == M, position_feature(tok, n_prefix, s0, s1, s2, M, N_FEAT, N_AXES, VARIANT,
                                                HAS_PREFIX, IS_QUERY, DTYPE), val)
    return val


@triton.jit
def _position_features_kernel(out_ptr, N, n_prefix, s0, s1, s2, N_FEAT: tl.constexpr,
                              N_AXES: tl.constexpr, VARIANT: tl.constexpr, HAS_PREFIX: tl.constexpr,
                              IS_QUERY: tl.constexpr, BLOCK: tl.constexpr):
    """Test helper: writes the [N, N_FEAT] features (used only to check the jit helpers)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    for M in tl.static_range(N_FEAT):
        p = position_feature(offs, n_prefix, s0, s1, s2, M, N_FEAT, N_AXES, VARIANT, HAS_PREFIX, IS_QUERY,
                             out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs * N_FEAT + M, p, mask=mask)
    m_dyn = tl.program_id(1)
    p = position_feature_dyn(offs, m_dyn, n_prefix, s0, s1, s2, N_FEAT, N_AXES, VARIANT, HAS_PREFIX,
                             IS_QUERY, out_ptr.dtype.element_ty)
    # Second half of the buffer: the runtime-m path, one column per program along axis 1.
    tl.store(out_ptr + N * N_FEAT + offs * N_FEAT + m_dyn, p, mask=mask)
