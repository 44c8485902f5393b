"""docs/integrations.md's table of exact special cases, each library's formula written out in float64
against the call the table gives (the main leg: no library needed; the integration leg checks LiteMLA and
Sana against timm and diffusers themselves)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import close_fp64
from vicinity_attn import vicinity_attention
from vicinity_attn.common.feature_maps import FEATURE_MAPS


def pad_v_with_ones(q, k, v, eps):
    """EfficientViT's LiteMLA / Sana: relu features, v padded with a column of ones, last column + eps."""
    q, k = torch.relu(q), torch.relu(k)
    out = q @ (k.transpose(-1, -2) @ torch.cat([v, torch.ones_like(v[..., :1])], dim=-1))
    return out[..., :-1] / (out[..., -1:] + eps)


@pytest.mark.parametrize("eps", [1e-5, 1e-15], ids=["LiteMLA", "Sana"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_pad_v_with_ones(eps, backend):
    q, k, v = (torch.randn(2, 3, 4 * 5, 8, dtype=torch.float64) for _ in range(3))
    close_fp64(vicinity_attention(q, k, v, (4, 5), variant="none", feature_map="relu", eps=eps, backend=backend),
               pad_v_with_ones(q, k, v, eps), "pad v with ones")


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_flash_bla_convention(backend):
    """flash-bla's linear attention (default scale 1/N): phi(q) (phi(k)^T v / N) / (phi(q) . mean phi(k) + 1e-6)
    is the op on the caller's features with eps = 1e-6 * N."""
    q, k, v = (torch.randn(2, 3, 50, 8, dtype=torch.float64) for _ in range(3))
    pq, pk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    n = k.shape[2]
    theirs = pq @ (pk.transpose(-1, -2) @ (v / n)) / (pq @ pk.mean(-2, keepdim=True).transpose(-1, -2) + 1e-6)
    # "identity" takes the features as they are; relu is the same map on non-negative features
    fm = "identity" if "identity" in FEATURE_MAPS else "relu"
    close_fp64(vicinity_attention(pq, pk, v, n, variant="none", feature_map=fm, eps=1e-6 * n, backend=backend),
               theirs, "flash-bla")
