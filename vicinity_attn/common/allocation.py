"""Output allocation that follows the caller's memory layout, and the backends' accumulation dtype."""
from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the backends: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_output_like(q: torch.Tensor, dv: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised [B, H, Nq, dv] tensor whose memory order matches q's.

    q is a [B, H, Nq, D] view; when its memory is [B, Nq, H, D] (layout "bnhd", heads
    inner to tokens) the output is allocated that way too, so that transposing it back to the
    caller's layout gives a contiguous tensor.
    """
    B, H, N, _ = q.shape
    dtype = q.dtype if dtype is None else dtype
    if H > 1 and N > 1 and q.stride(1) < q.stride(2):
        return torch.empty(B, N, H, dv, dtype=dtype, device=q.device).transpose(1, 2)
    return torch.empty(B, H, N, dv, dtype=dtype, device=q.device)


def empty_grads_like(tensors: tuple[torch.Tensor, ...], needs: tuple[bool, ...]) -> tuple[torch.Tensor | None, ...]:
    """Uninitialised gradients for ``tensors`` [B, H, N, E], each laid out in memory like its tensor
    (:func:`empty_output_like`), None where ``needs`` says it is not wanted."""
    return tuple(empty_output_like(t, t.shape[-1]) if need else None for t, need in zip(tensors, needs))
