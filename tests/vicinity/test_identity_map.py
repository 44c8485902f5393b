"""feature_map="identity": the caller's features used as they are (phi(x) = x, phi' = 1).

The exact special case the docs cite (flash-bla's convention): a non-negative map applied by the caller, then
the op with "identity", is the op with that map built in. Signed features are the caller's business: nothing
checks values, and the op computes the same formula as the reference, a normaliser of any sign (or 0) included.
The identity cases of the backend matrices (fwd, grads, forward AD, compile, varlen, context parallel) live in
the files of those matrices; this file holds what is specific to identity.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import check_against_reference, make_inputs, rel_err, token_counts, triton_device
from vicinity_attn import VicinityAttention, vicinity_attention, vicinity_attention_varlen

DEVICE = triton_device()
BACKENDS = ["reference", "torch"] + (["triton"] if DEVICE == "cpu" else [])
HAND_MAPS = {"elu1": lambda x: F.elu(x) + 1.0, "relu": torch.relu}


def focused(x: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    """FLatten's focused map: relu(x) ** p rescaled to relu(x)'s norm (non-negative, some exact zeros)."""
    r = torch.relu(x)
    rp = r ** p
    return rp * (r.norm(dim=-1, keepdim=True) / rp.norm(dim=-1, keepdim=True).clamp_min(1e-12))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hand_map", sorted(HAND_MAPS))
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_hand_applied_map_then_identity_equals_the_built_in_map(backend, hand_map, layout):
    """phi applied by the caller, then feature_map="identity", equals feature_map=phi on the raw inputs:
    outputs and the gradients with respect to the raw q, k, v (autograd through the caller's map), float64."""
    grid, kv_grid, prefix = (3, 4), (2, 3), 1
    nq, nk = token_counts(grid, kv_grid, prefix)
    q, k, v = make_inputs(2, 2, nq, nk, 8, 6, layout=layout)
    kw = dict(grid=grid, kv_grid=kv_grid, num_prefix_tokens=prefix, layout=layout, backend=backend)
    phi = HAND_MAPS[hand_map]
    got = vicinity_attention(phi(q), phi(k), v, feature_map="identity", **kw)
    want = vicinity_attention(q, k, v, feature_map=hand_map, **kw)
    do = torch.randn_like(want)
    for name, g, w in zip(("out", "dq", "dk", "dv"), (got, *torch.autograd.grad(got, (q, k, v), do)),
                          (want, *torch.autograd.grad(want, (q, k, v), do))):
        assert rel_err(g, w) < 1e-12, f"{name}: {rel_err(g, w):.3e}"


@pytest.mark.parametrize("backend", BACKENDS[1:])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_focused_features_by_the_tolerance_rule(backend, dtype):
    """FLatten-style focused features (non-negative, many exact zeros, heavy-tailed) at head dim 32, by the
    tolerance rule against the float64 reference on the same features."""
    grid = (6, 7)
    nq, nk = token_counts(grid)
    raw = make_inputs(1, 2, nq, nk, 32, 16, requires_grad=False)
    q, k = (focused(t).to(dtype).requires_grad_() for t in raw[:2])
    v = raw[2].to(dtype).requires_grad_()
    assert (q == 0).any() and (q >= 0).all()
    check_against_reference(q, k, v, grid=grid, feature_map="identity", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_signed_features_are_not_checked_and_follow_the_reference(backend):
    """Signed identity features: no error, no check of values; the op computes the reference's formula,
    with normalisers of both signs (float64, rounding-level agreement)."""
    grid, kv_grid = (4, 5), (2, 5)
    nq, nk = token_counts(grid, kv_grid)
    q, k, v = make_inputs(1, 2, nq, nk, 8, 8)
    with torch.no_grad():
        k.add_(0.3)   # mostly positive keys, queries of both signs: rows of either normaliser sign
    kw = dict(grid=grid, kv_grid=kv_grid, variant="none", feature_map="identity")
    got = vicinity_attention(q, k, v, backend=backend, **kw)
    want = vicinity_attention(q, k, v, backend="reference", **kw)
    assert rel_err(got, want) < 1e-9
    den = torch.einsum("bhid,bhjd->bhi", q.detach(), k.detach())    # sum_j q_i.k_j (w = 1 for "none")
    assert (den > 0).any() and (den < 0).any()
    do = torch.randn_like(want)
    for name, g, w in zip("qkv", torch.autograd.grad(got, (q, k, v), do), torch.autograd.grad(want, (q, k, v), do)):
        assert rel_err(g, w) < 1e-9, name


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")   # the interpreter's numpy division by 0
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_zero_normaliser_gives_a_non_finite_row_without_an_error(backend):
    """Signed features can cancel: with variant "none", one query feature 1 and keys -0.5, 0.25, the
    normaliser is 1 * (-0.5 + 0.25) + eps = 0 exactly for eps = 0.25, and that row is inf / NaN (no exception)."""
    q = torch.ones(1, 1, 2, 1, dtype=torch.float64)
    q[0, 0, 1] = 2.0                                     # second row: 2 * (-0.25) + 0.25 = -0.25, finite
    k = torch.tensor([-0.5, 0.25], dtype=torch.float64).view(1, 1, 2, 1)
    v = torch.tensor([1.0, 3.0], dtype=torch.float64).view(1, 1, 2, 1)
    out = vicinity_attention(q, k, v, 2, variant="none", feature_map="identity", eps=0.25, backend=backend)
    assert not torch.isfinite(out[0, 0, 0]).any()
    # Second row: (2 * (-0.5 * 1 + 0.25 * 3)) / (-0.25) = -2.
    assert math.isclose(out[0, 0, 1, 0].item(), -2.0, rel_tol=1e-12)


def test_unknown_feature_map_lists_identity():
    q, k, v = make_inputs(1, 1, 4, 4, 4, 4, requires_grad=False)
    with pytest.raises(ValueError, match=r"feature_map must be one of \('relu', 'elu1', 'identity'\)"):
        vicinity_attention(q, k, v, (2, 2), feature_map="elu")
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="feature_map .*'identity'"):
        vicinity_attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, [(2, 2)],
                                  feature_map="Identity")


def test_layer_refuses_identity_on_its_signed_projections():
    """VicinityAttention's q and k are linear projections of any sign: identity features there would give
    normalisers of any sign (or 0) from the first step. The layer says so and names the argument."""
    with pytest.raises(ValueError, match="feature_map='identity'"):
        VicinityAttention(16, 2, feature_map="identity")
