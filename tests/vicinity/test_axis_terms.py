"""The per-axis regrouping of the torch backend reproduces the position features exactly."""
import math

import pytest
import torch

from vicinity_attn.common.positions import position_features
from vicinity_attn.vicinity.axis_terms import axis_terms, group_by_axis, grouped_view


def features_from_terms(terms, grid, side):
    n = math.prod(grid)
    n_feat = sum(len(t.features) for t in terms)
    out = torch.full((n, n_feat), float("nan"), dtype=torch.float64)
    idx = torch.arange(n)
    for t in terms:
        coord = (idx // math.prod(grid[t.axis + 1:])) % grid[t.axis]
        feats = (t.coord_q if side == "query" else t.coord_k)[coord]
        scale = t.scale_q if side == "query" else t.scale_k
        out[:, list(t.features)] = feats if scale is None else feats * scale[:, None]
    return out


@pytest.mark.parametrize("variant", ["sum", "product", "none"])
@pytest.mark.parametrize("grid,kv_grid", [((5,), (3,)), ((3, 4), (2, 3)), ((2, 3, 4), (2, 1, 3))])
def test_terms_rebuild_position_features(variant, grid, kv_grid):
    terms = axis_terms(grid, kv_grid, variant, dtype=torch.float64, device="cpu")
    for g, side in ((grid, "query"), (kv_grid, "key")):
        expected = position_features(g, variant, side=side, dtype=torch.float64)
        torch.testing.assert_close(features_from_terms(terms, g, side), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("grid", [(7,), (3, 5), (2, 3, 4)])
@pytest.mark.parametrize("use_buffer", [False, True])
def test_grouping_round_trip(grid, use_buffer):
    n = math.prod(grid)
    x = torch.randn(2, 3, n, 4)
    coords = torch.stack(torch.meshgrid(*[torch.arange(s) for s in grid], indexing="ij"), -1).reshape(-1, len(grid))
    buffer = torch.full((x.numel(),), float("nan")) if use_buffer else None
    for axis in range(len(grid)):
        g = group_by_axis(x, grid, axis, buffer)
        assert g.shape == (2 * 3 * grid[axis], n // grid[axis], 4) and g.is_contiguous()
        g5 = g.view(2, 3, grid[axis], n // grid[axis], 4)
        for c in range(grid[axis]):  # group c holds exactly the tokens whose coordinate on axis is c
            torch.testing.assert_close(g5[:, :, c], x[:, :, coords[:, axis] == c])
        # Writing the groups back through the strided view restores token order.
        back = torch.zeros_like(x)
        target = grouped_view(back, grid, axis)
        target.copy_(g.view(target.shape))
        torch.testing.assert_close(back, x, rtol=0, atol=0)
