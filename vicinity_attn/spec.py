"""The validated description of one vicinity-attention call, handed to every backend."""
from __future__ import annotations

from dataclasses import dataclass

from .positions import feature_count


@dataclass(frozen=True)
class VicinitySpec:
    """Everything about a call except the tensors.

    ``grid`` / ``kv_grid``: 1 to 3 positive ints; the query / key sequence is
    ``num_prefix_tokens`` prefix tokens followed by ``prod(grid)`` / ``prod(kv_grid)`` grid tokens.
    ``den_floor``: the normaliser is max(sum_j phi(q_i).phi(k_j) w(i,j), den_floor) + eps (L2ViT's
    floor; 0 = none). ``clamp``: None, or (min_mag, max_mag) for the authors' VVT magnitude clamp on
    the states, the inverse normaliser, the numerator and the output.
    """

    grid: tuple[int, ...]
    kv_grid: tuple[int, ...]
    variant: str = "sum"
    feature_map: str = "relu"
    eps: float = 1e-4
    num_prefix_tokens: int = 0
    den_floor: float = 0.0
    clamp: tuple[float, float] | None = None

    @property
    def n_axes(self) -> int:
        return len(self.grid)

    @property
    def n_features(self) -> int:
        """F, the number of position features per token."""
        return feature_count(self.n_axes, self.variant, self.num_prefix_tokens > 0)
