"""The resident output and key passes (kernels/vicinity/output.py, keys.py): persistent programs, each walking
several token blocks of its head with the state tiles loaded once, against the float64 reference, and bitwise
what one program per token block gives."""
import pytest
import torch

from tests.helpers import pack, rel_err
from vicinity_attn import vicinity_attention, vicinity_attention_varlen

pytestmark = pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="CPU tensors with backend='triton' need the interpreter")


def _recording_grids(monkeypatch):
    """Records the grid and RESIDENT flag of every output / key pass launch."""
    from vicinity_attn.kernels.vicinity import launch_backward as backward
    from vicinity_attn.kernels.vicinity import launch_forward as forward
    seen = []
    for module, name in ((forward, "launch_kernel"), (backward, "launch_kernel")):
        def launch(kernel, grid, *args, _inner=getattr(module, name), **kwargs):
            if kernel.__name__ in ("output_pass_kernel", "key_pass_kernel"):
                seen.append((kernel.__name__, tuple(grid), kwargs.get("RESIDENT")))
            return _inner(kernel, grid, *args, **kwargs)
        monkeypatch.setattr(module, name, launch)
    return seen


def _outputs_and_grads(fn, inputs, do):
    out = fn(*inputs)
    return [out, *torch.autograd.grad(out, inputs, do)]


@pytest.mark.parametrize("programs,D,Dv,variant,prefix,clamp,grid,kv_grid", [
    # resident output and key passes: 71 queries in 5 blocks of 16, 55 keys in 4, over 2 programs a head
    (2, 24, 20, "product", 1, None, (7, 10), (6, 9)),
    # one program walks all 3 blocks; two Dv tiles (the key pass streams); the clamp, whose backward's
    # numerator pass (no den) is resident too
    (1, 16, 80, "sum", 0, (1e-3, 5.0), (5, 7), (4, 6)),
])
def test_programs_walk_several_token_blocks(monkeypatch, programs, D, Dv, variant, prefix, clamp, grid, kv_grid):
    from vicinity_attn.kernels.vicinity import configs
    seen = _recording_grids(monkeypatch)
    inputs = [torch.randn(1, 2, g[0] * g[1] + prefix, d, dtype=torch.float64, requires_grad=True)
              for g, d in ((grid, D), (kv_grid, D), (kv_grid, Dv))]
    kw = dict(grid=grid, kv_grid=kv_grid, variant=variant, num_prefix_tokens=prefix, clamp=clamp)
    do = torch.randn(1, 2, inputs[0].shape[2], Dv, dtype=torch.float64)
    monkeypatch.setattr(configs, "PROGRAMS_PER_HEAD", programs)
    got = _outputs_and_grads(lambda q, k, v: vicinity_attention(q, k, v, backend="triton", **kw), inputs, do)
    assert {(name, g[0], resident) for name, g, resident in seen} >= {("output_pass_kernel", programs, True)}
    if Dv <= 64:
        assert ("key_pass_kernel", programs, True) in {(name, g[0], resident) for name, g, resident in seen}
    want = _outputs_and_grads(lambda q, k, v: vicinity_attention(q, k, v, backend="reference", **kw), inputs, do)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(g, w) <= 1e-11, f"{name}: {rel_err(g, w):.3e}"
    # One program per token block (the device's count here): bitwise the same.
    monkeypatch.setattr(configs, "PROGRAMS_PER_HEAD", None)
    again = _outputs_and_grads(lambda q, k, v: vicinity_attention(q, k, v, backend="triton", **kw), inputs, do)
    for name, g, a in zip(("out", "dq", "dk", "dv"), got, again):
        assert torch.equal(g, a), name


def test_packed_programs_walk_their_own_sequence(monkeypatch):
    """Packed sequences of 1 to 3 token blocks over 2 programs a head: a program walks its own sequence's
    blocks (the short sequence's second program has none)."""
    from vicinity_attn.kernels.vicinity import configs
    monkeypatch.setattr(configs, "PROGRAMS_PER_HEAD", 2)
    grids, kv_grids = [(5, 9), (2, 3), (6, 6)], [(4, 9), (3, 3), (2, 7)]
    q, k, v, cu_q, cu_k = pack(grids, kv_grids, 2, H=2, D=12, Dv=10)
    do = torch.randn(q.shape[0], 2, 10, dtype=torch.float64)
    kw = dict(num_prefix_tokens=2, feature_map="elu1", den_floor=0.5)
    got = _outputs_and_grads(lambda a, b, c: vicinity_attention_varlen(a, b, c, cu_q, cu_k, grids, kv_grids,
                                                                       backend="triton", **kw), (q, k, v), do)
    want = _outputs_and_grads(lambda a, b, c: vicinity_attention_varlen(a, b, c, cu_q, cu_k, grids, kv_grids,
                                                                        backend="reference", **kw), (q, k, v), do)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(g, w) <= 1e-11, f"{name}: {rel_err(g, w):.3e}"


def test_programs_per_head_fill_one_wave():
    """One wave of the CTAs an SM holds (two of 4 warps, one of 8; 132 SMs where no GPU is asked) over
    all rows, rounded down, at least one and at most one per token block."""
    from vicinity_attn.kernels.vicinity.configs import resident_programs
    cpu = torch.device("cpu")
    assert resident_programs(784, 4, cpu, 4) == 66       # 224 x 224 tokens in 64-token blocks, 4 heads
    assert resident_programs(784, 4, cpu, 8) == 33       # one CTA of 8 warps an SM
    assert resident_programs(49, 32, cpu, 4) == 8        # 56 x 56, 32 heads: 256 programs, not 288 (two waves)
    assert resident_programs(49, 32, cpu, 8) == 4
    assert resident_programs(3, 4, cpu, 4) == 3 and resident_programs(784, 1000, cpu, 4) == 1
