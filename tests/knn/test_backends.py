"""k-NN attention (knn_attention): every backend against the float64 reference (the authors' dense
formulation), forward and gradients, by the tolerance rule; ties; validation; gradcheck."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import check_knn_against_reference, make_inputs
from vicinity_attn import knn_attention
from vicinity_attn.knn import torch_backend as knn_torch
from vicinity_attn.knn.reference import reference_knn_attention

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


# (B, H, Nq, Nk, D, Dv, topk): square, Nq != Nk both ways, odd head dims, topk = 1 and topk = Nk.
SHAPES = [
    (2, 2, 24, 24, 16, 16, 7),
    (1, 3, 17, 40, 5, 3, 1),
    (2, 1, 33, 9, 33, 7, 9),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_backend_matches_reference(shape, dtype):
    B, H, Nq, Nk, D, Dv, topk = shape
    q, k, v = make_inputs(B, H, Nq, Nk, D, Dv, dtype=dtype)
    check_knn_against_reference(q, k, v, topk, "torch")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_backend_matches_reference(shape, dtype):
    """Through the Triton interpreter; rows of <= 64 keys: the selection pass holds the row on chip."""
    B, H, Nq, Nk, D, Dv, topk = shape
    q, k, v = make_inputs(B, H, Nq, Nk, D, Dv, dtype=dtype)
    check_knn_against_reference(q, k, v, topk, "triton")


@pytest.mark.parametrize("dtype, topk",
                         [(torch.float32, 1), (torch.float32, 61), (torch.float32, 130), (torch.float64, 77)])
def test_triton_selection_over_several_key_tiles(dtype, topk):
    """Rows of 130 keys span three key tiles: the selection pass recomputes scores per bisection step."""
    q, k, v = make_inputs(1, 1, 16, 130, 8, 8, dtype=dtype)
    check_knn_against_reference(q, k, v, topk, "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_head_dims_and_layout(backend):
    """Head dims 256 (the largest the kernels take) / 100, layout "bnhd", scale given."""
    q, k, v = make_inputs(1, 2, 9, 12, 256, 100, dtype=torch.float32, layout="bnhd")
    check_knn_against_reference(q, k, v, 5, backend, layout="bnhd", scale=0.11)


def test_torch_backend_several_row_blocks(monkeypatch):
    """More query rows than one block holds: blocks of 3 rows, forward and backward."""
    monkeypatch.setattr(knn_torch, "BLOCK_ELEMENTS", 2 * 2 * 3 * 30)
    assert len(knn_torch.row_blocks(4, 25, 30)) == 9
    q, k, v = make_inputs(2, 2, 25, 30, 8, 6, dtype=torch.float64)
    check_knn_against_reference(q, k, v, 11, "torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_equal_nk_is_softmax_attention(backend):
    q, k, v = make_inputs(1, 2, 10, 13, 8, 8, dtype=torch.float64, requires_grad=False)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(knn_attention(q, k, v, 13, backend=backend), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_keep_every_tied_key(backend):
    """Exact ties at the threshold: all tied keys are kept (documented; the reference keeps topk)."""
    q = torch.ones(1, 1, 2, 4, dtype=torch.float64)
    k = torch.tensor([[3.0], [1.0], [1.0], [0.0]], dtype=torch.float64).expand(4, 4).reshape(1, 1, 4, 4)
    v = torch.eye(4, dtype=torch.float64).reshape(1, 1, 4, 4)
    out = knn_attention(q, k, v, 2, scale=1.0, backend=backend)[0, 0, 0]
    s = torch.tensor([12.0, 4.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(out[:3], torch.softmax(s, 0), rtol=0, atol=1e-12)
    assert out[3] == 0
    ref = reference_knn_attention(q, k, v, 2, 1.0)[0, 0, 0]
    assert (ref > 0).sum() == 2


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_gradcheck(backend):
    q, k, v = make_inputs(1, 2, 6, 9, 4, 3, dtype=torch.float64)
    fn = lambda q, k, v: knn_attention(q, k, v, 4, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_gradients(backend):
    """Only some inputs need gradients: the others are skipped, the asked ones are right."""
    q, k, v = make_inputs(1, 2, 7, 11, 8, 5, dtype=torch.float64)
    k.requires_grad_(False)
    ref = knn_attention(q, k, v, 4, backend="reference")
    out = knn_attention(q, k, v, 4, backend=backend)
    do = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, (q, v), do), torch.autograd.grad(ref, (q, v), do)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_deterministic(backend):
    q, k, v = make_inputs(1, 2, 20, 20, 8, 8, dtype=torch.float32)
    runs = []
    for _ in range(2):
        out = knn_attention(q, k, v, 6, backend=backend)
        runs.append([out, *torch.autograd.grad(out.sum(), (q, k, v))])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_empty_batch():
    q, k, v = make_inputs(0, 2, 5, 6, 4, 4, dtype=torch.float32)
    out = knn_attention(q, k, v, 3)
    assert out.shape == (0, 2, 5, 4)
    out.sum().backward()
    assert q.grad.shape == q.shape


@pytest.mark.parametrize("kwargs, match", [
    (dict(topk=0), "topk"),
    (dict(topk=7), "topk"),
    (dict(topk=2.0), "topk"),
    (dict(topk=True), "topk"),
    (dict(scale=float("nan")), "scale"),
    (dict(scale="x"), "scale"),
    (dict(layout="nhd"), "layout"),
    (dict(backend="cuda"), "backend"),
])
def test_validation_names_the_argument(kwargs, match):
    q, k, v = make_inputs(1, 2, 5, 6, 4, 4, dtype=torch.float32, requires_grad=False)
    kw = dict(topk=3) | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        knn_attention(q, k, v, kw.pop("topk"), **kw)


@pytest.mark.parametrize("tensors, match", [
    (lambda q, k, v: (q, k[..., :3], v), "head dim"),
    (lambda q, k, v: (q, k, v[:, :, :4]), "tokens"),
    (lambda q, k, v: (q, k.double(), v), "dtype"),
    (lambda q, k, v: (q[0], k, v), "q must be 4-d"),
    (lambda q, k, v: (q, k, v.int()), "v must be a floating"),
    (lambda q, k, v: (q, k[:, :1], v), "batch and head"),
])
def test_validation_of_tensors(tensors, match):
    q, k, v = make_inputs(1, 2, 5, 6, 4, 4, dtype=torch.float32, requires_grad=False)
    with pytest.raises((ValueError, TypeError), match=match):
        knn_attention(*tensors(q, k, v), 3)


def test_triton_head_dim_limit():
    q, k, v = make_inputs(1, 1, 4, 4, 257, 4, dtype=torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="head dims up to 256"):
        knn_attention(q, k, v, 2, backend="triton")


def test_gpu_configs_compute_every_score_with_one_instruction():
    """The mask s >= tau is exact only if every pass computes a score as the selection pass did. A GPU
    config may give the dk / dv pass other warps than the rest only where no dot can use Hopper's
    warpgroup MMA (its M, BLOCK_M or BLOCK_N, below 64): every pass then issues the same mma.sync
    instruction whatever the warps (configs.py); at 64 rows the warp count could change the wgmma form."""
    from vicinity_attn.kernels.knn import configs

    for dtype, cfg in configs.gpu_configs():
        assert cfg.dkdv_num_warps == cfg.num_warps or max(cfg.block_m, cfg.block_n) < 64, (dtype, cfg)


def test_triton_head_dim_chunks(monkeypatch):
    """The GPU configs split the row dots (q.k, dO.v) into head-dim chunks; the interpreter's config
    does not. Force 16-wide chunks: D = 40 is three chunks (the last one partly padding), Dv = 20 two."""
    import dataclasses

    from vicinity_attn.kernels.knn import configs, launch

    def chunked(d, dv, n_keys, dtype):
        return dataclasses.replace(configs.pick_config(d, dv, n_keys, dtype), chunk=16)

    monkeypatch.setattr(launch, "pick_config", chunked)
    assert chunked(40, 20, 30, torch.float32).chunks() == dict(BLOCK_K=16, N_K=4, BLOCK_KV=16, N_KV=2)
    q, k, v = make_inputs(1, 2, 20, 30, 40, 20, dtype=torch.float32)
    check_knn_against_reference(q, k, v, 9, "triton")


@pytest.mark.parametrize("d, dv, n_keys, config_dtype, tiles", [
    (40, 40, 70, torch.float16, (64, 32, 64)),      # a ragged 64-wide head: 32 keys a tile (three, one partial)
    (256, 200, 30, torch.bfloat16, (16, 16, 256)),  # 256-wide heads: one chunk, the whole (padded) head
    (256, 256, 30, torch.float32, (16, 16, 32)),    # fp32 at 256: the dk / dv pass's own warps (8)
])
def test_triton_gpu_configs_run_in_the_interpreter(monkeypatch, d, dv, n_keys, config_dtype, tiles):
    """The kernels with the config a GPU launch of ``config_dtype`` picks (its tiles and head-dim chunks;
    warps do not reach the interpreter) on fp32 inputs, against the reference."""
    from vicinity_attn.kernels.knn import configs, launch

    cfg = configs.gpu_config(d, dv, config_dtype)
    assert (cfg.block_m, cfg.block_n, cfg.chunk) == tiles, cfg
    monkeypatch.setattr(launch, "pick_config", lambda *args: cfg)
    launch.knn_plan.cache_clear()
    try:
        q, k, v = make_inputs(1, 2, 20, n_keys, d, dv, dtype=torch.float32)
        check_knn_against_reference(q, k, v, 9, "triton")
    finally:
        launch.knn_plan.cache_clear()     # no plan of the forced config outlives the test
