"""The oracle itself: the quadratic reference against hand-computed values and a literal double loop."""
import math

import pytest
import torch

from vicinity_attn import position_features, vicinity_attention
from vicinity_attn.common.spec import VicinitySpec
from vicinity_attn.vicinity.reference import vicinity_weights


def test_weights_of_a_2x2_grid_in_closed_form():
    # Angles are 0 or pi/4 on each axis; cos(0) = 1, cos(pi/4) = r.
    r = math.sqrt(0.5)
    w = vicinity_weights(VicinitySpec(grid=(2, 2), kv_grid=(2, 2), variant="sum"))
    # token order (0,0), (0,1), (1,0), (1,1): the weight is (1 or r) + (1 or r) by rows/columns shared.
    expected = torch.tensor([[2, 1 + r, 1 + r, 2 * r],
                             [1 + r, 2, 2 * r, 1 + r],
                             [1 + r, 2 * r, 2, 1 + r],
                             [2 * r, 1 + r, 1 + r, 2]], dtype=torch.float64)
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-15)
    w_prod = vicinity_weights(VicinitySpec(grid=(2, 2), kv_grid=(2, 2), variant="product"))
    expected_prod = torch.tensor([[1, r, r, .5], [r, 1, .5, r], [r, .5, 1, r], [.5, r, r, 1]], dtype=torch.float64)
    torch.testing.assert_close(w_prod, expected_prod, rtol=0, atol=1e-15)


def test_tiny_case_by_hand():
    # One head, 1x2 grid, D = Dv = 1. relu keeps positives; weights: sum variant on a 1x2 grid gives
    # w = cos(0) + cos(delta) with delta = 0 or pi/4 on the second axis.
    q = torch.tensor([2.0, 3.0], dtype=torch.float64).view(1, 1, 2, 1)
    k = torch.tensor([1.0, 4.0], dtype=torch.float64).view(1, 1, 2, 1)
    v = torch.tensor([5.0, -7.0], dtype=torch.float64).view(1, 1, 2, 1)
    r = math.sqrt(0.5)
    w = [[2.0, 1 + r], [1 + r, 2.0]]
    expected = []
    for i, qi in enumerate([2.0, 3.0]):
        a = [qi * kj * w[i][j] for j, kj in enumerate([1.0, 4.0])]
        expected.append((a[0] * 5.0 + a[1] * -7.0) / (a[0] + a[1] + 1e-4))
    out = vicinity_attention(q, k, v, (1, 2), backend="reference")
    torch.testing.assert_close(out.flatten(), torch.tensor(expected, dtype=torch.float64), rtol=1e-14, atol=0)


def _double_loop(q, k, v, grid, kv_grid, variant, feature_map, eps, prefix):
    """The formula of the README's "The math in short" token by token, with coordinates from unravel_index."""
    phi = (lambda x: torch.relu(x)) if feature_map == "relu" else (lambda x: torch.nn.functional.elu(x) + 1)

    def angles(idx, g):
        coords = []
        for size in reversed(g):
            coords.append(idx % size)
            idx //= size
        return [(math.pi / 2) * c / s for c, s in zip(reversed(coords), g)]

    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    out = torch.empty(B, H, Nq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(Nq):
                num = torch.zeros(v.shape[-1], dtype=torch.float64)
                den = 0.0
                for j in range(Nk):
                    if i < prefix or j < prefix:
                        w = 1.0
                    else:
                        ti, tj = angles(i - prefix, grid), angles(j - prefix, kv_grid)
                        cosines = [math.cos(a - c) for a, c in zip(ti, tj)]
                        w = {"sum": sum(cosines), "product": math.prod(cosines), "none": 1.0}[variant]
                    a = float(phi(q[b, h, i]) @ phi(k[b, h, j])) * w
                    num += a * v[b, h, j]
                    den += a
                out[b, h, i] = num / (den + eps)
    return out


@pytest.mark.parametrize("grid,kv_grid,variant,feature_map,prefix", [
    ((3, 4), None, "sum", "relu", 0),
    ((3, 4), (2, 2), "product", "elu1", 0),
    ((5,), (3,), "sum", "relu", 1),
    ((2, 2, 3), (1, 2, 2), "sum", "elu1", 2),
    ((2, 3), None, "none", "relu", 0),
])
def test_reference_matches_double_loop(grid, kv_grid, variant, feature_map, prefix):
    Nq = prefix + math.prod(grid)
    Nk = prefix + math.prod(kv_grid or grid)
    q = torch.randn(2, 2, Nq, 3, dtype=torch.float64)
    k = torch.randn(2, 2, Nk, 3, dtype=torch.float64)
    v = torch.randn(2, 2, Nk, 4, dtype=torch.float64)
    out = vicinity_attention(q, k, v, grid, kv_grid, variant=variant, feature_map=feature_map,
                             backend="reference", num_prefix_tokens=prefix, eps=1e-3)
    expected = _double_loop(q, k, v, grid, kv_grid or grid, variant, feature_map, 1e-3, prefix)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["sum", "product", "none"])
@pytest.mark.parametrize("grid,kv_grid", [((7,), (3,)), ((3, 5), (2, 2)), ((2, 3, 4), (2, 1, 3))])
@pytest.mark.parametrize("prefix", [0, 3])
def test_position_features_factor_the_weights(variant, grid, kv_grid, prefix):
    spec = VicinitySpec(grid=grid, kv_grid=kv_grid, variant=variant, num_prefix_tokens=prefix)
    pq = position_features(grid, variant, side="query", num_prefix_tokens=prefix, dtype=torch.float64)
    pk = position_features(kv_grid, variant, side="key", num_prefix_tokens=prefix, dtype=torch.float64)
    assert pq.shape[1] == pk.shape[1] == spec.n_features
    torch.testing.assert_close(pq @ pk.T, vicinity_weights(spec), rtol=0, atol=1e-14)


def test_weights_are_positive():
    for variant in ("sum", "product"):
        w = vicinity_weights(VicinitySpec(grid=(9, 11), kv_grid=(9, 11), variant=variant))
        assert w.min() > 0
