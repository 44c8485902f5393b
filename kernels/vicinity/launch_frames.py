"""Launchers of frame-causal calls (``causal="frames"``, frames.py): forward, the backward's query side and its
key side, over a *window* of frames ``start .. start + n - 1`` (the whole call: start 0, every frame).

Forward: the state pass writes each slot's own key states (unscaled), ``slot_scan_kernel`` turns them into the
inclusive prefix over slots from ``init`` (the clamp per slot; scaled by s_k; the unclamped, unscaled running
sum of the last slot is the carry), and the output pass reads each query's slot.
Backward, query side: the row weights and dq (the dq pass reads each query's slot), the state pass writes each
slot's dS, dz (scaled as the bidirectional backward's: s_q / s_k times the true ones), and the scan masks dS by
C'(S slot) (with a clamp) and sums the slots to init_grad (unscaled). Key side: the scan sums the slots from the
last one down, from ``carry_grad`` (the suffix), and the key pass reads each key's slot.

Scales (powers of two, exact): s_k = pow2_scale of the keys up to the window's end (prefix keys included),
s_q = pow2_scale of the window's queries.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..runtime import cdiv
from .configs import pick_config, pow2_scale
from .frames import Slots, scan_slots
from .geometry import Geometry
from .launch_backward import _clamped_row_weights, _dq_pass, _key_pass, _row_weights
from .launch_forward import _copy_dtype, compute_states, output_pass

Pair = tuple[torch.Tensor, torch.Tensor]


class FrameWindow(NamedTuple):
    """Where a window's tokens sit: slots on each side, the token offset of the window's first token in the
    whole sequence (the kernels' ``tok_offset``), and the scales."""

    q_slots: Slots
    k_slots: Slots
    tok_offset_q: int
    tok_offset_k: int
    s_k: float
    s_q: float


def frame_window(geom: Geometry, start: int, n_queries: int, n_keys: int) -> FrameWindow:
    """The :class:`FrameWindow` of a window of ``n_queries`` queries and ``n_keys`` keys that starts at frame
    ``start`` (prefix tokens only in a window that starts at frame 0)."""
    P = geom.n_prefix
    p_win = P if start == 0 else 0
    lq = geom.q_sizes[1] * geom.q_sizes[2]
    lk = geom.k_sizes[1] * geom.k_sizes[2]
    n = (n_keys - p_win) // lk
    assert n >= 1 and n_keys == p_win + n * lk and n_queries == p_win + n * lq, (start, n_queries, n_keys)
    assert start + n <= geom.q_sizes[0] and geom.q_sizes[0] == geom.k_sizes[0]
    offset = lambda length: 0 if start == 0 else P + start * length  # noqa: E731
    return FrameWindow(Slots(n + 1, p_win, lq), Slots(n + 1, p_win, lk), offset(lq), offset(lk),
                       pow2_scale(P + (start + n) * lk), pow2_scale(n_queries))


def _flat(pair: Pair | None, BH: int) -> Pair | None:
    """An (S [B, H, F, D, Dv], z [B, H, F, D]) pair as contiguous [BH, ...] tensors (or None)."""
    if pair is None:
        return None
    return tuple(t.reshape(BH, *t.shape[2:]).contiguous() for t in pair)


def frame_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, geom: Geometry, eps: float,
                  den_floor: float, clamp: tuple[float, float] | None, start: int = 0,
                  init: Pair | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Pair]:
    """Fills o [B, H, Nq, Dv] and returns (den [BH, Nq], S [BH, n + 1, F, D, Dv], z [BH, n + 1, F, D], carry):
    den, S, z scaled by s_k (S clamped per slot with ``clamp``; in bf16 where ``saved_state_dtype`` says), carry
    = (S, z) [B, H, F, D(, Dv)] of init + every key of the window, unscaled and unclamped, in the accumulation
    dtype. ``init``: that pair for the keys before the window (None: none)."""
    B, H, Nq, D = q.shape
    Dv = v.shape[-1]
    BH, F = B * H, geom.n_feat
    win = frame_window(geom, start, Nq, k.shape[2])
    S, z = compute_states(k, v, geom, False, 1.0, "fwd_state", tok_offset=win.tok_offset_k, frames=win.k_slots)
    init = _flat(init, BH)
    if init is not None:
        assert init[0].dtype == S.dtype and init[1].dtype == z.dtype, "init: the accumulation dtype"
    carry = (torch.empty(BH, F, D, Dv, dtype=S.dtype, device=S.device),
             torch.empty(BH, F, D, dtype=z.dtype, device=z.device))
    op_dtype = _copy_dtype("fwd_output", q.dtype, D, Dv, clamp)
    S_op = None if op_dtype is None else torch.empty(S.shape, dtype=op_dtype, device=S.device)
    # The prefix over slots, in place: slot s = C(init + keys of slots 0..s) * s_k.
    scan_slots(S, S, add=None if init is None else init[0], total=carry[0], copy=S_op, scale=win.s_k,
               bounds=clamp, clamp=clamp is not None)
    scan_slots(z, z, add=None if init is None else init[1], total=carry[1], scale=win.s_k)
    cfg = pick_config(D, Dv, q.dtype, n_feat=F)
    den = output_pass(q, S if S_op is None else S_op, z, o, geom, True, cfg, "fwd_output", eps * win.s_k,
                      den_floor=den_floor * win.s_k, clamp=clamp, state_scale=win.s_k, tok_offset=win.tok_offset_q,
                      frames=win.q_slots)
    return den, S if S_op is None else S_op, z, (carry[0].view(B, H, F, D, Dv), carry[1].view(B, H, F, D))


def frame_key_totals(k: torch.Tensor, v: torch.Tensor, geom: Geometry, start: int = 0) -> Pair:
    """(S [B, H, F, D, Dv], z [B, H, F, D]): the states of a window's keys alone (its carry from no init),
    unscaled and unclamped, in the accumulation dtype: the state pass and a sum over slots in slot order."""
    B, H, Nk, D = k.shape
    Dv = v.shape[-1]
    BH, F = B * H, geom.n_feat
    p_win = geom.n_prefix if start == 0 else 0
    n = (Nk - p_win) // (geom.k_sizes[1] * geom.k_sizes[2])
    win = frame_window(geom, start, p_win + n * geom.q_sizes[1] * geom.q_sizes[2], Nk)
    S, z = compute_states(k, v, geom, False, 1.0, "fwd_state", tok_offset=win.tok_offset_k, frames=win.k_slots)
    totals = (torch.empty(BH, F, D, Dv, dtype=S.dtype, device=S.device),
              torch.empty(BH, F, D, dtype=z.dtype, device=z.device))
    scan_slots(S, None, total=totals[0], cumulative=False)
    scan_slots(z, None, total=totals[1], cumulative=False)
    return totals[0].view(B, H, F, D, Dv), totals[1].view(B, H, F, D)


def frame_backward_queries(do: torch.Tensor, q: torch.Tensor, o: torch.Tensor, den: torch.Tensor, S: torch.Tensor,
                           z: torch.Tensor, dq: torch.Tensor | None, geom: Geometry, eps: float, den_floor: float,
                           clamp: tuple[float, float] | None, start: int = 0) -> tuple[Pair, Pair]:
    """The query side of a window's backward: fills dq (unless None) and returns (dpre, init_grad): dpre = (dS
    [BH, n + 1, F, D, Dv], dz [BH, n + 1, F, D]) per slot, masked by C'(S slot) with a clamp, scaled by s_q / s_k;
    init_grad = (S, z) [B, H, F, D(, Dv)] = the sum of dpre over slots, unscaled, in the accumulation dtype.
    den, S, z: :func:`frame_forward`'s."""
    B, H, Nq, D = q.shape
    Dv = do.shape[-1]
    BH, F = B * H, geom.n_feat
    p_win = geom.n_prefix if start == 0 else 0
    win = frame_window(geom, start, Nq, p_win + (S.shape[1] - 1) * geom.k_sizes[1] * geom.k_sizes[2])
    s_k, s_q = win.s_k, win.s_q
    cfg = pick_config(D, Dv, q.dtype, n_feat=F)
    rs = torch.empty(BH, Nq, dtype=den.dtype, device=q.device)
    rz = torch.empty_like(rs)
    rows = dict(o=o, den=den, den_floor=den_floor * s_k, eps=eps * s_k)
    if clamp is not None:
        do = _clamped_row_weights(do, q, den, S, z, rs, rz, geom, cfg, eps, den_floor, clamp, s_k,
                                  win.tok_offset_q, frames=win.q_slots)
        rows = {}
    elif dq is None:
        _row_weights(do, o, den, rs, rz, cfg, (cdiv(Nq, cfg.block_n), BH), den_floor * s_k, eps * s_k)
    if dq is not None:
        _dq_pass(q, do, S, z, rs, rz, dq, geom, True, 1.0, cfg, "bwd_dq", win.tok_offset_q, frames=win.q_slots,
                 **rows)
    dS, dz = compute_states(q, do, geom, True, s_q, "bwd_state", rs=rs, rz=rz, tok_offset=win.tok_offset_q,
                            frames=win.q_slots)
    init_grad = (torch.empty(BH, F, D, Dv, dtype=dS.dtype, device=dS.device),
                 torch.empty(BH, F, D, dtype=dz.dtype, device=dz.device))
    # dpre = dS * C'(S) per slot (in place, with a clamp), and the sum over slots (in slot order).
    masked = clamp is not None
    scan_slots(dS, dS if masked else None, total=init_grad[0], mask=S if masked else None,
               total_scale=s_k / s_q, cumulative=False, bounds=clamp, mask_scale=s_k)
    scan_slots(dz, None, total=init_grad[1], total_scale=s_k / s_q, cumulative=False)
    return (dS, dz), (init_grad[0].view(B, H, F, D, Dv), init_grad[1].view(B, H, F, D))


def frame_backward_keys(k: torch.Tensor, v: torch.Tensor, dpre: Pair, dk: torch.Tensor | None,
                        dv: torch.Tensor | None, geom: Geometry, start: int = 0,
                        carry_grad: Pair | None = None) -> None:
    """The key side of a window's backward: fills dk, dv (where not None) from :func:`frame_backward_queries`'
    dpre and ``carry_grad`` (dLoss / dcarry, (S, z) [B, H, F, D(, Dv)] in the accumulation dtype, or None):
    a key of slot s gets the state gradients of slots >= s plus carry_grad."""
    if dk is None and dv is None:
        return
    B, H, Nk, D = k.shape
    Dv = v.shape[-1]
    BH = B * H
    dS, dz = dpre
    p_win = geom.n_prefix if start == 0 else 0
    win = frame_window(geom, start, p_win + (dS.shape[1] - 1) * geom.q_sizes[1] * geom.q_sizes[2], Nk)
    s_k, s_q = win.s_k, win.s_q
    carry_grad = _flat(carry_grad, BH)
    # The suffix over slots, last slot first, from carry_grad (scaled as dS is: s_q / s_k).
    op_dtype = _copy_dtype("bwd_keys", k.dtype, D, Dv, None)
    dS_suf = torch.empty_like(dS)
    dS_op = None if op_dtype is None else torch.empty(dS.shape, dtype=op_dtype, device=dS.device)
    dz_suf = torch.empty_like(dz)
    scan_slots(dS, dS_suf, add=None if carry_grad is None else carry_grad[0], copy=dS_op, add_scale=s_q / s_k,
               reverse=True)
    scan_slots(dz, dz_suf, add=None if carry_grad is None else carry_grad[1], add_scale=s_q / s_k, reverse=True)
    cfg = pick_config(D, Dv, k.dtype, n_feat=geom.n_feat)
    _key_pass(k, v, dS_suf if dS_op is None else dS_op, dz_suf, dk, dv, geom, cfg, s_k / s_q, win.tok_offset_k,
              frames=win.k_slots)
