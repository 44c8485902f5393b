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


def mul_feature_map_grad_(grad: torch.Tensor, phi: torch.Tensor, feature_map: str,
                          temp: torch.Tensor | None = None) -> torch.Tensor:
    """grad *= phi'(x), in place, from phi = phi(x) alone (x need not be kept):
    relu' = [phi > 0] (so relu'(0) = 0); elu1' = 1 above zero (where phi > 1), phi = exp(x) below,
    i.e. min(phi, 1). phi' is one elementwise temporary, written into ``temp`` (phi's shape and dtype)
    when given. For relu it is sign(phi), exactly [phi > 0] for phi >= 0 and 2x faster on a CPU than
    multiplying by a bool mask (which is converted to float first)."""
    if feature_map == "relu":
        return grad.mul_(torch.sign(phi, out=temp))
    if feature_map == "elu1":
        return grad.mul_(torch.clamp_max(phi, 1.0, out=temp))
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
