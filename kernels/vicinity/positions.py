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

HALF_PI = tl.constexpr(1.5707963267948966)


@triton.jit
def axis_angle(g, grid_0, grid_1, grid_2, A: tl.constexpr, N_AXES: tl.constexpr, DTYPE: tl.constexpr):
    """theta_A = (pi/2) * coord_A / size_A for grid-token indices g (int tensor, row-major, >= 0).

    Per row a thread holds, so kept cheap: g >= 0 and the sizes > 0, so the coordinates come from an
    unsigned division (no sign fix-ups), and the angle is c * ((pi/2) / size), one multiply a row with the
    scalar factor computed once (an IEEE division per row is ~10 instructions). Within 2 ulp of the
    PyTorch side's (c * pi/2) / size."""
    if N_AXES == 1:
        c = g
        s = grid_0
    else:
        gu = g.to(tl.uint32)
        if N_AXES == 2:
            if A == 0:
                c = gu // grid_1.to(tl.uint32)
                s = grid_0
            else:
                c = gu % grid_1.to(tl.uint32)
                s = grid_1
        else:
            if A == 0:
                c = gu // (grid_1 * grid_2).to(tl.uint32)
                s = grid_0
            elif A == 1:
                c = (gu // grid_2.to(tl.uint32)) % grid_1.to(tl.uint32)
                s = grid_1
            else:
                c = gu % grid_2.to(tl.uint32)
                s = grid_2
    return c.to(DTYPE) * (HALF_PI / s.to(DTYPE))


@triton.jit
def cos_sin_quarter(theta):
    """(cos theta, sin theta) for theta in [0, pi/2), by Taylor polynomials around pi/4.

    Angles here never leave [0, pi/2), so no range reduction is needed: libdevice's cos/sin carry a
    large-argument slow path with a local-memory array (stack), which would blur the compile gate's
    zero-stack (= zero-spill) check. Truncation error on |x| <= pi/4: < 1e-17 in fp64; in fp32, terms
    to x^9 (sin) and x^10 (cos), < 2e-9, below fp32's rounding (6e-8), in Horner form (one FMA a term:
    every kernel evaluates this for each token row a thread holds, once per axis).
    """
    x = theta - 0.7853981633974483
    x2 = x * x
    if theta.dtype == tl.float64:
        c, s = _cos_sin_taylor_fp64(x, x2)
    else:
        s = x * (1.0 + x2 * (-1.0 / 6.0 + x2 * (1.0 / 120.0 + x2 * (-1.0 / 5040.0 + x2 * (1.0 / 362880.0)))))
        c = 1.0 + x2 * (-0.5 + x2 * (1.0 / 24.0 + x2 * (-1.0 / 720.0 + x2 * (1.0 / 40320.0
                                                                            + x2 * (-1.0 / 3628800.0)))))
    # cos(pi/4 + x) = (cos x - sin x) / sqrt 2,  sin(pi/4 + x) = (cos x + sin x) / sqrt 2.
    # sin 0 exactly 0 (c + s leaves rounding noise there): the states of coordinate-0 tokens are then
    # exact zeros, as in the authors' code, which the VVT clamp would otherwise blow up to +-min_mag.
    return (c - s) * 0.7071067811865476, tl.where(theta == 0, 0.0, (c + s) * 0.7071067811865476)


@triton.jit
def _cos_sin_taylor_fp64(x, x2):
    """(cos x, sin x) for |x| <= pi/4 to fp64 accuracy (terms to x^17 / x^18, nested)."""
    s = 1.0 - x2 * (1.0 / 272.0)
    s = 1.0 - x2 * (1.0 / 210.0) * s
    s = 1.0 - x2 * (1.0 / 156.0) * s
    s = 1.0 - x2 * (1.0 / 110.0) * s
    s = 1.0 - x2 * (1.0 / 72.0) * s
    s = 1.0 - x2 * (1.0 / 42.0) * s
    s = 1.0 - x2 * (1.0 / 20.0) * s
    s = x * (1.0 - x2 * (1.0 / 6.0) * s)
    c = 1.0 - x2 * (1.0 / 306.0)
    c = 1.0 - x2 * (1.0 / 240.0) * c
    c = 1.0 - x2 * (1.0 / 182.0) * c
    c = 1.0 - x2 * (1.0 / 132.0) * c
    c = 1.0 - x2 * (1.0 / 90.0) * c
    c = 1.0 - x2 * (1.0 / 56.0) * c
    c = 1.0 - x2 * (1.0 / 30.0) * c
    c = 1.0 - x2 * (1.0 / 12.0) * c
    c = 1.0 - x2 * 0.5 * c
    return c, s


@triton.jit
def _axis_cos_sin(g, grid_0, grid_1, grid_2, A: tl.constexpr, N_AXES: tl.constexpr, DTYPE: tl.constexpr):
    """(cos theta_A, sin theta_A) of grid tokens g; (1, 0) for axes beyond N_AXES (never selected)."""
    if A < N_AXES:
        return cos_sin_quarter(axis_angle(g, grid_0, grid_1, grid_2, A, N_AXES, DTYPE))
    else:
        return tl.full(g.shape, 1.0, DTYPE), tl.zeros(g.shape, DTYPE)


@triton.jit
def position_axes(tok, n_prefix, grid_0, grid_1, grid_2, N_AXES: tl.constexpr, VARIANT: tl.constexpr,
                  HAS_PREFIX: tl.constexpr, DTYPE: tl.constexpr):
    """The per-axis values every feature of the tokens ``tok`` is picked from: (cos theta_a, sin theta_a)
    for the axes a = 0, 1, 2 ((1, 0) beyond N_AXES and for the "none" variant) and whether the token is
    a grid token (True everywhere without prefix tokens). A kernel that walks the F features of one
    token block computes these once and calls :func:`select_position_feature` per feature.
    Arguments as in :func:`position_feature`."""
    g = tok - n_prefix
    is_grid = g >= 0
    if HAS_PREFIX:
        g = tl.maximum(g, 0)
    if VARIANT == 0:
        c0, n0 = _axis_cos_sin(g, grid_0, grid_1, grid_2, 3, N_AXES, DTYPE)
        c1, n1 = c0, n0
        c2, n2 = c0, n0
    else:
        c0, n0 = _axis_cos_sin(g, grid_0, grid_1, grid_2, 0, N_AXES, DTYPE)
        c1, n1 = _axis_cos_sin(g, grid_0, grid_1, grid_2, 1, N_AXES, DTYPE)
        c2, n2 = _axis_cos_sin(g, grid_0, grid_1, grid_2, 2, N_AXES, DTYPE)
    return c0, n0, c1, n1, c2, n2, is_grid


@triton.jit
def select_position_feature(axes, m, N_FEAT: tl.constexpr, N_AXES: tl.constexpr, VARIANT: tl.constexpr,
                            HAS_PREFIX: tl.constexpr, IS_QUERY: tl.constexpr, DTYPE: tl.constexpr):
    """Feature m [BLOCK] DTYPE from the tuple :func:`position_axes` returned (selects and at most two
    products)."""
    c0, n0, c1, n1, c2, n2, is_grid = axes
    BASE: tl.constexpr = N_FEAT - 2 * HAS_PREFIX
    one = tl.full(c0.shape, 1.0, DTYPE)
    if VARIANT == 0:
        val = one
    elif VARIANT == 1:
        # m = 2 a + (1 for sin)
        val = tl.where(m % 2 == 1, n0, c0)
        if N_AXES > 1:
            val = tl.where(m // 2 == 1, tl.where(m % 2 == 1, n1, c1), val)
        if N_AXES > 2:
            val = tl.where(m // 2 == 2, tl.where(m % 2 == 1, n2, c2), val)
    else:
        # bit (N_AXES - 1 - a) of m picks sin for axis a
        val = tl.where((m >> (N_AXES - 1)) % 2 == 1, n0, c0)
        if N_AXES > 1:
            val = val * tl.where((m >> (N_AXES - 2)) % 2 == 1, n1, c1)
        if N_AXES > 2:
            val = val * tl.where(m % 2 == 1, n2, c2)
    if HAS_PREFIX:
        zero = tl.zeros(c0.shape, DTYPE)
        val = tl.where(is_grid, val, zero)
        # query: [.., 1, 0] for grid tokens, [0.., 1, 1] for prefix; key: [.., 0, 1] / [0.., 1, 0]
        if IS_QUERY:
            tail0 = one
            tail1 = tl.where(is_grid, zero, one)
        else:
            tail0 = tl.where(is_grid, zero, one)
            tail1 = tl.where(is_grid, one, zero)
        val = tl.where(m == BASE, tail0, tl.where(m == BASE + 1, tail1, val))
    return val


@triton.jit
def position_feature(tok, m, n_prefix, grid_0, grid_1, grid_2, N_FEAT: tl.constexpr, N_AXES: tl.constexpr,
                     VARIANT: tl.constexpr, HAS_PREFIX: tl.constexpr, IS_QUERY: tl.constexpr,
                     DTYPE: tl.constexpr):
    """Feature m of the tokens ``tok`` ([BLOCK] int32 indices into the launch's tokens) -> [BLOCK] DTYPE.

    ``n_prefix``: the index of the first grid token among the launch's tokens, i.e. the number of
    prefix tokens when the launch holds the whole sequence; a launch over a shard that starts at
    sequence position ``t0`` (context parallelism) passes ``num_prefix_tokens - t0``, negative when
    the shard starts inside the grid (also without prefix tokens: grid index = tok - n_prefix).
    m may be a runtime int (a loop counter) or a constexpr. Each axis' cos / sin is evaluated once
    and the feature picked with selects, so a runtime m costs N_AXES polynomial pairs, not F.
    """
    axes = position_axes(tok, n_prefix, grid_0, grid_1, grid_2, N_AXES, VARIANT, HAS_PREFIX, DTYPE)
    return select_position_feature(axes, m, N_FEAT, N_AXES, VARIANT, HAS_PREFIX, IS_QUERY, DTYPE)


@triton.jit
def _position_features_kernel(out_ptr, N, n_prefix, grid_0, grid_1, grid_2, N_FEAT: tl.constexpr,
                              N_AXES: tl.constexpr, VARIANT: tl.constexpr, HAS_PREFIX: tl.constexpr,
                              IS_QUERY: tl.constexpr, BLOCK: tl.constexpr):
    """Test helper: writes the [N, N_FEAT] features (used only to check the jit helpers)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    for M in tl.static_range(N_FEAT):
        p = position_feature(offs, M, n_prefix, grid_0, grid_1, grid_2, N_FEAT, N_AXES, VARIANT, HAS_PREFIX, IS_QUERY,
                             out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs * N_FEAT + M, p, mask=mask)
    m_dyn = tl.program_id(1)
    p = position_feature(offs, m_dyn, n_prefix, grid_0, grid_1, grid_2, N_FEAT, N_AXES, VARIANT, HAS_PREFIX, IS_QUERY,
                         out_ptr.dtype.element_ty)
    # Second half of the buffer: the runtime-m path, one column per program along axis 1.
    tl.store(out_ptr + N * N_FEAT + offs * N_FEAT + m_dyn, p, mask=mask)
