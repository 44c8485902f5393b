"""The backward's key pass (kernels/vicinity/keys.py): one launch computes dk and dv, and a backward that
wants only one of them launches it for that one (against the float64 reference)."""
import pytest
import torch

from tests.helpers import count_launches, make_inputs, token_counts
from vicinity_attn import vicinity_attention

pytestmark = pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="CPU tensors with backend='triton' need the interpreter")


@pytest.mark.parametrize("wanted,D,Dv", [("qkv", 8, 6), ("k", 72, 24), ("v", 24, 72)])
def test_backward_launches_one_key_pass(monkeypatch, wanted, D, Dv):
    """Dense call, one 16-token block (under the interpreter: one state chunk). dk only
    and dv only at head dims of two 64-wide tiles on the side they contract over (the tile loop)."""
    from vicinity_attn.kernels.vicinity import launch_backward as backward
    from vicinity_attn.kernels.vicinity import launch_forward as forward
    launches = count_launches(monkeypatch, [(forward, name) for name in ("state_partial_kernel", "output_pass_kernel")]
                              + [(backward, name) for name in ("dq_pass_kernel", "row_weights_kernel",
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
    expected["dq_pass_kernel" if "q" in wanted else "row_weights_kernel"] = 1
    assert launches == expected
    for got, want in zip(grads, torch.autograd.grad(ref, inputs, do), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
