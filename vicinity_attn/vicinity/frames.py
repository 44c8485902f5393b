"""Frame-causal vicinity attention in PyTorch (``causal="frames"``): per-frame states and their prefix.

Frames are the first grid axis. A grid query of frame t attends to the prefix keys and to the grid keys
of frames <= t; a prefix query to the prefix keys only. Per (batch, head) the states are kept per *slot*:

    U(0)     = init + sum over prefix keys j of P_k(j) (x) phi(k_j) v_j^T       (F x D x Dv; z likewise)
    U(1 + f) = sum over the keys j of frame f of P_k(j) (x) phi(k_j) v_j^T
    pre(s)   = U(0) + ... + U(s)                 inclusive prefix, in slot order
    S(s)     = C(pre(s)) with a clamp, else pre(s)

and a query of slot s (0: prefix queries, 1 + t: frame t) reads S(s), z(s) exactly as a bidirectional
query reads S, z. Backward: the query side gives dpre(s) = sum over the slot's queries of
P_q(i) (x) phi(q_i) g_i^T (times C'(S(s)) with a clamp); the keys of slot s' receive the suffix
sum_{s >= s'} dpre(s) (+ the gradient of the carry, from later windows).

A *window* holds the frames ``start .. start + n - 1`` of the spec's grid (angles of the whole grid), with the
prefix tokens in front only when ``start == 0``; ``init`` are the states of every key before it and
``carry`` = init + its own keys (the next window's init). The whole call is the window ``start = 0``
without init. The streaming cache (:mod:`.stream`) and context parallelism over frames chain windows.

Cost: O(N F D Dv) time, O(N D + n F D Dv) memory: no F*D-wide expanded features exist (each feature's
state is one batched matmul over the frames; the features constant within a frame, :func:`frame_constant`,
share one), nothing N x N. Computed in float32 (float64 for float64 inputs). The window functions run in
chunks of whole (batch, head) slices of about ``torch_backend.CHUNK_BYTES`` per token-sized tensor, as the
bidirectional torch backend does: heads are independent, and a chunk's temporaries (several elementwise
passes per feature) stay in the CPU's caches; each call picks its CPU threads from its size and the cores
left idle (:mod:`.cpu_threads`), as there. The triton backend's :mod:`.triton_frames` has the same
functions over the kernels.
"""
from __future__ import annotations

import functools
import math

import torch

from ..common.allocation import compute_dtype, empty_output_like
from ..common.feature_maps import apply_feature_map, mul_feature_map_grad_
from ..common.overflow import raises_on_overflow
from ..common.positions import position_features
from ..common.spec import VicinitySpec
from . import torch_backend
from .cpu_threads import with_call_threads
from .scratch import scratch_session
from .torch_backend import _head_chunks, abs_clamp_, clamped_row_grads, clamped_state_passes, floor_active, normalise_

States = tuple[torch.Tensor, torch.Tensor]


def _chunks(x: torch.Tensor, width: int) -> list[tuple[slice, slice]]:
    """The (batch, head) chunks of a window whose token-sized tensors are like x [B, H, N, ...] ``width`` wide
    in the compute dtype: about ``torch_backend.CHUNK_BYTES`` each, the bidirectional path's budget (at
    16x32x32, 8 heads, D = 64, fp32 a step took 1.2 s unchunked, 0.55 s a head at a time)."""
    B, H, N = x.shape[:3]
    head_bytes = N * width * compute_dtype(x.dtype).itemsize
    return _head_chunks(B, H, max(1, torch_backend.CHUNK_BYTES // max(head_bytes, 1)))


def _part(x, c: tuple[slice, slice]):
    """Chunk c of x: a tensor [B, H, ...], a tuple of them (a state pair) or None."""
    if x is None:
        return None
    return tuple(_part(t, c) for t in x) if isinstance(x, tuple) else x[c]


def _put(whole, part, c: tuple[slice, slice]) -> None:
    """whole[c] = part, through tuples (as :func:`_part` takes them apart)."""
    if isinstance(whole, tuple):
        for w, p in zip(whole, part):
            _put(w, p, c)
    else:
        whole[c] = part


def window_frames(spec: VicinitySpec, start: int, n_queries: int, n_keys: int) -> int:
    """The number of frames n of a window of ``n_queries`` / ``n_keys`` tokens starting at frame ``start``
    (ValueError naming what does not fit)."""
    T = spec.n_frames
    if not 0 <= start < T:
        raise ValueError(f"the window's first frame must lie in [0, {T}), got {start}")
    prefix = spec.num_prefix_tokens if start == 0 else 0
    per_q, per_k = math.prod(spec.grid[1:]), math.prod(spec.kv_grid[1:])
    n, rest = divmod(n_queries - prefix, per_q)
    if n < 1 or rest:
        raise ValueError(f"q holds {n_queries} tokens: not {prefix} prefix tokens + a whole number (>= 1) of "
                         f"frames of {per_q} tokens (grid {spec.grid})")
    if n_keys != prefix + n * per_k:
        raise ValueError(f"k holds {n_keys} tokens, but the window's {n} frames need {prefix} prefix tokens + "
                         f"{n} x {per_k} (kv_grid {spec.kv_grid})")
    if start + n > T:
        raise ValueError(f"frames {start} .. {start + n - 1} do not fit in the grid's {T} frames")
    return n


def _positions(grid: tuple[int, ...], variant: str, side: str, num_prefix_tokens: int, start: int, n: int,
               dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid features [n, per_frame, F] of frames start .. start + n - 1, prefix features [P, F])."""
    P, per = num_prefix_tokens, math.prod(grid[1:])
    kw = dict(side=side, num_prefix_tokens=P, dtype=dtype, device=device)
    tokens = range(P + start * per, P + (start + n) * per)
    grid_feats = position_features(grid, variant, tokens=tokens, **kw).view(n, per, -1)
    prefix_feats = position_features(grid, variant, tokens=range(0, P), **kw)
    return grid_feats, prefix_feats


def slot_features(spec: VicinitySpec, side: str, start: int, n: int, dtype, device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The position features of a window's tokens on ``side``: (grid tokens [n, per_frame, F], prefix [P, F]).
    Kept for whole calls (start 0, which a training loop repeats), computed afresh for a stream's windows
    (each start comes once: keeping them would grow with the stream)."""
    grid = spec.grid if side == "query" else spec.kv_grid
    make = _whole_call_positions if start == 0 else _positions
    return make(grid, spec.variant, side, spec.num_prefix_tokens, start, n, dtype, torch.device(device))


_whole_call_positions = functools.lru_cache(maxsize=64)(_positions)


def _split(x: torch.Tensor, prefix: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, H, prefix + n * per, E] -> (prefix rows [B, H, prefix, E], grid rows [B, H, n, per, E])."""
    B, H, N, E = x.shape
    return x[:, :, :prefix], x[:, :, prefix:].reshape(B, H, n, (N - prefix) // n, E)


def frame_constant(spec: VicinitySpec, side: str) -> tuple[int, ...]:
    """The features m whose values on ``side``'s grid tokens are constant within each frame (the time axis'
    own features, and the prefix scheme's 0 / 1 ones): their per-frame terms take one matrix product for
    all of them, the frame's value scaling the small per-frame states instead of the tokens. Found on the
    host from the whole grid's features (once per grid: no device read, as CUDA graphs need)."""
    grid = spec.grid if side == "query" else spec.kv_grid
    return _frame_constant(tuple(grid), spec.variant, side, spec.num_prefix_tokens)


@functools.lru_cache(maxsize=64)
def _frame_constant(grid: tuple[int, ...], variant: str, side: str, num_prefix_tokens: int) -> tuple[int, ...]:
    # Blocks of frames of about a million tokens: a long stream's grid never has all its features at once.
    T, step = grid[0], max(1, 2 ** 20 // math.prod(grid[1:]))
    same = torch.tensor(True)
    for f0 in range(0, T, step):
        pos, _ = _positions(grid, variant, side, num_prefix_tokens, f0, min(step, T - f0), torch.float64,
                            torch.device("cpu"))
        same = same & (pos == pos[:, :1]).all(1).all(0)
    return tuple(m for m, constant in enumerate(same.tolist()) if constant)


def _per_frame_sum(states: torch.Tensor, pos: torch.Tensor, features: tuple[int, ...]) -> torch.Tensor:
    """sum over m in ``features`` of pos[f, 0, m] * states[:, :, f, m] ([B, H, n, F, ...] -> [B, H, n, ...])."""
    weights = pos[:, 0, list(features)].reshape(pos.shape[0], len(features), *([1] * (states.dim() - 4)))
    return (states[:, :, :, list(features)] * weights).sum(3)


def check_state_pair(pair: States | None, name: str, shape: tuple, dtype: torch.dtype, device) -> None:
    """A window's ``init`` / ``carry_grad`` (None, or (S ``shape``, z ``shape[:-1]``) of ``dtype`` on ``device``):
    ValueError naming it otherwise. Shared by both backends' window functions."""
    if pair is None:
        return
    S, z = pair
    if tuple(S.shape) != shape or tuple(z.shape) != shape[:-1]:
        raise ValueError(f"{name} must be (S {list(shape)}, z {list(shape[:-1])}), got "
                         f"(S {list(S.shape)}, z {list(z.shape)})")
    if S.dtype != dtype or z.dtype != dtype or S.device != device or z.device != device:
        raise ValueError(f"{name} must be {dtype} on {device}, got {S.dtype} / {z.dtype} on {S.device}")


@with_call_threads
def window_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: VicinitySpec, start: int = 0,
                   init: States | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, States]:
    """(o, den, S, z, carry) of a window (module docstring).

    q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv], any strides; init None or (S [B, H, F, D, Dv],
    z [B, H, F, D]) in the compute dtype, unscaled and unclamped. Returns o like q (q's dtype, Dv wide),
    den [B, H, Nq] (eps included), the slots' states S [B, H, n + 1, F*D, Dv] and z [B, H, n + 1, F*D]
    (clamped where the spec clamps) and carry = (S, z) after the window's keys, unclamped.
    """
    B, H, Nq, D = q.shape
    Dv, F = v.shape[-1], spec.n_features
    n = window_frames(spec, start, Nq, k.shape[2])
    dtype = compute_dtype(q.dtype)
    check_state_pair(init, "init", (B, H, F, D, Dv), dtype, q.device)
    o = empty_output_like(q, Dv)
    chunks = _chunks(q, max(D, Dv))
    if len(chunks) == 1:
        return (o, *_window_forward(q, k, v, spec, start, init, n, dtype, o))
    rest = (q.new_empty((B, H, Nq), dtype=dtype), q.new_empty((B, H, n + 1, F * D, Dv), dtype=dtype),
            q.new_empty((B, H, n + 1, F * D), dtype=dtype),
            (q.new_empty((B, H, F, D, Dv), dtype=dtype), q.new_empty((B, H, F, D), dtype=dtype)))
    for c in chunks:
        _put(rest, _window_forward(q[c], k[c], v[c], spec, start, _part(init, c), n, dtype, o[c]), c)
    return (o, *rest)


def _window_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: VicinitySpec, start: int,
                    init: States | None, n: int, dtype: torch.dtype, o: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, States]:
    """:func:`window_forward` on one chunk of (batch, head) slices (checked: n frames, compute ``dtype``),
    writing o into ``o``: (den, S, z, carry)."""
    B, H, Nq, D = q.shape
    Dv, F = v.shape[-1], spec.n_features
    P = spec.num_prefix_tokens if start == 0 else 0
    pos_k, pos_kp = slot_features(spec, "key", start, n, dtype, q.device)
    U, Uz = slot_states(apply_feature_map(k.to(dtype), spec.feature_map), v.to(dtype), pos_k, pos_kp, P,
                        frame_constant(spec, "key"))
    if init is not None:
        U[:, :, 0] += init[0]
        Uz[:, :, 0] += init[1]
    S, z = U.cumsum_(2), Uz.cumsum_(2)                                # fixed slot order: deterministic
    carry = (S[:, :, -1].clone(), z[:, :, -1].clone())
    if spec.clamp is not None:
        abs_clamp_(S, spec.clamp)
    pos_q, pos_qp = slot_features(spec, "query", start, n, dtype, q.device)
    num, rows = read_slots(apply_feature_map(q.to(dtype), spec.feature_map), S, z, pos_q, pos_qp, P,
                           frame_constant(spec, "query"))
    den = normalise_(rows, spec)
    o.copy_(_divide(num, den, spec))
    return den, S.view(B, H, n + 1, F * D, Dv), z.view(B, H, n + 1, F * D), carry


def slot_states(phi_k: torch.Tensor, v: torch.Tensor, pos_k: torch.Tensor, pos_kp: torch.Tensor, P: int,
                const: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Each slot's own states, U [B, H, n + 1, F, D, Dv] and Uz [B, H, n + 1, F, D] (slot 0: the P prefix keys;
    slot 1 + f: frame f's keys), from phi(k) [B, H, P + n * per, D], v [B, H, P + n * per, Dv] and the keys'
    position features ``pos_k`` [n, per, F] / ``pos_kp`` [P, F]; ``const``: features constant within each frame
    (:func:`frame_constant`; () treats every feature alike). Out of place (forward-mode AD vmaps it)."""
    n, F = pos_k.shape[0], pos_k.shape[-1]
    k_pre, k_grid = _split(phi_k, P, n)
    v_pre, v_grid = _split(v, P, n)
    frame_states = k_grid.transpose(-1, -2) @ v_grid if const else None         # [B, H, n, D, Dv]
    U = torch.stack([frame_states * pos_k[:, 0, m, None, None] if m in const
                     else (k_grid * pos_k[:, :, m, None]).transpose(-1, -2) @ v_grid for m in range(F)], dim=3)
    Uz = torch.einsum("bhnpd,npm->bhnmd", k_grid, pos_k)
    if P:
        U0 = torch.stack([(k_pre * pos_kp[:, m, None]).transpose(-1, -2) @ v_pre for m in range(F)], dim=2)
        Uz0 = torch.einsum("bhpd,pm->bhmd", k_pre, pos_kp)
    else:
        U0, Uz0 = U.new_zeros(U[:, :, 0].shape), Uz.new_zeros(Uz[:, :, 0].shape)
    return torch.cat([U0[:, :, None], U], dim=2), torch.cat([Uz0[:, :, None], Uz], dim=2)


def read_slots(phi_q: torch.Tensor, S: torch.Tensor, z: torch.Tensor, pos_q: torch.Tensor, pos_qp: torch.Tensor,
               P: int, const: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """(num [B, H, Nq, Dv], row sums [B, H, Nq]) of the queries phi(q) [B, H, P + n * per, D] from the slots'
    states S [B, H, n + 1, F, D, Dv], z [B, H, n + 1, F, D]: num_i = sum_m P_q(i)_m phi(q_i)^T S_m(slot(i)),
    the ``const`` features (as for :func:`slot_states`) first, then the others in feature order. Out of
    place (forward-mode AD vmaps it)."""
    n, F = pos_q.shape[0], pos_q.shape[-1]
    q_pre, q_grid = _split(phi_q, P, n)
    num = q_grid @ _per_frame_sum(S[:, :, 1:], pos_q, const) if const else 0
    for m in range(F):
        if m not in const:
            num = num + (q_grid @ S[:, :, 1:, m]) * pos_q[:, :, m, None]
    rows = torch.einsum("bhnpd,bhnmd,npm->bhnp", q_grid, z[:, :, 1:], pos_q)
    num, rows = num.flatten(2, 3), rows.flatten(2, 3)
    if P:
        num_pre = 0
        for m in range(F):
            num_pre = num_pre + (q_pre @ S[:, :, 0, m]) * pos_qp[:, m, None]
        rows_pre = torch.einsum("bhpd,bhmd,pm->bhp", q_pre, z[:, :, 0], pos_qp)
        num, rows = torch.cat([num_pre, num], dim=2), torch.cat([rows_pre, rows], dim=2)
    return num, rows


def _divide(num: torch.Tensor, den: torch.Tensor, spec: VicinitySpec) -> torch.Tensor:
    """num / den; with a clamp C(C(num) * C(1 / den))."""
    if spec.clamp is None:
        return num / den[..., None]
    return abs_clamp_(abs_clamp_(num, spec.clamp) * abs_clamp_(den.reciprocal()[..., None], spec.clamp), spec.clamp)


@with_call_threads
def window_query_backward(do: torch.Tensor, q: torch.Tensor, o: torch.Tensor, den: torch.Tensor, S: torch.Tensor,
                          z: torch.Tensor, spec: VicinitySpec, start: int, need_dq: bool
                          ) -> tuple[torch.Tensor | None, States, States]:
    """The query side of a window's backward: (dq or None, dpre, init_grad).

    dpre = (dS [B, H, n + 1, F, D, Dv], dz [B, H, n + 1, F, D]): dLoss / dpre(s) per slot (times C'(S(s))
    with a clamp); init_grad = the sum over slots (this window's queries only), unscaled."""
    B, H, Nq, D = q.shape
    Dv = do.shape[-1]
    n = S.shape[2] - 1
    F = S.shape[3] // D
    dtype = den.dtype
    dq = torch.empty_like(q) if need_dq else None
    chunks = _chunks(q, max(D, Dv))
    if len(chunks) == 1:
        dpre = _window_query_backward(do, q, o, den, S, z, spec, start, dq)
    else:
        dpre = (q.new_empty((B, H, n + 1, F, D, Dv), dtype=dtype), q.new_empty((B, H, n + 1, F, D), dtype=dtype))
        for c in chunks:
            _put(dpre, _window_query_backward(do[c], q[c], o[c], den[c], S[c], z[c], spec, start, _part(dq, c)), c)
    return dq, dpre, (dpre[0].sum(2), dpre[1].sum(2))


def _window_query_backward(do: torch.Tensor, q: torch.Tensor, o: torch.Tensor, den: torch.Tensor, S: torch.Tensor,
                           z: torch.Tensor, spec: VicinitySpec, start: int, dq: torch.Tensor | None) -> States:
    """:func:`window_query_backward` on one chunk of (batch, head) slices, writing dq into ``dq`` (None: not
    wanted): dpre."""
    need_dq = dq is not None
    B, H, Nq, D = q.shape
    Dv = do.shape[-1]
    n = S.shape[2] - 1
    F = S.shape[3] // D
    dtype = den.dtype
    P = spec.num_prefix_tokens if start == 0 else 0
    S6, z5 = S.view(B, H, n + 1, F, D, Dv), z.view(B, H, n + 1, F, D)
    dO = do.to(dtype)
    pos_q, pos_qp = slot_features(spec, "query", start, n, dtype, q.device)
    const = frame_constant(spec, "query")
    phi_q = apply_feature_map(q.to(dtype), spec.feature_map)
    if spec.clamp is None:
        g = dO / den[..., None]
        c = -(dO * o.to(dtype)).sum(-1, keepdim=True) / den[..., None]
    else:
        num, _ = read_slots(phi_q, S6, z5, pos_q, pos_qp, P, const)
        g = torch.empty_like(num)
        with scratch_session():
            c = clamped_row_grads(dO, num, den, spec.clamp, g).clone()
    floored = floor_active(den, spec)
    if floored is not None:
        c = c.masked_fill(floored[..., None], 0.0)
    c = c.squeeze(-1)
    q_pre, q_grid = _split(phi_q, P, n)
    g_pre, g_grid = _split(g, P, n)
    c_grid = c[:, :, P:].reshape(B, H, n, -1)
    dS = q.new_zeros((B, H, n + 1, F, D, Dv), dtype=dtype)
    dz = q.new_zeros((B, H, n + 1, F, D), dtype=dtype)
    dphi = torch.zeros_like(phi_q) if need_dq else None
    dphi_pre, dphi_grid = _split(dphi, P, n) if need_dq else (None, None)
    if const:
        # The frame-constant features: one product per frame for all of them (frame_constant).
        frame_dS = q_grid.transpose(-1, -2) @ g_grid                   # [B, H, n, D, Dv]
        frame_dz = (c_grid[..., None, :] @ q_grid).squeeze(-2)         # [B, H, n, D]
        for m in const:
            dS[:, :, 1:, m] = frame_dS * pos_q[:, 0, m, None, None]
            dz[:, :, 1:, m] = frame_dz * pos_q[:, 0, m, None]
        if need_dq:
            dphi_grid += g_grid @ _per_frame_sum(S6[:, :, 1:], pos_q, const).transpose(-1, -2)
            dphi_grid += c_grid[..., None] * _per_frame_sum(z5[:, :, 1:], pos_q, const)[:, :, :, None, :]
    for m in range(F):
        if m not in const:
            w = pos_q[:, :, m]
            weighted = q_grid * w[..., None]                           # [B, H, n, per, D]
            dS[:, :, 1:, m] = weighted.transpose(-1, -2) @ g_grid
            dz[:, :, 1:, m] = (c_grid[..., None, :] @ weighted).squeeze(-2)
            if need_dq:
                part = g_grid @ S6[:, :, 1:, m].transpose(-1, -2) + c_grid[..., None] * z5[:, :, 1:, m, None, :]
                dphi_grid.addcmul_(part, w[..., None])
        if P:
            wp = pos_qp[:, m]
            weighted = q_pre * wp[:, None]
            dS[:, :, 0, m] = weighted.transpose(-1, -2) @ g_pre
            dz[:, :, 0, m] = (weighted * c[:, :, :P, None]).sum(-2)
            if need_dq:
                part = g_pre @ S6[:, :, 0, m].transpose(-1, -2) + c[:, :, :P, None] * z5[:, :, 0, m, None, :]
                dphi_pre.addcmul_(part, wp[:, None])
    if spec.clamp is not None:
        dS.mul_(clamped_state_passes(S6, spec.clamp))
    if need_dq:
        mul_feature_map_grad_(dphi, phi_q, spec.feature_map)
        dq.copy_(dphi)
    return dS, dz


@with_call_threads
def window_key_backward(k: torch.Tensor, v: torch.Tensor, dpre: States, spec: VicinitySpec, start: int,
                        carry_grad: States | None, need_dk: bool, need_dv: bool
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The key side of a window's backward: (dk, dv) (None where not needed) from the query side's ``dpre``
    and ``carry_grad`` (None, or (S [B, H, F, D, Dv], z [B, H, F, D]) from later windows)."""
    dS, dz = dpre
    B, H, n1, F, D, Dv = dS.shape
    check_state_pair(carry_grad, "carry_grad", (B, H, F, D, Dv), dS.dtype, dS.device)
    dk = torch.empty_like(k) if need_dk else None
    dv = torch.empty_like(v) if need_dv else None
    for c in _chunks(k, max(D, Dv)):
        _window_key_backward(k[c], v[c], _part(dpre, c), spec, start, _part(carry_grad, c), _part(dk, c),
                             _part(dv, c))
    return dk, dv


def _window_key_backward(k: torch.Tensor, v: torch.Tensor, dpre: States, spec: VicinitySpec, start: int,
                         carry_grad: States | None, dk: torch.Tensor | None, dv: torch.Tensor | None) -> None:
    """:func:`window_key_backward` on one chunk of (batch, head) slices (``carry_grad`` checked), writing dk
    and dv into ``dk`` / ``dv`` (None: not wanted)."""
    need_dk, need_dv = dk is not None, dv is not None
    dS, dz = dpre
    B, H, n1, F, D, Dv = dS.shape
    n, dtype = n1 - 1, dS.dtype
    P = spec.num_prefix_tokens if start == 0 else 0
    # The keys of slot s feed every slot >= s: the suffix sums, in fixed (reverse slot) order.
    dSk, dzk = dS.flip(2).cumsum(2).flip(2), dz.flip(2).cumsum(2).flip(2)
    if carry_grad is not None:
        dSk += carry_grad[0][:, :, None]
        dzk += carry_grad[1][:, :, None]
    pos_k, pos_kp = slot_features(spec, "key", start, n, dtype, k.device)
    phi_k = apply_feature_map(k.to(dtype), spec.feature_map)
    k_pre, k_grid = _split(phi_k, P, n)
    v_pre, v_grid = _split(v.to(dtype), P, n)
    dv_acc = torch.zeros(v.shape, dtype=dtype, device=v.device) if need_dv else None
    dphi = torch.zeros_like(phi_k) if need_dk else None
    dv_pre, dv_grid = _split(dv_acc, P, n) if need_dv else (None, None)
    dphi_pre, dphi_grid = _split(dphi, P, n) if need_dk else (None, None)
    const = frame_constant(spec, "key")
    if const:
        # The frame-constant features: one product per frame for all of them (frame_constant).
        frame_dS = _per_frame_sum(dSk[:, :, 1:], pos_k, const)            # [B, H, n, D, Dv]
        if need_dv:
            dv_grid += k_grid @ frame_dS
        if need_dk:
            dphi_grid += v_grid @ frame_dS.transpose(-1, -2)
            dphi_grid += _per_frame_sum(dzk[:, :, 1:], pos_k, const)[:, :, :, None, :]
    for m in range(F):
        if m not in const:
            w = pos_k[:, :, m]
            if need_dv:
                dv_grid.addcmul_(k_grid @ dSk[:, :, 1:, m], w[..., None])
            if need_dk:
                part = v_grid @ dSk[:, :, 1:, m].transpose(-1, -2) + dzk[:, :, 1:, m, None, :]
                dphi_grid.addcmul_(part, w[..., None])
        if P:
            wp = pos_kp[:, m, None]
            if need_dv:
                dv_pre.addcmul_(k_pre @ dSk[:, :, 0, m], wp)
            if need_dk:
                dphi_pre.addcmul_(v_pre @ dSk[:, :, 0, m].transpose(-1, -2) + dzk[:, :, 0, m, None, :], wp)
    if need_dk:
        mul_feature_map_grad_(dphi, phi_k, spec.feature_map)
        dk.copy_(dphi)
    if need_dv:
        dv.copy_(dv_acc)


@with_call_threads
def window_key_totals(k: torch.Tensor, v: torch.Tensor, spec: VicinitySpec, start: int) -> States:
    """(S [B, H, F, D, Dv], z [B, H, F, D]): the states of a window's keys alone (its carry from no init),
    unscaled and unclamped, in the compute dtype."""
    dtype = compute_dtype(k.dtype)
    per_k = math.prod(spec.kv_grid[1:])
    P = spec.num_prefix_tokens if start == 0 else 0
    n = (k.shape[2] - P) // per_k
    pos_k, pos_kp = slot_features(spec, "key", start, n, dtype, k.device)
    U, Uz = slot_states(apply_feature_map(k.to(dtype), spec.feature_map), v.to(dtype), pos_k, pos_kp, P,
                        frame_constant(spec, "key"))
    return U.sum(2), Uz.sum(2)


def whole_call(window_forward, window_query_backward, window_key_backward, wrap=lambda fn: fn):
    """The whole frame-causal call over a backend's window functions: (forward, backward), the bodies of its
    custom ops (with the overflow check): forward = the window of every frame, (o, den, S, z); backward = its
    query side, then its key side without carry_grad, (dq, dk, dv) with None where ``needs`` says not wanted.
    ``wrap`` decorates both bodies inside the overflow check (the triton backend's: launch replay)."""
    @wrap
    def forward_body(q, k, v, spec):
        return window_forward(q, k, v, spec)[:4]

    @wrap
    def backward_body(do, q, k, v, o, den, S, z, spec, needs):
        dq, dpre, _ = window_query_backward(do, q, o, den, S, z, spec, 0, needs[0])
        dk, dv = window_key_backward(k, v, dpre, spec, 0, None, needs[1], needs[2]) if needs[1] or needs[2] \
            else (None, None)
        return dq, dk, dv

    @raises_on_overflow("forward", 3)
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: VicinitySpec
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return forward_body(q, k, v, spec)

    @raises_on_overflow("backward", 4)
    def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 den: torch.Tensor, S: torch.Tensor, z: torch.Tensor, spec: VicinitySpec,
                 needs: tuple[bool, bool, bool] = (True, True, True)
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        if not any(needs):
            return None, None, None
        return backward_body(do, q, k, v, o, den, S, z, spec, tuple(bool(n) for n in needs))
    return forward, backward


forward, backward = whole_call(window_forward, window_query_backward, window_key_backward)
