"""The vicinity weights regrouped by grid axis, which lets the torch backend skip half the work.

The position features of :mod:`vicinity_attn.common.positions` (F per token) factor w(i, j) exactly, but
a feature of one axis takes only ``size_a`` distinct values. Grouping tokens by their coordinate
on that axis, the F features split into *terms*; each term t has a group axis a, G in {1, 2}
per-coordinate features A_t (cos / sin of theta_a, or the constant 1) and optionally a per-token
scale (the remaining axes' factors, "product" variant only):

    "sum":      w = sum_a [cos, sin](theta_a(i)) . [cos, sin](theta_a(j))      n_axes terms, no scale
    "product":  w = [cos, sin](theta_0(i)) . [cos, sin](theta_0(j)) * sum_r alpha_r(i) alpha_r(j)
                                                                          2^(n_axes-1) terms
    "none":     w = 1                                                      1 term, G = 1

With tokens grouped by coordinate c of the term's axis, the states of the term's G features are
``S_g = sum_c A_t[c, g] T[c]`` with ``T[c] = sum_{j in group c} scale(j) phi(k_j) v_j^T``, and the
output of a query in group c is ``phi(q_i)^T M[c]`` with ``M[c] = sum_g A_t[c, g] S_g``: one
D x Dv product per token per term instead of one per feature. The states S_g are exactly the
feature states of the README's "The math in short" (term features map to feature indices ``features``).
Prefix tokens are not part of any term; the backend handles their two features directly.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..common.positions import grid_angles, position_features


@dataclass(frozen=True)
class AxisTerm:
    """One term: ``axis`` groups the tokens; ``coord_q`` / ``coord_k`` [size_a, G] are the per-
    coordinate features of queries / keys; ``scale_q`` / ``scale_k`` [N_grid] or None; ``features``
    (length G) are the indices of the term's features among the F position features."""

    axis: int
    features: tuple[int, ...]
    coord_q: torch.Tensor
    coord_k: torch.Tensor
    scale_q: torch.Tensor | None
    scale_k: torch.Tensor | None


def _axis_trig(size: int, dtype, device) -> torch.Tensor:
    """[size, 2]: cos and sin of theta = (pi/2) c / size for c = 0 .. size-1."""
    angles = grid_angles((size,), device=device)[:, 0]
    return torch.stack([angles.cos(), angles.sin()], dim=-1).to(dtype)


def _residual_scales(grid: Sequence[int], dtype, device) -> torch.Tensor:
    """[prod(grid), 2^(n-1)]: the product features of axes 1.. (a function of those coordinates only),
    repeated over axis 0 in token order."""
    rest = tuple(grid[1:])
    feats = position_features(rest, "product", dtype=dtype, device=device)
    return feats.repeat(grid[0], 1)


def axis_terms(grid: Sequence[int], kv_grid: Sequence[int], variant: str, *,
               dtype: torch.dtype, device: torch.device | str | None) -> list[AxisTerm]:
    """The terms of ``variant`` for queries on ``grid`` and keys on ``kv_grid`` (module docstring)."""
    n_axes = len(grid)
    if variant == "none":
        ones_q = torch.ones(grid[0], 1, dtype=dtype, device=device)
        ones_k = torch.ones(kv_grid[0], 1, dtype=dtype, device=device)
        return [AxisTerm(0, (0,), ones_q, ones_k, None, None)]
    if variant == "sum":
        return [AxisTerm(a, (2 * a, 2 * a + 1), _axis_trig(grid[a], dtype, device),
                         _axis_trig(kv_grid[a], dtype, device), None, None) for a in range(n_axes)]
    if variant == "product":
        trig_q, trig_k = _axis_trig(grid[0], dtype, device), _axis_trig(kv_grid[0], dtype, device)
        if n_axes == 1:
            return [AxisTerm(0, (0, 1), trig_q, trig_k, None, None)]
        # Feature m = b0 * 2^(n-1) + r: axis 0 is the most significant bit (positions.py order).
        half = 2 ** (n_axes - 1)
        res_q, res_k = _residual_scales(grid, dtype, device), _residual_scales(kv_grid, dtype, device)
        return [AxisTerm(0, (r, half + r), trig_q, trig_k, res_q[:, r].contiguous(), res_k[:, r].contiguous())
                for r in range(half)]
    raise ValueError(f"unknown variant {variant!r}")


def grouped_view(x: torch.Tensor, grid: Sequence[int], axis: int) -> torch.Tensor:
    """[B, H, prod(grid), E] in token order -> the strided view [B, H, grid[axis], *other axes, E]
    (no copy): group c along dim 2 holds the tokens whose coordinate on ``axis`` is c."""
    B, H, N, E = x.shape
    return x.view(B, H, *grid, E).movedim(2 + axis, 2)


def group_by_axis(x: torch.Tensor, grid: Sequence[int], axis: int,
                  buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Contiguous [B, H, prod(grid), E] -> contiguous [B*H*s, n, E] (s = grid[axis], n = prod(grid) / s),
    tokens grouped by their coordinate on ``axis`` as batched matrices: a view for axis 0, otherwise
    a permuted copy (into the flat ``buffer`` when given, so that no fresh memory is touched)."""
    B, H, N, E = x.shape
    s = grid[axis]
    if axis == 0:
        return x.view(B * H * s, N // s, E)
    src = grouped_view(x, grid, axis)
    out = torch.empty(src.shape, dtype=x.dtype, device=x.device) if buffer is None \
        else buffer[:x.numel()].view(src.shape)
    out.copy_(src)
    return out.view(B * H * s, N // s, E)
