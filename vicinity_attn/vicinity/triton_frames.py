"""Frame-causal vicinity attention (``causal="frames"``) on the fused kernels: the window API of the
contract shared with the torch backend (``vicinity_attn/vicinity/frames.py``), over
``vicinity_attn.kernels.vicinity.launch_frames``.

A window holds the grid tokens of frames ``start .. start + n - 1`` of ``spec.grid`` / ``spec.kv_grid``,
preceded by the spec's prefix tokens only when ``start == 0``; position features are those of the full grid
(local frame f has the time angle of frame start + f). The saved formats are the kernels': S [B*H, n + 1, F, D,
Dv] (dtype :func:`triton_backend.saved_state_dtype`), z [B*H, n + 1, F, D], den [B*H, Nq], all scaled by a
power of two; dpre likewise per slot. ``init``, ``carry``, ``carry_grad`` and ``init_grad`` are pairs (S [B, H,
F, D, Dv], z [B, H, F, D]) in the compute dtype, unscaled and unclamped.

    window_forward(q, k, v, spec, start=0, init=None) -> (o, den, S, z, carry)
    window_query_backward(do, q, o, den, S, z, spec, start, need_dq) -> (dq_or_None, dpre, init_grad)
    window_key_backward(k, v, dpre, spec, start, carry_grad, need_dk, need_dv) -> (dk_or_None, dv_or_None)
    window_key_totals(k, v, spec, start) -> (S, z)     the window's keys alone (context parallelism's exchange)

The full call (:func:`forward` / :func:`backward`, the bodies of the triton custom ops for frame-causal specs)
is ``window_forward(q, k, v, spec)[:4]``, then ``window_query_backward`` and ``window_key_backward`` with
``carry_grad=None``; saved S [B*H, T + 1, F, D, Dv], z [B*H, T + 1, F, D].
"""
from __future__ import annotations

import torch

from ..common.allocation import compute_dtype, empty_grads_like, empty_output_like
from ..common.device import launch_device
from ..common.spec import VicinitySpec
from ..kernels.replay import replayable
from ..kernels.vicinity.launch_frames import (
    frame_backward_keys,
    frame_backward_queries,
    frame_forward,
    frame_key_totals,
)
from .frames import check_state_pair, whole_call
from .triton_backend import _checked_geometry, _geometry, check_token_offsets

Pair = tuple[torch.Tensor, torch.Tensor]


def window_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: VicinitySpec, start: int = 0,
                   init: Pair | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Pair]:
    """(o, den, S, z, carry) of one window (module docstring)."""
    assert spec.causal == "frames", spec.causal
    o = empty_output_like(q, v.shape[-1])
    geom = _checked_geometry(q, k, v, o, spec)
    check_state_pair(init, "init", (*q.shape[:2], geom.n_feat, q.shape[-1], v.shape[-1]), compute_dtype(q.dtype),
                     q.device)
    with launch_device(q):
        den, S, z, carry = frame_forward(q, k, v, o, geom, spec.eps, spec.den_floor, spec.clamp, start, init)
    return o, den, S, z, carry


def window_query_backward(do: torch.Tensor, q: torch.Tensor, o: torch.Tensor, den: torch.Tensor, S: torch.Tensor,
                          z: torch.Tensor, spec: VicinitySpec, start: int,
                          need_dq: bool) -> tuple[torch.Tensor | None, Pair, Pair]:
    """(dq or None, dpre, init_grad) of one window from dO and :func:`window_forward`'s o, den, S, z."""
    assert spec.causal == "frames", spec.causal
    geom = _geometry(spec)
    (dq,) = empty_grads_like((q,), (need_dq,))
    check_token_offsets(do, "the output gradient dO")
    if dq is not None:
        check_token_offsets(dq, "dq")
    with launch_device(q):
        dpre, init_grad = frame_backward_queries(do, q, o, den, S, z, dq, geom, spec.eps, spec.den_floor,
                                                 spec.clamp, start)
    return dq, dpre, init_grad


def window_key_backward(k: torch.Tensor, v: torch.Tensor, dpre: Pair, spec: VicinitySpec, start: int,
                        carry_grad: Pair | None, need_dk: bool,
                        need_dv: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dk or None, dv or None) of one window from :func:`window_query_backward`'s dpre and ``carry_grad``."""
    assert spec.causal == "frames", spec.causal
    geom = _geometry(spec)
    check_state_pair(carry_grad, "carry_grad", (*k.shape[:2], geom.n_feat, k.shape[-1], v.shape[-1]),
                     compute_dtype(k.dtype), k.device)
    dk, dv = empty_grads_like((k, v), (need_dk, need_dv))
    for t, name in ((dk, "dk"), (dv, "dv")):
        if t is not None:
            check_token_offsets(t, name)
    with launch_device(k):
        frame_backward_keys(k, v, dpre, dk, dv, geom, start, carry_grad)
    return dk, dv


def window_key_totals(k: torch.Tensor, v: torch.Tensor, spec: VicinitySpec, start: int) -> Pair:
    """(S [B, H, F, D, Dv], z [B, H, F, D]): the states of a window's keys alone, unscaled and unclamped, in
    the compute dtype (what context parallelism exchanges before the window's forward)."""
    assert spec.causal == "frames", spec.causal
    geom = _geometry(spec)
    for t, name in ((k, "k"), (v, "v")):
        check_token_offsets(t, name)
    with launch_device(k):
        return frame_key_totals(k, v, geom, start)


# The whole call's launches are replayed per layout from its third call on (kernels/replay.py).
forward, backward = whole_call(window_forward, window_query_backward, window_key_backward, wrap=replayable)
