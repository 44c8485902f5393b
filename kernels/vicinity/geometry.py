"""What the launchers need to know about a call, as plain values (kernels stay free of the library)."""
from __future__ import annotations

from dataclasses import dataclass

VARIANT_CODES = {"none": 0, "sum": 1, "product": 2}
FMAP_CODES = {"relu": 0, "elu1": 1, "identity": 2}


def feature_count(n_axes: int, variant: int, has_prefix: bool) -> int:
    """F for a variant code (0 none, 1 sum, 2 product); mirrors vicinity_attn.positions.feature_count."""
    base = 1 if variant == 0 else (2 * n_axes if variant == 1 else 2 ** n_axes)
    return base + (2 if has_prefix else 0)


@dataclass(frozen=True)
class Geometry:
    """Position-feature parameters: grids padded to 3 axes with 1s, codes for variant / feature map."""

    n_axes: int
    variant: int
    fmap: int
    n_prefix: int
    q_sizes: tuple[int, int, int]
    k_sizes: tuple[int, int, int]

    @classmethod
    def build(cls, grid: tuple[int, ...], kv_grid: tuple[int, ...], variant: str, feature_map: str,
              n_prefix: int) -> Geometry:
        assert 1 <= len(grid) <= 3 and len(kv_grid) == len(grid)
        pad = lambda g: tuple(g) + (1,) * (3 - len(g))  # noqa: E731
        return cls(len(grid), VARIANT_CODES[variant], FMAP_CODES[feature_map], n_prefix, pad(grid), pad(kv_grid))

    @property
    def n_feat(self) -> int:
        return feature_count(self.n_axes, self.variant, self.n_prefix > 0)

    def constexprs(self, is_query: bool) -> dict:
        return dict(N_FEAT=self.n_feat, N_AXES=self.n_axes, VARIANT=self.variant,
                    HAS_PREFIX=self.n_prefix > 0, IS_QUERY=is_query, FMAP=self.fmap)
