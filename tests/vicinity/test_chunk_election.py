"""The state passes' chunk reduction, folded into the state pass by a last-program election
(kernels/vicinity/state.py ``finish_states``): the states of several chunks against a float64 sum, bitwise
the same run to run, the election counters left at zero (a later call, with more groups, still right), and
the chunk plan following the device's SM count. The interpreter runs a state pass with 2 token blocks of
16 per chunk, so 100 tokens make 4 chunks."""
import pytest
import torch

from tests.helpers import triton_device
from vicinity_attn import position_features

DEVICE = triton_device()
pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's chunk plan (several chunks at 100 tokens)")

GRID = (10, 10)


def _inputs(B, H, N, D, Dv, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, N, D, generator=g, dtype=torch.float64),
            torch.randn(B, H, N, Dv, generator=g, dtype=torch.float64))


def _reference(k, v, scale):
    """scale * sum_j P_m(j) relu(k_j) v_j^T and scale * sum_j P_m(j) relu(k_j), in float64."""
    P = position_features(GRID, "sum", side="key", dtype=torch.float64)           # [N, F]
    phi = k.clamp_min(0)
    B, H = k.shape[:2]
    S = scale * torch.einsum("nm,bhnd,bhne->bhmde", P, phi, v).reshape(B * H, P.shape[1], k.shape[-1], v.shape[-1])
    z = scale * torch.einsum("nm,bhnd->bhmd", P, phi).reshape(B * H, P.shape[1], k.shape[-1])
    return S, z


def _states(k, v):
    from vicinity_attn.kernels.vicinity import Geometry
    from vicinity_attn.kernels.vicinity.launch_forward import forward_states
    return forward_states(k, v, Geometry.build(GRID, GRID, "sum", "relu", 0))


def test_elected_reduction_sums_every_chunk_bitwise_reproducibly():
    from vicinity_attn.kernels.vicinity.configs import pow2_scale, state_tiles
    from vicinity_attn.kernels.vicinity.launch_forward import state_plan
    k, v = _inputs(2, 2, 100, 24, 72, seed=0)
    S, z = _states(k, v)
    want_S, want_z = _reference(k, v, pow2_scale(100))
    torch.testing.assert_close(S, want_S, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z, want_z, rtol=1e-12, atol=1e-12)
    S2, z2 = _states(k, v)
    assert torch.equal(S, S2) and torch.equal(z, z2)
    # What the test relies on: several chunks, and two Dv tiles (two groups per head; z from the first).
    from vicinity_attn.kernels.vicinity import Geometry
    geom = Geometry.build(GRID, GRID, "sum", "relu", 0)
    tiles = state_tiles(geom.n_feat, 24, 72, torch.float64, "fwd_state")
    plan = state_plan(geom, False, "fwd_state", torch.float64, 24, 72, 100, 4, False, False, 132)
    assert plan.chunks.n_chunks == 4 and plan.n_tiles == 2 and tiles.block_n == 16


def test_counters_are_rearmed_and_a_later_call_is_right():
    from vicinity_attn.kernels import runtime
    from vicinity_attn.kernels.vicinity.configs import pow2_scale
    k, v = _inputs(1, 2, 100, 8, 8, seed=1)
    _states(k, v)
    counters = runtime.election_counters(torch.device("cpu"), 1)
    assert not counters.any()
    # More groups (B * H = 12) and other data on the same counters: every group elects its own last program.
    k, v = _inputs(3, 4, 100, 8, 8, seed=2)
    S, z = _states(k, v)
    want_S, want_z = _reference(k, v, pow2_scale(100))
    torch.testing.assert_close(S, want_S, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z, want_z, rtol=1e-12, atol=1e-12)
    assert not runtime.election_counters(torch.device("cpu"), 1).any()


def test_chunk_plan_follows_the_sm_count(monkeypatch):
    """On a GPU the plan fills one wave of the device's SMs (at least 8 token blocks per chunk); the
    interpreter and CPU tensors plan for DEFAULT_SM_COUNT."""
    from vicinity_attn.kernels import runtime
    from vicinity_attn.kernels.vicinity import configs
    assert runtime.sm_count(torch.device("cpu")) == runtime.DEFAULT_SM_COUNT == 132
    runtime.clear_plan_caches()
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    try:
        for sms, programs, n_chunks in ((132, 4, 33), (108, 4, 27), (132, 200, 1), (78, 4, 19)):
            plan = configs.chunk_plan(64 * 4096, 64, programs, sms)
            assert plan.n_chunks == n_chunks and plan.n_chunks * programs <= max(sms, programs)
            assert plan.n_chunks * plan.blocks_per_chunk >= 4096 > (plan.n_chunks - 1) * plan.blocks_per_chunk
    finally:
        monkeypatch.undo()
        runtime.clear_plan_caches()


def test_fused_query_pass_elects_bitwise_reproducibly(monkeypatch):
    """The fused query pass (dq and dS, dz in one launch) over 4 chunks: gradients against the float64
    reference, bitwise the same on a second run."""
    from tests.helpers import count_launches, make_inputs, outputs_and_grads
    from vicinity_attn.kernels.vicinity import launch_forward as forward
    launches = count_launches(monkeypatch, [(forward, "query_pass_kernel")])
    q, k, v = make_inputs(1, 2, 100, 100, 16, 16, dtype=torch.float64)
    do = torch.randn(1, 2, 100, 16, dtype=torch.float64)
    first = outputs_and_grads(q, k, v, do, backend="triton", grid=GRID)
    assert launches["query_pass_kernel"] == 1
    second = outputs_and_grads(q, k, v, do, backend="triton", grid=GRID)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    ref = outputs_and_grads(q, k, v, do, backend="reference", grid=GRID)
    for got, want in zip(first, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
