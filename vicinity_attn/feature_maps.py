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


def feature_map_grad(x: torch.Tensor, phi: torch.Tensor, feature_map: str) -> torch.Tensor:
    """phi'(x), given x and phi(x); relu'(0) = 0."""
    if feature_map == "relu":
        return (x > 0).to(phi.dtype)
    if feature_map == "elu1":
        # elu(x) + 1 is x + 1 above zero (slope 1) and exp(x) below (slope exp(x) = phi(x)).
        return torch.where(x > 0, torch.ones_like(phi), phi)
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
