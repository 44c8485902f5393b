"""Feature maps phi and their derivatives, shared by the PyTorch backends."""
from __future__ import annotations

import torch

FEATURE_MAPS = ("relu", "elu1")


def apply_feature_map(x: torch.Tensor, feature_map: str) -> torch.Tensor:
    """phi(x): ``relu`` or ``elu1`` (elu(x) + 1, strictly positive)."""
    if feature_map == "relu":
        return torch.relu(x)
    if feature_map == "elu1":
        return torch.nn.functional.elu(x) + 1.0
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")


def mul_feature_map_grad_(grad: torch.Tensor, phi: torch.Tensor, feature_map: str) -> torch.Tensor:
    """grad *= phi'(x), in place, from phi = phi(x) alone (x need not be kept):
    relu' = [phi > 0] (so relu'(0) = 0); elu1' = 1 above zero (where phi > 1), phi = exp(x) below."""
    if feature_map == "relu":
        return grad.mul_(phi > 0)
    if feature_map == "elu1":
        return grad.mul_(torch.where(phi > 1, torch.ones_like(phi), phi))
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
