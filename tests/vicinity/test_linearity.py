"""The torch backend is linear: saved-for-backward memory grows linearly in N, nothing N x N."""
import torch

from vicinity_attn import vicinity_attention


def saved_tensors(grid, kv_grid, backend, B=1, H=2, D=16):
    from math import prod
    Nq, Nk = prod(grid), prod(kv_grid)
    q = torch.randn(B, H, Nq, D, requires_grad=True)
    k = torch.randn(B, H, Nk, D, requires_grad=True)
    v = torch.randn(B, H, Nk, D, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        vicinity_attention(q, k, v, grid, kv_grid, backend=backend)
    return saved, Nq, Nk


def saved_bytes(saved):
    storages = {}
    for t in saved:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def test_saved_bytes_grow_linearly_and_nothing_is_quadratic():
    sizes = [(8, 8), (16, 16), (24, 24), (32, 32)]
    results = [saved_tensors(g, g, "torch") for g in sizes]
    byte_counts = [saved_bytes(s) for s, _, _ in results]
    ns = [n for _, n, _ in results]
    for saved, nq, nk in results:
        assert all(t.numel() < nq * nk for t in saved), [tuple(t.shape) for t in saved]
    # Exactly affine in N: equal steps of N give equal steps of bytes.
    slopes = [(b1 - b0) / (n1 - n0) for (b0, n0), (b1, n1) in zip(zip(byte_counts, ns), zip(byte_counts[1:], ns[1:]))]
    assert max(slopes) == min(slopes), slopes
    # q, k, v, o (4 x 16 floats) + den (1 float) per token and head: 65 floats, nothing else per token.
    assert slopes[0] == 2 * 65 * 4


def test_reference_is_quadratic_for_contrast():
    # Guards the measurement itself: the quadratic reference does save N x N tensors.
    saved, nq, nk = saved_tensors((8, 8), (8, 8), "reference")
    assert any(t.numel() >= nq * nk for t in saved)
