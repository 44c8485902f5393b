"""The k-NN triton backend: the fused kernels of ``vicinity_attn.kernels.knn``, differentiable through
the custom ops of :mod:`vicinity_attn.knn.ops` (never imported back).

Forward: a selection pass finds tau (each query row's topk-th largest score) by bisection over the
score bits, recomputing scores instead of storing rows; a FlashAttention-style pass then takes the
softmax over the scores >= tau and stores o and the logsumexp. Saved: q, k, v, o, tau and lse (two
floats per query row); nothing Nq x Nk exists at any point. CUDA tensors run on the GPU they live on
(whichever is current); CPU tensors only in the Triton interpreter (``TRITON_INTERPRET=1`` set before
triton is imported).
"""
from __future__ import annotations

import torch

from ..common.allocation import empty_grads_like, empty_output_like
from ..common.device import launch_device
from ..kernels.knn import knn_backward, knn_forward
from ..kernels.replay import replayable
from ..kernels.runtime import interpreting

MAX_HEAD_DIM = 256


def check_knn_triton_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Errors for calls the kernels cannot run: head dims above 256, grids too large for CUDA, CPU
    tensors outside the interpreter."""
    D, Dv = q.shape[-1], v.shape[-1]
    if D > MAX_HEAD_DIM:
        raise ValueError(f"backend='triton' supports head dims up to {MAX_HEAD_DIM}, got D = {D} for q/k")
    if Dv > MAX_HEAD_DIM:
        raise ValueError(f"backend='triton' supports head dims up to {MAX_HEAD_DIM}, got Dv = {Dv} for v")
    B, H = q.shape[:2]
    if B * H >= 2 ** 16:
        raise ValueError(f"backend='triton' supports batch * heads < 65536 (a CUDA grid axis), got B * H = {B * H}")
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        # Offsets within one (batch, head) slice are int32.
        span = (t.shape[2] - 1) * t.stride(2) + (t.shape[3] - 1) * t.stride(3)
        if span >= 2 ** 31:
            raise ValueError(f"backend='triton': {name} is too large for the kernels' int32 token offsets "
                             f"(shape {tuple(t.shape)}, strides {t.stride()})")
    if q.device.type == "cpu":
        if not interpreting():
            raise RuntimeError("backend='triton' needs CUDA tensors; CPU tensors run only in the Triton "
                               "interpreter (set TRITON_INTERPRET=1 before importing triton), or use "
                               "backend='torch'")
    elif q.device.type != "cuda":
        raise RuntimeError(f"backend='triton' needs CUDA tensors, got device {q.device}")


@replayable
def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: int,
            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, tau, lse): o [B, H, Nq, Dv] in q's dtype and memory order, tau and lse [B, H, Nq] in float32
    (float64 for float64 inputs)."""
    check_knn_triton_inputs(q, k, v)
    B, H, Nq, _ = q.shape
    o = empty_output_like(q, v.shape[-1])
    with launch_device(q):
        tau, lse = knn_forward(q, k, v, o, topk, scale)
    return o, tau.view(B, H, Nq), lse.view(B, H, Nq)


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             tau: torch.Tensor, lse: torch.Tensor, topk: int, scale: float,
             needs: tuple[bool, bool, bool] = (True, True, True),
             ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dq, dk, dv) laid out like q, k, v; None (and its kernel work skipped) where not needed."""
    return _backward(do, q, k, v, o, tau, lse, topk, scale, tuple(bool(n) for n in needs))


@replayable
def _backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
              tau: torch.Tensor, lse: torch.Tensor, topk: int, scale: float,
              needs: tuple[bool, bool, bool]) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    dq, dk, dv = empty_grads_like((q, k, v), needs)
    B, H, Nq, _ = q.shape
    with launch_device(q):
        knn_backward(do, q, k, v, o, tau.reshape(B * H, Nq).contiguous(), lse.reshape(B * H, Nq).contiguous(),
                     dq, dk, dv, scale)
    return dq, dk, dv
