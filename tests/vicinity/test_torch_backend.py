"""The linear PyTorch backend against the float64 reference: forward and all three gradients."""
import pytest
import torch

from tests.helpers import check_against_reference, make_inputs, rel_err, token_counts
from vicinity_attn import vicinity_attention

# (grid, kv_grid, prefix tokens): 1-d, 2-d, 3-d, cross grids, odd sizes, 1 x n, prefix tokens.
GRIDS = [
    ((5, 7), None, 0),
    ((1, 9), None, 0),
    ((11,), (4,), 0),
    ((6, 5), (3, 2), 0),
    ((2, 3, 4), None, 0),
    ((3, 2, 3), (1, 2, 1), 0),
    ((4, 4), (2, 2), 1),
    ((3, 5), None, 4),
]


@pytest.mark.parametrize("variant", ["sum", "product", "none"])
@pytest.mark.parametrize("grid,kv_grid,prefix", GRIDS)
def test_float64_matches_reference(variant, grid, kv_grid, prefix):
    Nq, Nk = token_counts(grid, kv_grid, prefix)
    q, k, v = make_inputs(2, 3, Nq, Nk, 8, 5)
    check_against_reference(q, k, v, grid=grid, kv_grid=kv_grid, variant=variant, backend="torch",
                            num_prefix_tokens=prefix)


@pytest.mark.parametrize("D,Dv", [(1, 1), (8, 8), (40, 24), (48, 48)])
@pytest.mark.parametrize("feature_map", ["relu", "elu1", "identity"])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_head_dims_feature_maps_layouts(D, Dv, feature_map, layout):
    grid, kv_grid = (5, 7), (3, 4)
    Nq, Nk = token_counts(grid, kv_grid)
    q, k, v = make_inputs(2, 2, Nq, Nk, D, Dv, layout=layout, feature_map=feature_map)
    check_against_reference(q, k, v, grid=grid, kv_grid=kv_grid, feature_map=feature_map, layout=layout,
                            backend="torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", ["sum", "product"])
@pytest.mark.parametrize("grid,kv_grid,prefix", [((9, 7), None, 0), ((2, 3, 5), (1, 3, 2), 2)])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_low_precision_tolerance_rule(dtype, variant, grid, kv_grid, prefix, layout):
    Nq, Nk = token_counts(grid, kv_grid, prefix)
    q, k, v = make_inputs(2, 2, Nq, Nk, 40, 24, dtype=dtype, layout=layout)
    check_against_reference(q, k, v, grid=grid, kv_grid=kv_grid, variant=variant, layout=layout,
                            backend="torch", num_prefix_tokens=prefix)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("variant,grid,kv_grid,feature_map,prefix,layout", [
    ("sum", (3, 4), None, "relu", 0, "bhnd"),
    ("product", (2, 3), (1, 2), "elu1", 0, "bnhd"),
    ("none", (5,), (3,), "relu", 1, "bhnd"),
    ("sum", (2, 2, 2), (1, 2, 1), "elu1", 2, "bnhd"),
    ("product", (3, 1, 2), None, "relu", 0, "bhnd"),
    ("sum", (3, 3), (2, 2), "identity", 1, "bnhd"),
])
def test_gradcheck(backend, variant, grid, kv_grid, feature_map, prefix, layout):
    Nq, Nk = token_counts(grid, kv_grid, prefix)
    q, k, v = make_inputs(1, 2, Nq, Nk, 4, 3, layout=layout, feature_map=feature_map)

    def fn(q, k, v):
        return vicinity_attention(q, k, v, grid, kv_grid, variant=variant, feature_map=feature_map,
                                  layout=layout, backend=backend, num_prefix_tokens=prefix)
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_partial_requires_grad():
    q, k, v = make_inputs(1, 2, 12, 12, 4, 4)
    k.requires_grad_(False)
    out = vicinity_attention(q, k, v, (3, 4), backend="torch")
    dq, dv = torch.autograd.grad(out.sum(), (q, v))
    ref = vicinity_attention(q, k, v, (3, 4), backend="reference")
    rdq, rdv = torch.autograd.grad(ref.sum(), (q, v))
    torch.testing.assert_close(dq, rdq)
    torch.testing.assert_close(dv, rdv)


def test_output_follows_layout_and_dtype():
    q, k, v = make_inputs(2, 3, 12, 12, 4, 5, dtype=torch.float32, layout="bnhd", requires_grad=False)
    out = vicinity_attention(q, k, v, (3, 4), layout="bnhd", backend="torch")
    assert out.shape == (2, 12, 3, 5) and out.dtype == torch.float32 and out.is_contiguous()


def test_deterministic():
    q, k, v = make_inputs(2, 2, 35, 35, 8, 8, dtype=torch.float32)
    do = torch.randn(2, 2, 35, 8)
    runs = []
    for _ in range(2):
        out = vicinity_attention(q, k, v, (5, 7), backend="torch")
        runs.append([out, *torch.autograd.grad(out, (q, k, v), do)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_large_fp16_magnitudes_do_not_overflow():
    # With positive k and v every term of S has one sign: S reaches ~1e6, far past fp16's 65504,
    # which only wider states survive.
    q, k, v = make_inputs(1, 1, 4096, 4096, 16, 16, dtype=torch.float16, requires_grad=False)
    q, k = (q.float().abs() * 8).half(), (k.float().abs() * 8).half()
    v = (v.float().abs() * 100).half()
    out = vicinity_attention(q, k, v, (64, 64), backend="torch")
    pk = torch.relu(k.float())[0, 0]
    assert (pk.T @ v.float()[0, 0]).max() > 65504  # the unweighted state alone would overflow fp16
    assert torch.isfinite(out).all()
    ref = vicinity_attention(q.double(), k.double(), v.double(), (64, 64), backend="reference")
    # Not the 2x-plain rule: the plain fp16 reference overflows to inf here. Measured 3.8e-4 (half
    # an fp16 step of the ~80-sized outputs); the "none" variant instead of "sum" would be 8.8e-3.
    assert rel_err(out, ref) < 2e-3


def _chunk_bytes_for(heads_per_chunk, Nq, Nk, D, Dv, dtype):
    return heads_per_chunk * max(Nq, Nk) * max(D, Dv) * torch.empty((), dtype=dtype).element_size()


# (B, H, heads per chunk): one head per chunk, uneven head ranges (3 = 2 + 1), whole batch
# entries two at a time with an uneven tail (B = 3 -> 2 + 1).
@pytest.mark.parametrize("B,H,per_chunk", [(2, 3, 1), (2, 3, 2), (3, 2, 4)])
@pytest.mark.parametrize("layout,prefix,dtype", [("bhnd", 0, torch.float64), ("bnhd", 2, torch.float64),
                                                 ("bnhd", 0, torch.bfloat16)])
def test_chunked_over_heads_matches_reference(monkeypatch, B, H, per_chunk, layout, prefix, dtype):
    """Forward and backward split into (batch, head) chunks (CHUNK_BYTES made small) stay exact."""
    from vicinity_attn.vicinity import torch_backend
    grid, kv_grid = (6, 5), (3, 4)
    Nq, Nk = token_counts(grid, kv_grid, prefix)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    monkeypatch.setattr(torch_backend, "CHUNK_BYTES", _chunk_bytes_for(per_chunk, Nq, Nk, 8, 5, compute))
    q, k, v = make_inputs(B, H, Nq, Nk, 8, 5, dtype=dtype, layout=layout)
    check_against_reference(q, k, v, grid=grid, kv_grid=kv_grid, layout=layout, backend="torch",
                            num_prefix_tokens=prefix)


def test_head_chunks_cover_every_slice_once():
    from vicinity_attn.vicinity.torch_backend import _head_chunks
    for B, H, per_chunk in [(1, 1, 1), (2, 3, 1), (2, 3, 2), (3, 2, 4), (5, 4, 100), (4, 8, 3)]:
        seen = torch.zeros(B, H, dtype=torch.int64)
        for c in _head_chunks(B, H, per_chunk):
            seen[c] += 1
            assert seen[c].numel() <= max(per_chunk, 1)
        assert torch.equal(seen, torch.ones(B, H, dtype=torch.int64))


def test_chunked_partial_requires_grad(monkeypatch):
    from vicinity_attn.vicinity import torch_backend
    monkeypatch.setattr(torch_backend, "CHUNK_BYTES", 1)     # one (batch, head) slice per chunk
    q, k, v = make_inputs(2, 3, 12, 12, 4, 4)
    for frozen in (q, k, v):
        frozen.requires_grad_(False)
        wanted = [t for t in (q, k, v) if t.requires_grad]
        out = vicinity_attention(q, k, v, (3, 4), backend="torch")
        ref = vicinity_attention(q, k, v, (3, 4), backend="reference")
        for got, exp in zip(torch.autograd.grad(out.sum(), wanted), torch.autograd.grad(ref.sum(), wanted)):
            torch.testing.assert_close(got, exp)
        frozen.requires_grad_(True)
