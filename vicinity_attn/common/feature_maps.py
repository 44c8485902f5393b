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


def mul_feature_map_grad_(grad: torch.Tensor, phi: torch.Tensor, feature_map: str,
                          temp: torch.Tensor | None = None) -> torch.Tensor:
    """grad *= phi'(x), in place: :func:`feature_map_grad_mul`'s result (a NaN in one feature of q_i
    makes all of dphi(q_i) NaN, but dq_i stays 0 where q_i <= 0, as the reference's autograd gives).

    relu' = [phi > 0] (so relu'(0) = 0); elu1' = 1 above zero (where phi > 1), phi = exp(x) below,
    i.e. min(phi, 1); identity' = 1 (grad is returned untouched). phi' is one elementwise temporary,
    written into ``temp`` (phi's shape and dtype) when given. For relu it is sign(phi), exactly [phi > 0]
    for phi >= 0 and 2x faster on a CPU than multiplying by a bool mask (which is converted to float
    first); that product is only wrong where grad is not finite (0 * NaN), so a grad with a NaN or inf
    anywhere takes the exact, slower select.
    Checking that reads a value back, so only CPU tensors take the product: elsewhere (a GPU) the select
    runs, keeping the call free of device-to-host syncs (CUDA graphs, torch.compile "reduce-overhead").
    """
    if feature_map == "relu":
        if host_reads_are_free(grad) and _all_finite(grad):
            return grad.mul_(torch.sign(phi, out=temp))
        return grad.masked_fill_(phi <= 0, 0.0)
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


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in t: its sum is finite (one fast reduction; an overflowing sum of finite values
    only sends the caller down its exact path)."""
    return bool(torch.isfinite(t.sum()))
