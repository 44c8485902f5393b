"""Feature maps phi and their derivatives, shared by the PyTorch backends.

``relu`` (the paper's), ``elu1`` (elu(x) + 1) and ``identity`` (phi(x) = x: the caller has applied its own
feature map; the features should be non-negative, but no value is checked).
"""
from __future__ import annotations

import torch

FEATURE_MAPS = ("relu", "elu1", "identity")


def apply_feature_map(x: torch.Tensor, feature_map: str) -> torch.Tensor:
    """phi(x): ``relu``, ``elu1`` (elu(x) + 1, strictly positive) or ``identity`` (x itself, not a copy)."""
    if feature_map == "relu":
        return torch.relu(x)
    if feature_map == "elu1":
        return torch.nn.functional.elu(x) + 1.0
    if feature_map == "identity":
        return x
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")


def feature_map_grad_mul(grad: torch.Tensor, phi: torch.Tensor, feature_map: str) -> torch.Tensor:
    """grad * phi'(x) as a new tensor, from phi = phi(x), with autograd's semantics for relu and elu:
    where phi' = 0 (relu, x <= 0) the result is exactly 0 even if grad is NaN or inf, and where x is
    NaN, grad passes through. No data-dependent branch (works under vmap). identity: phi' = 1, a copy of grad."""
    if feature_map == "relu":
        return grad.masked_fill(phi <= 0, 0.0)
    if feature_map == "elu1":
        return grad * _elu1_slope(phi)
    if feature_map == "identity":
        return grad.clone()
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")


def mul_feature_map_grad_(grad: torch.Tensor, phi: torch.Tensor, feature_map: str) -> torch.Tensor:
    """grad *= phi'(x), in place, with :func:`feature_map_grad_mul`'s semantics (a NaN in one feature of q_i
    makes all of dphi(q_i) NaN, but dq_i stays 0 where q_i <= 0, as the reference's autograd gives).

    relu: one pass of autograd's own relu backward (``threshold_backward``: 0 where phi <= 0, grad
    elsewhere, a NaN phi passing grad through), written into grad; no value is read back, on any device.
    elu1' = 1 above zero (where phi > 1), phi = exp(x) below, i.e. min(phi, 1); identity' = 1 (grad is
    returned untouched).
    """
    if feature_map == "relu":
        return torch.ops.aten.threshold_backward(grad, phi, 0, grad_input=grad)
    if feature_map == "elu1":
        return grad.mul_(_elu1_slope(phi))
    if feature_map == "identity":
        return grad
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")


def _elu1_slope(phi: torch.Tensor) -> torch.Tensor:
    """elu1'(x) from phi = elu1(x): phi (= exp(x)) where phi < 1, i.e. x < 0; 1 elsewhere, NaN x included
    (autograd's elu passes the gradient through a NaN input)."""
    return torch.where(phi < 1.0, phi, torch.ones((), dtype=phi.dtype, device=phi.device))


def host_reads_are_free(t: torch.Tensor) -> bool:
    """Whether reading a value of ``t`` back on the host costs nothing: a CPU tensor. A GPU tensor's read
    would synchronise the stream and break CUDA-graph capture."""
    return t.device.type == "cpu"
