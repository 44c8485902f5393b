"""FLOP formulas. Every FLOP/s figure in the benchmark is one of these divided by a median time.

Per (batch, head), multiply-add = 2 FLOPs, lower-order (O(N D)) work not counted:

- vicinity attention (every provider of the linear formulation, ``authors`` included), F position
  features per token: forward = two dense passes, the state ``S = X_k^T V`` (2 Nk F D Dv) and the
  output ``X_q S`` (2 Nq F D Dv), so ``4 N F D Dv`` when Nq = Nk = N. Normaliser (O(N F D)) not
  counted. Backward = 2x forward (two matmuls per forward matmul).
- softmax attention (``flash``, ``sdpa-math``): forward ``2 Nq Nk D + 2 Nq Nk Dv`` (= 4 N^2 D);
  backward = 2.5x forward, the FlashAttention convention (five N^2-sized matmuls, one of them the
  recomputation of the scores, against two in the forward).
- ``fwdbwd`` is the sum of the two.
"""
from __future__ import annotations

MODES = ("fwd", "bwd", "fwdbwd")

FLOP_FORMULA_TEXT = (
    "FLOPs per (batch, head), multiply-add = 2: vicinity (vicinity*, authors) forward = "
    "4*N*F*D*Dv (two dense passes; F = 4 position features on a 2-d grid), backward = 2x forward; "
    "softmax attention (flash, sdpa-math) forward = 4*N^2*D, backward = 2.5x forward "
    "(FlashAttention convention); fwdbwd = fwd + bwd."
)


def vicinity_forward_flops(batch: int, heads: int, n_q: int, n_k: int, dim: int, dim_v: int,
                           n_features: int) -> float:
    """Forward FLOPs of linear vicinity attention: 2*Nk*F*D*Dv (state) + 2*Nq*F*D*Dv (output)."""
    return float(batch * heads * 2 * n_features * dim * dim_v * (n_k + n_q))


def softmax_forward_flops(batch: int, heads: int, n_q: int, n_k: int, dim: int, dim_v: int) -> float:
    """Forward FLOPs of softmax attention: 2*Nq*Nk*D (scores) + 2*Nq*Nk*Dv (output)."""
    return float(batch * heads * 2 * n_q * n_k * (dim + dim_v))


# Backward FLOPs as a multiple of forward FLOPs, by kind of attention.
BACKWARD_FACTOR = {"linear": 2.0, "softmax": 2.5}


def mode_flops(forward_flops: float, kind: str, mode: str) -> float:
    """FLOPs of ``mode`` ("fwd", "bwd", "fwdbwd") for an attention of ``kind`` ("linear"/"softmax")."""
    factor = BACKWARD_FACTOR[kind]
    if mode == "fwd":
        return forward_flops
    if mode == "bwd":
        return factor * forward_flops
    if mode == "fwdbwd":
        return (1.0 + factor) * forward_flops
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
