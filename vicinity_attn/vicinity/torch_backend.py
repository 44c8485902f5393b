"""The linear pure-PyTorch backend: runs on any device; the default where no GPU is present.

Per (batch, head) it keeps the feature states of the README's "The math in short", S_m = sum_j P_k(j)_m
phi(k_j) v_j^T and z_m = sum_j P_k(j)_m phi(k_j) for the F position features, but computes them,
the output and the gradients term by term over grid axes (:mod:`vicinity_attn.vicinity.axis_terms`): tokens
grouped by their coordinate on one axis share that axis's features, so each term costs one
D x Dv product per token instead of one per feature. For the paper's 2-d "sum" variant that is
half the FLOPs of the feature form (2 instead of 4 per token and pass), with no F*D-wide expanded
features at all; nothing Nq x Nk is ever formed.

Heads are independent, so the work runs in chunks of whole (batch, head) slices of about
CHUNK_BYTES per token-sized tensor: a chunk's temporaries stay in the CPU's caches (at 224x224 the
per-token cost then matches 56x56), and they are O(chunk), taken from the CPU scratch cache of
:mod:`vicinity_attn.vicinity.scratch`, so repeated calls do not fault fresh pages in.

Everything is computed in float32 (float64 for float64 inputs). :func:`forward` and
:func:`backward` are the bodies of the custom ops of :mod:`vicinity_attn.vicinity.ops`, which also carry
the autograd formula; what is saved for backward is q, k, v, o, den, S and z.
"""
from __future__ import annotations

import math

import torch

from ..common.allocation import compute_dtype, empty_grads_like, empty_output_like
from ..common.feature_maps import mul_feature_map_grad_
from ..common.overflow import raises_on_overflow
from ..common.positions import position_features
from ..common.spec import VicinitySpec
from .axis_terms import AxisTerm, axis_terms, group_by_axis, grouped_view
from .cpu_threads import with_call_threads
from .scratch import scratch, scratch_session

# Large temporaries are few, named scratch buffers (vicinity_attn.vicinity.scratch) and written in place on
# purpose: on a CPU every fresh multi-MB buffer costs page faults comparable to a matmul over it, so
# the passes below reuse buffers and write results with out= / in-place ops wherever possible.
# Scratch names in use: "phi" (phi(k), then phi(q), or the reverse in backward), "values",
# "grad_out", "acc_o" / "acc_q" / "acc_k" / "acc_v" (accumulators when an output cannot be one) and
# the _Workspace names; outputs and saved tensors are always fresh.

def _features(x: torch.Tensor, feature_map: str, dtype: torch.dtype, scratch_name: str | None = None) -> torch.Tensor:
    """phi(x) as a contiguous [B, H, n, D] tensor of ``dtype`` (x may be any strided view), written
    into the scratch buffer ``scratch_name`` when given (a temporary), else into a new tensor."""
    if scratch_name is not None:
        phi = scratch(scratch_name, x.numel(), dtype, x.device).view(x.shape)
    else:
        phi = torch.empty(x.shape, dtype=dtype, device=x.device)
    if feature_map == "relu":
        if x.dtype == dtype:
            return torch.clamp_min(x, 0, out=phi)
        return phi.copy_(x).clamp_min_(0)
    if feature_map == "elu1":
        return torch.nn.functional.elu_(phi.copy_(x)).add_(1.0)
    if feature_map == "identity":
        return phi.copy_(x)
    raise ValueError(f"unknown feature_map {feature_map!r}")


def _contiguous(x: torch.Tensor, dtype: torch.dtype, scratch_name: str) -> torch.Tensor:
    """x as a contiguous tensor of ``dtype``: x itself when it already is, else a scratch copy."""
    if x.dtype == dtype and x.is_contiguous():
        return x
    return scratch(scratch_name, x.numel(), dtype, x.device).view(x.shape).copy_(x)


class _Workspace:
    """The flat temporaries of one call, taken from :mod:`vicinity_attn.vicinity.scratch` on first use:
    grouped (axis-permuted) copies of inputs go to "inputs" / "inputs2" and matmul results to
    "results" (token-sized), per-coordinate mixed states to "mixed" (B*H*max(s)*D*Dv)."""

    def __init__(self, numel: int, mixed_numel: int, dtype: torch.dtype, device: torch.device):
        self._sizes = {"inputs": numel, "inputs2": numel, "results": numel, "mixed": mixed_numel}
        self._dtype, self._device = dtype, device
        self._buffers: dict[str, torch.Tensor] = {}

    def __getattr__(self, name: str) -> torch.Tensor:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._buffers:
            self._buffers[name] = scratch(name, self._sizes[name], self._dtype, self._device)
        return self._buffers[name]


def _add_ungrouped_(acc: torch.Tensor, y: torch.Tensor, grid, axis: int, scale: torch.Tensor | None) -> None:
    """acc [B, H, N, E] += y [B*H*s, n, E] put back in token order (times scale [N] per token)."""
    target = grouped_view(acc, grid, axis)
    y = y.view(target.shape)
    if scale is None:
        target.add_(y)
    else:
        target.addcmul_(y, grouped_view(scale.view(1, 1, -1, 1), grid, axis))


def _mix(coord: torch.Tensor, states: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """[s, G] coordinate features and [B, H, G, D, Dv] states -> [B*H*s, D, Dv] = sum_g coord[c, g] states[g],
    written into ``buffer`` (flat, large enough). Broadcast multiply-adds, not a matmul: with K = G <= 2
    a CPU matmul runs 6x slower than these."""
    B, H, G, D, Dv = states.shape
    s = coord.shape[0]
    out = buffer[:B * H * s * D * Dv].view(B, H, s, D * Dv)
    flat = states.reshape(B, H, G, 1, D * Dv)
    torch.mul(coord[:, 0, None], flat[:, :, 0], out=out)
    for g in range(1, G):
        out.addcmul_(coord[:, g, None], flat[:, :, g])
    return out.view(B * H * s, D, Dv)


def _per_coord(xg: torch.Tensor, yg: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """sum over each group of xg^T yg: grouped [B*H*s, n, D] and [B*H*s, n, Dv] -> [B*H*s, D, Dv],
    written into ``buffer``."""
    shape = (xg.shape[0], xg.shape[2], yg.shape[2])
    return torch.bmm(xg.transpose(1, 2), yg, out=buffer[:math.prod(shape)].view(shape))


def _unmix(coord: torch.Tensor, per_coord: torch.Tensor, B: int, H: int) -> torch.Tensor:
    """Adjoint of :func:`_mix`: [s, G] and [B*H*s, D, Dv] -> [B, H, G, D, Dv]."""
    s, G = coord.shape
    _, D, Dv = per_coord.shape
    return (coord.T @ per_coord.view(B, H, s, D * Dv)).view(B, H, G, D, Dv)


class _Accumulator:
    """A [B, H, n, E] sum of per-term grouped matmuls, held in ``out`` itself when that already has
    the compute dtype and is contiguous, else in the scratch buffer ``name`` (copy it out at the end).
    The first axis-0 term is written in place by the matmul (no zero fill, no add); later terms go
    through ``buffer`` and are added in token order."""

    def __init__(self, out: torch.Tensor, dtype: torch.dtype, name: str):
        ok = out.dtype == dtype and out.is_contiguous()
        self.tensor = out if ok else scratch(name, out.numel(), dtype, out.device).view(out.shape)
        self.fresh = True

    def add_bmm(self, a: torch.Tensor, b: torch.Tensor, grid, axis: int, scale: torch.Tensor | None,
                buffer: torch.Tensor) -> None:
        """self += ungroup(a @ b) * scale, for grouped a [B*H*s, n, K] and b [B*H*s, K, E]."""
        shape = (a.shape[0], a.shape[1], b.shape[2])
        if self.fresh and axis == 0 and scale is None:
            torch.bmm(a, b, out=self.tensor.view(shape))
            self.fresh = False
            return
        out = torch.bmm(a, b, out=buffer[:math.prod(shape)].view(shape))
        self.result()
        _add_ungrouped_(self.tensor, out, grid, axis, scale)

    def result(self) -> torch.Tensor:
        if self.fresh:
            self.tensor.zero_()
            self.fresh = False
        return self.tensor


def _scaled(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return x if scale is None else x * scale[:, None]


# Bytes per token-sized tensor of one chunk (one head at 112x112, D=64, fp32 is 3.2 MB): chunks that
# stay cache-friendly beat one unchunked pass; 1-8 MiB perform alike on the CPUs tried.
CHUNK_BYTES = 4 * 2 ** 20


class _Plan:
    """What forward and backward share: the axis terms, position features, sizes, prefix split and
    the (batch, head) chunks."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: VicinitySpec, dtype):
        self.spec, self.dtype = spec, dtype
        self.P, self.F = spec.num_prefix_tokens, spec.n_features
        B, H, self.Nq, self.D = q.shape
        self.Nk, self.Dv = k.shape[2], v.shape[-1]
        # The grids the terms group tokens by. Variant "none" has no position dependence: one group of
        # all tokens, not grid[0] groups with a copy of the state each (1000x slower on a 1-d grid).
        if spec.variant == "none":
            self.grid_q, self.grid_k = (1, self.Nq - self.P), (1, self.Nk - self.P)
        else:
            self.grid_q, self.grid_k = spec.grid, spec.kv_grid
        self.terms: list[AxisTerm] = axis_terms(self.grid_q, self.grid_k, spec.variant, dtype=dtype, device=q.device)
        kw = dict(num_prefix_tokens=self.P, dtype=dtype, device=q.device)
        self.pos_q = position_features(spec.grid, spec.variant, side="query", **kw)   # [Nq, F]
        self.pos_k = position_features(spec.kv_grid, spec.variant, side="key", **kw)  # [Nk, F]
        head_bytes = max(self.Nq, self.Nk) * max(self.D, self.Dv) * dtype.itemsize
        self.chunks = _head_chunks(B, H, max(1, CHUNK_BYTES // max(head_bytes, 1)))

    def workspace(self, heads: int, device: torch.device) -> _Workspace:
        """The temporaries of a chunk of ``heads`` (batch, head) slices."""
        numel = heads * max(self.Nq, self.Nk) * max(self.D, self.Dv)
        max_coords = max(max(t.coord_q.shape[0], t.coord_k.shape[0]) for t in self.terms)
        return _Workspace(numel, heads * max_coords * self.D * self.Dv, self.dtype, device)


def _head_chunks(B: int, H: int, per_chunk: int) -> list[tuple[slice, slice]]:
    """Index pairs (batch slice, head slice) covering [B, H] in chunks of at most ``per_chunk``
    (batch, head) slices: whole batch entries when a chunk holds all H heads, else head ranges."""
    if per_chunk >= H:
        step = per_chunk // H
        return [(slice(b, min(b + step, B)), slice(None)) for b in range(0, B, step)]
    return [(slice(b, b + 1), slice(h, min(h + per_chunk, H))) for b in range(B) for h in range(0, H, per_chunk)]


@raises_on_overflow("forward", 3)
@with_call_threads   # threads per call from its size and the cores left idle (cpu_threads.py)
def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            spec: VicinitySpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward pass: (o, den, S, z).

    o [B, H, Nq, Dv] in q's dtype and memory order; den [B, H, Nq] (eps included), S [B, H, F*D, Dv]
    and z [B, H, F*D] in the compute dtype (float32, float64 for float64 inputs): what
    :func:`backward` needs.
    """
    dtype = compute_dtype(q.dtype)
    pl = _Plan(q, k, v, spec, dtype)
    B, H = q.shape[:2]
    o = empty_output_like(q, pl.Dv)
    den = torch.empty(B, H, pl.Nq, dtype=dtype, device=q.device)
    S = torch.zeros(B, H, pl.F, pl.D, pl.Dv, dtype=dtype, device=q.device)
    z = torch.empty(B, H, pl.F, pl.D, dtype=dtype, device=q.device)
    with scratch_session():
        for c in pl.chunks:
            _forward_chunk(pl, q[c], k[c], v[c], o[c], den[c], S[c], z[c])
    return o, den, S.view(B, H, pl.F * pl.D, pl.Dv), z.view(B, H, pl.F * pl.D)


def _forward_chunk(pl: _Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   den: torch.Tensor, S: torch.Tensor, z: torch.Tensor) -> None:
    """:func:`forward` on one chunk of (batch, head) slices, writing o, den, S (zeros on entry), z."""
    spec, dtype = pl.spec, pl.dtype
    B, H = q.shape[:2]
    P, F = pl.P, pl.F
    ws = pl.workspace(B * H, q.device)

    # State pass over keys: per term, T[c] = sum over group c of phi(k)^T v, mixed into S.
    pk = _features(k[:, :, P:], spec.feature_map, dtype, "phi")                # [B, H, Nk_grid, D]
    vk = _contiguous(v[:, :, P:], dtype, "values")
    for t in pl.terms:
        xg = group_by_axis(_scaled(pk, t.scale_k), pl.grid_k, t.axis, ws.inputs)
        vg = group_by_axis(vk, pl.grid_k, t.axis, ws.results)
        S[:, :, list(t.features)] = _unmix(t.coord_k, _per_coord(xg, vg, ws.mixed), B, H)
    z.copy_(pl.pos_k[P:].T @ pk)                                                # [B, H, F, D]
    if P:
        # Prefix features: F-2 carries the prefix keys, F-1 the grid keys (positions.py scheme).
        phi_kp = _features(k[:, :, :P], spec.feature_map, dtype)
        S[:, :, F - 2] = phi_kp.transpose(-1, -2) @ v[:, :, :P].to(dtype)
        S[:, :, F - 1] = pk.transpose(-1, -2) @ vk
        z += pl.pos_k[:P].T @ phi_kp
    del vk

    if spec.clamp is not None:
        abs_clamp_(S, spec.clamp)
    del pk   # dead: its scratch buffer now holds phi(q)
    num, num_prefix = _numerators(pl, q, S, z, o, den, ws)
    normalise_(den, spec)
    if P:
        o[:, :, :P] = _divide_(num_prefix, den[:, :, :P], spec)
    _divide_(num, den[:, :, P:], spec)
    if num.data_ptr() != o[:, :, P:].data_ptr():
        o[:, :, P:] = num


def _numerators(pl: _Plan, q: torch.Tensor, S: torch.Tensor, z: torch.Tensor, o: torch.Tensor, den: torch.Tensor,
                ws: _Workspace) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output pass over queries: per term, num_i += phi(q_i)^T M[c(i)], M[c] = sum_g coord[c, g] S_g.

    Returns the grid rows' numerators [B, H, Nq_grid, Dv] (in o's memory when o is contiguous in the
    compute dtype, else in scratch) and the prefix rows' (a new tensor; None without prefix), and
    writes the row sums sum_m P_m(i) phi(q_i) . z_m (den before floor and eps) into ``den``."""
    spec, dtype, P, F = pl.spec, pl.dtype, pl.P, pl.F
    pq = _features(q[:, :, P:], spec.feature_map, dtype, "phi")
    acc = _Accumulator(o[:, :, P:], dtype, "acc_o")
    for t in pl.terms:
        xg = group_by_axis(_scaled(pq, t.scale_q), pl.grid_q, t.axis, ws.inputs)
        acc.add_bmm(xg, _mix(t.coord_q, S[:, :, list(t.features)], ws.mixed), pl.grid_q, t.axis, None, ws.results)
    num = acc.result()
    # den_i = sum_m P_m(i) phi(q_i) . z_m: a thin [N, D] x [D, F] product.
    den[:, :, P:] = ((pq @ z.transpose(-1, -2)) * pl.pos_q[P:]).sum(-1)
    if not P:
        return num, None
    num += pq @ S[:, :, F - 2]
    phi_qp = _features(q[:, :, :P], spec.feature_map, dtype)
    den[:, :, :P] = ((phi_qp @ z.transpose(-1, -2)) * pl.pos_q[:P]).sum(-1)
    return num, phi_qp @ (S[:, :, F - 2] + S[:, :, F - 1])


def normalise_(row_sums: torch.Tensor, spec: VicinitySpec) -> torch.Tensor:
    """den = max(row_sums, den_floor) + eps, in place (NaN stays NaN)."""
    if spec.den_floor > 0:
        row_sums.clamp_min_(spec.den_floor)
    return row_sums.add_(spec.eps)


def floor_active(den: torch.Tensor, spec: VicinitySpec) -> torch.Tensor | None:
    """Where the floor is active, from den alone: den == den_floor + eps as :func:`normalise_` computes
    it (den above it whenever the row sum exceeds the floor by more than rounding); None without a floor."""
    if spec.den_floor <= 0:
        return None
    floored = torch.full((), spec.den_floor, dtype=den.dtype, device=den.device).add_(spec.eps)
    return den <= floored


def abs_clamp_(t: torch.Tensor, clamp: tuple[float, float]) -> torch.Tensor:
    """The VVT authors' abs_clamp in place: |t| into [clamp[0], clamp[1]], sign kept, zeros stay 0."""
    sign = torch.sign(t)
    return t.abs_().clamp_(*clamp).mul_(sign)


def clamp_passes(x: torch.Tensor, clamp: tuple[float, float]) -> torch.Tensor:
    """The derivative of abs_clamp at x (1 where lo <= |x| <= hi and x != 0, else 0), in x's dtype."""
    a = x.abs()
    return ((a >= clamp[0]) & (a <= clamp[1]) & (a > 0)).to(x.dtype)


def clamped_state_passes(state: torch.Tensor, clamp: tuple[float, float]) -> torch.Tensor:
    """The derivative of abs_clamp at the unclamped state, read off the clamped state: 1 strictly
    inside (lo, hi), else 0 (differs from :func:`clamp_passes` only at |S| exactly lo or hi)."""
    a = state.abs()
    return ((a > clamp[0]) & (a < clamp[1])).to(state.dtype)


def _divide_(num: torch.Tensor, den: torch.Tensor, spec: VicinitySpec) -> torch.Tensor:
    """num / den in place ([..., N, Dv] by [..., N]); with a clamp, C(C(num) * C(1 / den))."""
    if spec.clamp is None:
        return torch.div(num, den[..., None], out=num)
    abs_clamp_(num, spec.clamp)
    return abs_clamp_(num.mul_(abs_clamp_(den.reciprocal()[..., None], spec.clamp)), spec.clamp)


def _clamped_row_grads(pl: _Plan, do: torch.Tensor, q: torch.Tensor, S: torch.Tensor, z: torch.Tensor,
                       den: torch.Tensor, g: torch.Tensor, ws: _Workspace) -> torch.Tensor:
    """With a clamp: writes g = dL/dnum_pre (the gradient of the unclamped numerator) and returns
    c = dL/dden, from the numerators recomputed off the saved (clamped) states. With u = n r, n = C(n_pre),
    r = C(1/den), o = C(u): dU = dO C'(u), g = dU r C'(n_pre), c = -(dU . n) C'(1/den) / den^2."""
    clamp = pl.spec.clamp
    n_pre = scratch("clamp_numerators", do.numel(), pl.dtype, do.device).view(do.shape)
    sums = torch.empty_like(den)
    num, num_prefix = _numerators(pl, q, S, z, n_pre, sums, ws)
    if num.data_ptr() != n_pre[:, :, pl.P:].data_ptr():
        n_pre[:, :, pl.P:] = num
    if num_prefix is not None:
        n_pre[:, :, :pl.P] = num_prefix
    return clamped_row_grads(do, n_pre, den, clamp, g)


def clamped_row_grads(do: torch.Tensor, n_pre: torch.Tensor, den: torch.Tensor, clamp: tuple[float, float],
                      g: torch.Tensor) -> torch.Tensor:
    """The clamped row gradients from the unclamped numerator n_pre [..., N, Dv] and den [..., N]: writes
    g = dL/dnum_pre into ``g`` and returns c = dL/dden [..., N, 1] (formulas: :func:`_clamped_row_grads`).

    Every [..., N, Dv] temporary is a scratch buffer written in place (fresh ones cost page faults that
    outweigh the arithmetic on a CPU). The clamp's lower bound is > 0, so lo <= |x| <= hi already
    excludes x = 0, as :func:`clamp_passes` does; NaNs fail every comparison and take mask 0, as there."""
    lo, hi = clamp
    r_pre, r = _clamped_reciprocal(den, clamp)
    n, work, passes_n, passes_u, below = _clamp_buffers(n_pre)
    torch.abs(n_pre, out=n)
    torch.ge(n, lo, out=passes_n).logical_and_(torch.le(n, hi, out=below))     # C'(n_pre)
    n.clamp_(lo, hi).mul_(torch.sign(n_pre, out=work))                          # n = C(n_pre)
    torch.mul(n, r, out=work).abs_()                                            # |u| = |n r|
    torch.ge(work, lo, out=passes_u).logical_and_(torch.le(work, hi, out=below))  # C'(u)
    return _clamped_grads_from_masks(do, n, passes_n, passes_u, r, r_pre, clamp, g, work)


def clamped_row_grads_from_output(do: torch.Tensor, o: torch.Tensor, den: torch.Tensor,
                                  clamp: tuple[float, float], g: torch.Tensor) -> torch.Tensor:
    """:func:`clamped_row_grads` without the unclamped numerator, read off the output o (in the accumulation
    dtype, so o = C(u) exactly): where lo < |o| < hi, u = n r was not clamped, o = u and n = o / r; elsewhere
    C'(u) = 0 and n does not enter dU. C'(n_pre) is read off n: a clamped n sits exactly on a bound, but
    o / r recovers n only to a rounding or two, so |n| within 8 ulps of a bound counts as clamped. Differs
    from the recomputed form only where |u| lies exactly on a bound or |n_pre| within 8 ulps of one."""
    lo, hi = clamp
    margin = 8 * torch.finfo(o.dtype).eps
    r_pre, r = _clamped_reciprocal(den, clamp)
    n, work, passes_n, passes_u, below = _clamp_buffers(o)
    torch.abs(o, out=work)
    torch.gt(work, lo, out=passes_u).logical_and_(torch.lt(work, hi, out=below))   # C'(u)
    torch.div(o, r, out=n)                                                          # n = u / r
    torch.abs(n, out=work)
    torch.gt(work, lo * (1 + margin), out=passes_n).logical_and_(torch.lt(work, hi * (1 - margin), out=below))
    return _clamped_grads_from_masks(do, n, passes_n, passes_u, r, r_pre, clamp, g, work)


def _clamped_reciprocal(den: torch.Tensor, clamp: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(1/den, C(1/den)) as [..., N, 1]."""
    r_pre = den.reciprocal().unsqueeze(-1)
    return r_pre, abs_clamp_(r_pre.clone(), clamp)


def _clamp_buffers(like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The clamped row gradients' scratch temporaries shaped like ``like``: n, work (its dtype) and three
    bool masks (C'(n_pre), C'(u), a comparison's second half)."""
    def buffer(name: str, dtype: torch.dtype) -> torch.Tensor:
        return scratch(name, like.numel(), dtype, like.device).view(like.shape)
    return (buffer("clamp_n", like.dtype), buffer("clamp_work", like.dtype),
            *(buffer(name, torch.bool) for name in ("clamp_passes_n", "clamp_passes_u", "clamp_below")))


def _clamped_grads_from_masks(do: torch.Tensor, n: torch.Tensor, passes_n: torch.Tensor, passes_u: torch.Tensor,
                              r: torch.Tensor, r_pre: torch.Tensor, clamp: tuple[float, float], g: torch.Tensor,
                              work: torch.Tensor) -> torch.Tensor:
    """g = dU r C'(n_pre) into ``g`` and c = -(dU . n) C'(1/den) / den^2, with dU = dO C'(u) (n overwritten)."""
    dU = torch.mul(do, passes_u, out=work)                                      # dU = dO C'(u)
    torch.mul(dU, r, out=g).mul_(passes_n)                                      # g = dU r C'(n_pre)
    return n.mul_(dU).sum(-1, keepdim=True).mul_(clamp_passes(r_pre, clamp)).mul_(r_pre.square()).neg_()


@raises_on_overflow("backward", 4)
@with_call_threads
def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             den: torch.Tensor, S: torch.Tensor, z: torch.Tensor, spec: VicinitySpec,
             needs: tuple[bool, bool, bool] = (True, True, True),
             ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The backward pass: (dq, dk, dv) from dO [B, H, Nq, Dv] and :func:`forward`'s outputs.

    ``needs`` says which of dq, dk, dv to compute; the others are returned as None.
    Gradients have the dtype and memory order of q, k, v.
    """
    pl = _Plan(q, k, v, spec, den.dtype)
    B, H = q.shape[:2]
    S = S.view(B, H, pl.F, pl.D, pl.Dv)
    z = z.view(B, H, pl.F, pl.D)
    dq, dk, dv = empty_grads_like((q, k, v), needs)
    with scratch_session():
        for c in pl.chunks:
            _backward_chunk(pl, do[c], q[c], k[c], v[c], o[c], den[c], S[c], z[c],
                            *(None if g is None else g[c] for g in (dq, dk, dv)))
    return dq, dk, dv


def _backward_chunk(pl: _Plan, do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    o: torch.Tensor, den: torch.Tensor, S: torch.Tensor, z: torch.Tensor,
                    dq: torch.Tensor | None, dk: torch.Tensor | None, dv: torch.Tensor | None) -> None:
    """:func:`backward` on one chunk of (batch, head) slices, writing dq, dk, dv (where not None)."""
    spec, dtype = pl.spec, pl.dtype
    B, H = q.shape[:2]
    D, Dv, P, F = pl.D, pl.Dv, pl.P, pl.F
    ws = pl.workspace(B * H, q.device)
    need_dq, need_dk, need_dv = dq is not None, dk is not None, dv is not None

    # g = dO / den and c = -(dO . o) / den: the gradients of num and of den.
    g = scratch("grad_out", B * H * pl.Nq * Dv, dtype, q.device).view(B, H, pl.Nq, Dv)
    if spec.clamp is None:
        torch.div(do, den.unsqueeze(-1), out=g)
        # The product dO * o goes through the "results" buffer, which is free until the query pass.
        prod = ws.results[:do.numel()].view(do.shape).copy_(do).mul_(o)
        c = prod.sum(-1).div_(den).neg_().unsqueeze(-1)                         # [B, H, Nq, 1]
        del prod
    elif o.dtype == dtype:
        c = clamped_row_grads_from_output(do, o, den, spec.clamp, g)
    else:   # o was rounded to 16 bits: recompute the numerators rather than read them off o
        c = _clamped_row_grads(pl, do, q, S, z, den, g, ws)
    floored = floor_active(den, spec)
    if floored is not None:  # there den is a constant: no gradient flows into it
        c.masked_fill_(floored.unsqueeze(-1), 0.0)
    pq = _features(q[:, :, P:], spec.feature_map, dtype, "phi")
    gq = g[:, :, P:] if not P else g[:, :, P:].contiguous()
    dS = torch.zeros_like(S)
    acc_q = _Accumulator(dq[:, :, P:], dtype, "acc_q") if need_dq else None
    for t in pl.terms:
        feats = list(t.features)
        xg = group_by_axis(_scaled(pq, t.scale_q), pl.grid_q, t.axis, ws.inputs)
        gg = group_by_axis(gq, pl.grid_q, t.axis, ws.inputs2)
        dS[:, :, feats] = _unmix(t.coord_q, _per_coord(xg, gg, ws.mixed), B, H)
        if need_dq:
            acc_q.add_bmm(gg, _mix(t.coord_q, S[:, :, feats], ws.mixed).transpose(1, 2), pl.grid_q, t.axis, t.scale_q,
                          ws.results)
    cp_q = c[:, :, P:] * pl.pos_q[P:]                                          # [B, H, Nq_grid, F]
    dz = cp_q.transpose(-1, -2) @ pq                                             # [B, H, F, D]
    dphi_q = acc_q.result() if need_dq else None
    if need_dq:
        dphi_q.view(B * H, -1, D).baddbmm_(cp_q.reshape(B * H, -1, F), z.reshape(B * H, F, D))
    if P:
        gp, phi_qp = g[:, :, :P], _features(q[:, :, :P], spec.feature_map, dtype)
        dS_pre = phi_qp.transpose(-1, -2) @ gp                                   # prefix queries see F-2 and F-1
        dS[:, :, F - 2] += pq.transpose(-1, -2) @ gq + dS_pre
        dS[:, :, F - 1] += dS_pre
        cp_p = c[:, :, :P] * pl.pos_q[:P]
        dz += cp_p.transpose(-1, -2) @ phi_qp
    if need_dq:
        if P:
            dphi_q += gq @ S[:, :, F - 2].transpose(-1, -2)
            grad_p = gp @ (S[:, :, F - 2] + S[:, :, F - 1]).transpose(-1, -2) + cp_p @ z
            dq[:, :, :P] = mul_feature_map_grad_(grad_p, phi_qp, spec.feature_map)
        mul_feature_map_grad_(dphi_q, pq, spec.feature_map)
        if dphi_q.data_ptr() != dq[:, :, P:].data_ptr():
            dq[:, :, P:] = dphi_q
    del dphi_q, pq, g, gq   # dead from here: the key pass reuses the "phi" scratch buffer
    if not (need_dk or need_dv):
        return
    if spec.clamp is not None:  # the states were clamped: dS is 0 where they were
        dS.mul_(clamped_state_passes(S, spec.clamp))

    pk = _features(k[:, :, P:], spec.feature_map, dtype, "phi")
    vk = _contiguous(v[:, :, P:], dtype, "values")
    acc_k = _Accumulator(dk[:, :, P:], dtype, "acc_k") if need_dk else None
    acc_v = _Accumulator(dv[:, :, P:], dtype, "acc_v") if need_dv else None
    for t in pl.terms:
        dM = _mix(t.coord_k, dS[:, :, list(t.features)], ws.mixed)                        # [B*H*s, D, Dv]
        if need_dv:
            xg = group_by_axis(_scaled(pk, t.scale_k), pl.grid_k, t.axis, ws.inputs)
            acc_v.add_bmm(xg, dM, pl.grid_k, t.axis, None, ws.results)
        if need_dk:
            vg = group_by_axis(vk, pl.grid_k, t.axis, ws.inputs)
            acc_k.add_bmm(vg, dM.transpose(1, 2), pl.grid_k, t.axis, t.scale_k, ws.results)
    dphi_k = acc_k.result() if need_dk else None
    dv_g = acc_v.result() if need_dv else None
    if need_dk:
        # sum_m P_m(j) dz_m, the denominator's share of dphi(k_j).
        dphi_k.view(B * H, -1, D).baddbmm_(pl.pos_k[P:].expand(B * H, -1, -1), dz.reshape(B * H, F, D))
    if P:
        # Prefix keys carry feature F-2; grid keys additionally carry F-1.
        phi_kp, vp = _features(k[:, :, :P], spec.feature_map, dtype), v[:, :, :P].to(dtype)
        if need_dv:
            dv_g += pk @ dS[:, :, F - 1]
            dv[:, :, :P] = phi_kp @ dS[:, :, F - 2]
        if need_dk:
            dphi_k += vk @ dS[:, :, F - 1].transpose(-1, -2)
            grad_p = vp @ dS[:, :, F - 2].transpose(-1, -2) + pl.pos_k[:P] @ dz
            dk[:, :, :P] = mul_feature_map_grad_(grad_p, phi_kp, spec.feature_map)
    if need_dk:
        mul_feature_map_grad_(dphi_k, pk, spec.feature_map)
        if dphi_k.data_ptr() != dk[:, :, P:].data_ptr():
            dk[:, :, P:] = dphi_k
    if need_dv and dv_g.data_ptr() != dv[:, :, P:].data_ptr():
        dv[:, :, P:] = dv_g

