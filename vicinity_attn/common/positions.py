"""Position features: the one place that turns a grid into the vectors P with w(i, j) = <P_q(i), P_k(j)>.

Every backend uses these (the reference only to cross-check; it builds its N x N weights from
angles directly). The Triton kernels recompute the same features from the token index on the
fly (``kernels/positions.py``); the tests compare the two.

Feature order (F features per token):

- ``"none"``: ``[1]`` (F = 1).
- ``"sum"``: ``[cos t_0, sin t_0, cos t_1, sin t_1, ...]`` (F = 2 * n_axes).
- ``"product"``: all products choosing cos or sin per axis (F = 2 ** n_axes); in feature ``m``
  axis ``a`` contributes ``sin t_a`` when bit ``n_axes - 1 - a`` of ``m`` is set, else ``cos t_a``.
- With ``num_prefix_tokens > 0`` two features are appended. A prefix (class/register) token
  weighs 1 against every token and every token weighs 1 against it:
  grid query ``[P, 1, 0]``, grid key ``[P, 0, 1]``, prefix query ``[0, 1, 1]``,
  prefix key ``[0, 1, 0]``. Prefix tokens come first in the sequence.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

VARIANTS = ("sum", "product", "none")


def feature_count(n_axes: int, variant: str, has_prefix: bool = False) -> int:
    """Number F of position features per token for ``n_axes`` grid axes and ``variant``."""
    if variant == "none":
        base = 1
    elif variant == "sum":
        base = 2 * n_axes
    elif variant == "product":
        base = 2 ** n_axes
    else:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return base + (2 if has_prefix else 0)


def grid_angles(grid: Sequence[int], *, dtype: torch.dtype = torch.float64,
                device: torch.device | str | None = None, tokens: range | None = None) -> torch.Tensor:
    """Angles theta_a(i) = (pi/2) * coord_a(i) / size_a for every token of ``grid``, or only for the
    grid tokens ``tokens`` (a range of row-major indices: a shard of the grid).

    Returns a [prod(grid), n_axes] (or [len(tokens), n_axes]) tensor; tokens in row-major order
    (last axis fastest).
    """
    if tokens is None:
        coords = torch.meshgrid(*[torch.arange(s, dtype=torch.float64, device=device) for s in grid],
                                indexing="ij")
        coords = [c.reshape(-1) for c in coords]
    else:
        index = torch.arange(tokens.start, tokens.stop, dtype=torch.int64, device=device)
        coords = []
        for s in reversed(grid):   # unravel, last axis fastest
            coords.insert(0, (index % s).to(torch.float64))
            index = index // s
    angles = torch.stack([c * (math.pi / 2) / s for c, s in zip(coords, grid)], dim=-1)
    return angles.to(dtype)


def position_features(grid: Sequence[int], variant: str, *, side: str = "query",
                      num_prefix_tokens: int = 0, dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None, tokens: range | None = None) -> torch.Tensor:
    """Per-token position features P, [num_prefix_tokens + prod(grid), F], with
    w(i, j) = <P_query(i), P_key(j)> (see the module docstring for the feature order).

    ``side`` ("query" or "key") matters only with prefix tokens, whose features are asymmetric.
    ``tokens``: only the rows of these sequence positions (a range within the whole sequence, prefix
    tokens first: a shard under context parallelism); the result is [len(tokens), F].
    Computed in float64 and cast to ``dtype``.
    """
    if side not in ("query", "key"):
        raise ValueError(f"side must be 'query' or 'key', got {side!r}")
    has_prefix = num_prefix_tokens > 0
    if tokens is not None:
        P = num_prefix_tokens
        angles = grid_angles(grid, device=device, tokens=range(max(tokens.start, P) - P, max(tokens.stop, P) - P))
        num_prefix_tokens = max(0, min(P, tokens.stop) - tokens.start)
    else:
        angles = grid_angles(grid, device=device)
    feats = _base_features(angles, variant)
    if has_prefix:   # the two prefix features exist on every row, prefix rows in the range or not
        feats = _with_prefix_tail(feats, num_prefix_tokens, side)
    return feats.to(dtype)


def _base_features(angles: torch.Tensor, variant: str) -> torch.Tensor:
    """[n, F0] float64 features of the variant from [n, n_axes] angles (no prefix features)."""
    device = angles.device
    n_tokens, n_axes = angles.shape
    if variant == "none":
        feats = torch.ones(n_tokens, 1, dtype=torch.float64, device=device)
    elif variant == "sum":
        feats = torch.stack([angles.cos(), angles.sin()], dim=-1).reshape(n_tokens, 2 * n_axes)
    elif variant == "product":
        cos, sin = angles.cos(), angles.sin()
        feats = torch.ones(n_tokens, 1, dtype=torch.float64, device=device)
        for a in range(n_axes):  # axis 0 ends up as the most significant bit of the feature index
            feats = torch.stack([feats * cos[:, a:a + 1], feats * sin[:, a:a + 1]], dim=-1)
            feats = feats.reshape(n_tokens, 2 ** (a + 1))
    else:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return feats


def _with_prefix_tail(feats: torch.Tensor, num_prefix_tokens: int, side: str) -> torch.Tensor:
    """The grid rows ``feats`` [n, F0] with the two prefix features appended, after ``num_prefix_tokens``
    prefix rows (module docstring)."""
    device, (n_tokens, n_feat) = feats.device, feats.shape
    grid_tail = [1.0, 0.0] if side == "query" else [0.0, 1.0]
    prefix_tail = [1.0, 1.0] if side == "query" else [1.0, 0.0]
    tail = torch.tensor(grid_tail, dtype=torch.float64, device=device).expand(n_tokens, 2)
    grid_rows = torch.cat([feats, tail], dim=1)
    prefix_rows = torch.cat([torch.zeros(num_prefix_tokens, n_feat, dtype=torch.float64, device=device),
                             torch.tensor(prefix_tail, dtype=torch.float64, device=device)
                             .expand(num_prefix_tokens, 2)], dim=1)
    return torch.cat([prefix_rows, grid_rows], dim=0)


def expand_features(phi: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The F*D-wide expanded features of the authors' formulation: [B, H, N, D] features and [N, F]
    positions -> [B, H, N, F*D] = concat_m(P_m * phi), feature-major (the order of their
    ``torch.cat([q*cos(a), q*sin(a), ...], dim=-1)``). Used only where that formulation is reproduced
    (the clamped VVT layer, the ``authors`` benchmark baseline); the backends never build it."""
    B, H, N, D = phi.shape
    return (pos[:, :, None] * phi[:, :, :, None, :]).reshape(B, H, N, pos.shape[1] * D)
