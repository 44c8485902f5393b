"""The backward's key pass (kernels/vicinity/keys.py): one launch computes dk and dv, and a backward that
wants only one of them launches it for that one (against the float64 reference)."""
import pytest
import torch

from helpers import count_launches, make_inputs, token_counts
from vicinity_attn import vicinity_attention

pytestmark = pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="CPU tensors with backend='triton' need the interpreter")


@pytest.mark.parametrize("wanted,D,Dv", [("qkv", 8, 6), ("k", 72, 24), ("v", 24, 72)])
def test_backward_launches_one_key_pass(monkeypatch, wanted, D, Dv):
    """Dense call, one 16-token block (under the interpreter: one state chunk, no reductions). dk only
    and dv only at head dims of two 64-wide tiles on the side they contract over (the tile loop)."""
    from vicinity_attn.kernels.vicinity import backward, forward
    launches = count_launches(monkeypatch, [(forward, name) for name in ("state_partial_kernel", "chunk_reduce_kernel",
                                                                         "contract_d_kernel")]
                              + [(backward, name) for name in ("contract_dv_kernel", "row_weights_kernel",
                                                               "key_pass_kernel")])
    grid, kv_grid = (3, 3), (3, 4)
    nq, nk = token_counts(grid, kv_grid, 1)
    q, k, v = make_inputs(1, 1, nq, nk, D, Dv)
    for name, t in zip("qkv", (q, k, v)):
        t.requires_grad_(name in wanted)
    inputs = [t for t in (q, k, v) if t.requires_grad]
    kw = dict(grid=grid, kv_grid=kv_grid, num_prefix_tokens=1, variant="product")
    out = vicinity_attention(q, k, v, backend="triton", **kw)
    ref = vicinity_attention(q, k, v, backend="reference", **kw)
    do = torch.randn_like(ref)
    launches.clear()
    grads = torch.autograd.grad(out, inputs, do)
    # dq with the row weights (without dq: the row weights alone), the state-gradient pass, then dk and
    # dv in one key pass.
    expected = dict(state_partial_kernel=1, key_pass_kernel=1)
    expected["contract_dv_kernel" if "q" in wanted else "row_weights_kernel"] = 1
    assert launches == expected
    for got, want in zip(grads, torch.autograd.grad(ref, inputs, do), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_key_states_dtype_is_the_key_pass_dot_operand(monkeypatch):
    """On a GPU, bf16 inputs get dS in bf16 (what the key pass's bf16 dots take); TF32 dots (fp16, fp32
    inputs) and fp64 keep the accumulation dtype, and so does the interpreter's emulated dot."""
    from vicinity_attn.kernels.vicinity.backward import key_states_dtype
    assert key_states_dtype(torch.bfloat16) is None   # the interpreter: fp32 operands, rounded in the dot
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert key_states_dtype(torch.bfloat16) == torch.bfloat16
    for dtype in (torch.float16, torch.float32, torch.float64):
        assert key_states_dtype(dtype) is None


@pytest.mark.parametrize("grid", [(3, 4), (9, 11)])   # one state chunk (no reduction), several chunks
def test_state_gradients_written_in_a_narrower_dtype(grid):
    """backward_queries with states_dtype writes dS rounded once from the accumulated fp32 values (by
    the store's cast, in the partial kernel for one chunk, in the reduction for several): bitwise the
    fp32 dS cast to bf16. The interpreter's cast truncates; a GPU's rounds to nearest, which is what
    the key pass's dot does to an fp32 dS operand. dz stays in fp32, unchanged."""
    from vicinity_attn.kernels.vicinity import Geometry, backward_queries, vicinity_forward
    geom = Geometry.build(grid, grid, "sum", "relu", 1)
    n = 1 + grid[0] * grid[1]
    q, k, v = make_inputs(2, 2, n, n, 24, 20, dtype=torch.float32)
    o = torch.empty_like(q[..., :20])
    den, S, z = vicinity_forward(q, k, v, o, geom, 1e-4)
    do = torch.randn_like(o)
    args = (do, q, o, den, S, z, None, geom, 1e-4, 0.0, None, n, n)
    dS, dz = backward_queries(*args)
    dS16, dz16 = backward_queries(*args, states_dtype=torch.bfloat16)
    assert dS.dtype == torch.float32 and dS16.dtype == torch.bfloat16 and dz16.dtype == torch.float32
    truncated = (dS.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    assert torch.equal(dS16, truncated) or torch.equal(dS16, dS.to(torch.bfloat16))
    assert not torch.equal(dS16.float(), dS)          # rounded: fresh random inputs leave low bits set
    assert torch.equal(dz16, dz)
