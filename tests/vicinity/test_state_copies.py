"""Copies of the states in a per-token pass's dot operand dtype (``compute_states``' s_copy): the forward's
S for the output pass and the backward's dS for the key pass, made on a GPU for bf16 inputs."""
import pytest
import torch

from tests.helpers import make_inputs, pack, rel_err
from vicinity_attn import vicinity_attention, vicinity_attention_varlen
from vicinity_attn.kernels import runtime

pytestmark = pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="CPU tensors with backend='triton' need the interpreter")


def test_state_operand_dtype_is_the_dot_operand(monkeypatch):
    """On a GPU, bf16 inputs get bf16 copies of S (output pass) and dS (key pass), what their bf16 dots
    take; TF32 dots (fp16, fp32 inputs) and fp64 read the fp32 / fp64 states, and so does the
    interpreter's emulated dot (fp32 operands, rounded in the dot)."""
    from vicinity_attn.kernels.vicinity.configs import state_operand_dtype
    for launch in ("fwd_output", "bwd_keys"):
        assert state_operand_dtype(launch, torch.bfloat16) is None
    monkeypatch.setattr(runtime, "_INTERPRET", False)
    for launch in ("fwd_output", "bwd_keys"):
        assert state_operand_dtype(launch, torch.bfloat16) == torch.bfloat16
        for dtype in (torch.float16, torch.float32, torch.float64):
            assert state_operand_dtype(launch, dtype) is None


def test_saved_state_dtype(monkeypatch):
    """The forward saves S in bf16 exactly where it makes the output pass's copy (bf16 on a GPU, 64-wide
    head tiles, no clamp), and the op's fake says so: the dq dots of the backward take bf16 operands."""
    from vicinity_attn.kernels.vicinity.launch_forward import operand_copy
    from vicinity_attn.vicinity.triton_backend import saved_state_dtype
    q = torch.empty(1, 1, 4, 64, dtype=torch.bfloat16, device="meta")
    assert saved_state_dtype(q, q, None) == torch.float32      # the interpreter: no copies
    monkeypatch.setattr(runtime, "_INTERPRET", False)
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        for D in (16, 40, 64, 128):
            for clamp in (None, (1e-4, 1e4)):
                x = torch.empty(1, 1, 4, D, dtype=dtype, device="meta")
                copy = operand_copy("fwd_output", dtype, (1, 4, D, D), torch.device("meta"), clamp)
                want = torch.float64 if dtype == torch.float64 else torch.float32 if copy is None else copy.dtype
                assert saved_state_dtype(x, x, clamp) == want, (dtype, D, clamp)
    assert saved_state_dtype(q, q, None) == torch.bfloat16


def _rounded_once(x: torch.Tensor, copy: torch.Tensor) -> bool:
    """copy is x cast to bf16, by truncation (the interpreter's cast) or to nearest (a GPU's, and the dot's)."""
    truncated = (x.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    return torch.equal(copy, truncated) or torch.equal(copy, x.to(torch.bfloat16))


@pytest.mark.parametrize("grid", [(3, 4), (9, 11)])   # one state chunk (no reduction), several chunks
def test_state_copies_are_the_states_rounded_once(grid):
    """The forward's S and the backward's dS copies (``s_copy``, written by the partial kernel for one
    chunk, by the reduction for several) are the fp32 states rounded to bf16 once, and writing them
    changes nothing else."""
    from vicinity_attn.kernels.vicinity import Geometry, backward_queries, forward_states
    geom = Geometry.build(grid, grid, "sum", "relu", 1)
    n = 1 + grid[0] * grid[1]
    q, k, v = make_inputs(2, 2, n, n, 24, 20, dtype=torch.float32)
    S, z = forward_states(k, v, geom)
    S_copy = torch.empty(S.shape, dtype=torch.bfloat16)
    S2, z2 = forward_states(k, v, geom, s_copy=S_copy)
    assert torch.equal(S2, S) and torch.equal(z2, z) and _rounded_once(S, S_copy)
    assert not torch.equal(S_copy.float(), S)          # rounded: fresh random inputs leave low bits set

    from vicinity_attn.kernels.vicinity import forward_output
    o = torch.empty(2, 2, n, 20)
    den = forward_output(q, S, z, o, geom, 1e-4, 0.0, None, n_keys=n)
    do = torch.randn_like(o)
    args = (do, q, o, den, S, z, None, geom, 1e-4, 0.0, None, n, n)
    dS, dz = backward_queries(*args)
    dS_copy = torch.empty(dS.shape, dtype=torch.bfloat16)
    dS2, dz2 = backward_queries(*args, ds_copy=dS_copy)
    assert torch.equal(dS2, dS) and torch.equal(dz2, dz) and _rounded_once(dS, dS_copy)


@pytest.mark.parametrize("packed", [False, True])
def test_bf16_inputs_read_the_copies(monkeypatch, request, packed):
    """bf16 inputs as on a GPU (the copies forced on under the interpreter, whose emulated dots take fp32
    operands; head dims on 64-wide tiles, the only ones that get copies): the output pass reads S's copy
    and the key pass dS's, the backward gets S's copy (saved for it), and o, dq, dk, dv are those of the
    fp32 states up to the copies' rounding (the interpreter's cast truncates where a GPU's rounds to
    nearest as the dot does: close, not bitwise)."""
    from vicinity_attn.kernels.vicinity import launch_backward as backward
    from vicinity_attn.kernels.vicinity import launch_forward as forward
    seen = []

    def forced(launch, dtype):
        return torch.bfloat16

    def recording(module, name, arg):
        original = getattr(module, name)

        def record(*args, **kwargs):
            seen.append((name, args[arg].dtype))
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, record)

    def run():
        if packed:
            grids = [(3, 4), (5, 6)]
            q, k, v, cu_q, cu_k = pack(grids, prefix=1, D=40, Dv=40, dtype=torch.bfloat16)
            out = vicinity_attention_varlen(q, k, v, cu_q, cu_k, grids, backend="triton", num_prefix_tokens=1)
        else:
            q, k, v = make_inputs(2, 2, 61, 61, 40, 40, dtype=torch.bfloat16)
            out = vicinity_attention(q, k, v, (6, 10), backend="triton", num_prefix_tokens=1)
        return [out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))]

    torch.manual_seed(0)
    plain = run()
    monkeypatch.setattr(forward, "state_operand_dtype", forced)   # operand_copy, both directions
    runtime.clear_plan_caches()                   # plans made before the patch (the backward plan's dS copy)
    request.addfinalizer(runtime.clear_plan_caches)               # and none made with it outlive the test
    recording(forward, "output_pass", 1)
    recording(backward, "_key_pass", 2)
    # The backward's S is the forward's copy (saved_state_dtype): the dq dots' operand.
    recording(backward, "_dq_pass", 2) if packed else recording(backward, "backward_queries", 4)
    torch.manual_seed(0)
    copies = run()
    assert ("output_pass", torch.bfloat16) in seen and ("_key_pass", torch.bfloat16) in seen
    assert (("_dq_pass", torch.bfloat16) if packed else ("backward_queries", torch.bfloat16)) in seen
    for name, got, want in zip(("out", "dq", "dk", "dv"), copies, plain):
        assert 0 < rel_err(got, want) <= 2e-2, name
