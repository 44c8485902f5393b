"""The fused backward query pass (kernels/vicinity/queries.py): dq and the state gradients in one launch,
against the two separate passes it replaces (the dq pass, then the state pass) on the same inputs, and
the rule that picks it (``forward.fused_query_pass``). Accuracy against the float64 reference is what
the rest of the suite checks: dense one-tile heads take this pass there.

Runs in the interpreter and on a GPU run (tests.helpers.triton_device): there on sm_90 or newer only (the fused
pass exists there), without the float64 cases (refused on CUDA), and with the tolerance the GPU's arithmetic
needs (tests.helpers.fused_vs_separate_tolerance)."""
import pytest
import torch

from tests.helpers import fused_vs_separate_tolerance, rel_err, triton_device, triton_dtype

DEVICE = triton_device()
pytestmark = pytest.mark.skipif(DEVICE is None, reason="backend='triton' needs the interpreter or a CUDA device")



def _needs_the_fused_pass_here():
    """On a GPU the fused pass runs on sm_90 and newer only (elsewhere the rule sends every case to the separate
    passes, and this comparison has nothing to compare)."""
    if DEVICE == "cuda":
        from vicinity_attn.kernels.vicinity import launch_forward as forward
        arch = forward.target_arch()
        if arch is not None and arch < forward.FUSED_QUERY_MIN_ARCH:
            pytest.skip(f"the fused query pass runs on sm_{forward.FUSED_QUERY_MIN_ARCH}+ only; this GPU is sm_{arch}")

CASES = [  # D, Dv, grid, variant, prefix tokens, feature map (head dims: multiples of 16, see the rule)
    (32, 32, (7, 9), "sum", 0, "relu"),
    (16, 32, (5, 4, 3), "product", 1, "elu1"),
    (48, 48, (37,), "sum", 2, "relu"),
    (16, 16, (6, 6), "none", 0, "elu1"),
]


def _backward(fused: bool, dtype, D, Dv, grid, variant, prefix, fmap, monkeypatch):
    """(dq, dk, dv, kernels launched) of the kernels' backward, with the fused query pass or without."""
    from vicinity_attn.kernels.vicinity import Geometry, queries, state, vicinity_backward, vicinity_forward
    from vicinity_attn.kernels.vicinity import launch_backward as backward
    N = prefix + int(torch.tensor(grid).prod())
    g = torch.Generator().manual_seed(1)
    B, H = 2, 2
    q, k = (torch.randn(B, H, N, D, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    v, do = (torch.randn(B, H, N, Dv, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    o = torch.empty(B, H, N, Dv, dtype=dtype, device=DEVICE)
    geom = Geometry.build(grid, grid, variant, fmap, prefix)
    den, S, z = vicinity_forward(q, k, v, o, geom, 1e-4)
    grads = [torch.empty_like(t) for t in (q, k, v)]
    launched = []
    from vicinity_attn.kernels import runtime
    runtime.clear_plan_caches()       # the backward plan holds whether the query pass is fused
    with monkeypatch.context() as m:
        if not fused:
            m.setattr(backward, "fused_query_pass", lambda *args: False)
        for module, name in ((queries, "query_pass_kernel"), (state, "state_partial_kernel")):
            kernel = getattr(module, name)

            def run(*args, _run=kernel.run, _name=name, **kwargs):
                launched.append(_name)
                return _run(*args, **kwargs)
            m.setattr(kernel, "run", run)
        vicinity_backward(do, q, k, v, o, den, S, z, *grads, geom, 1e-4)
    runtime.clear_plan_caches()
    return (*grads, launched)


# The (dtype, case) pairs the fused pass takes: all bf16 cases; fp16 (TF32 dots) and fp64 (4-byte dot
# operands: narrower state tiles) only where one state tile holds the heads. fp32 never fuses (the rule).
FUSED = [(dtype, case) for dtype in (torch.float64, torch.bfloat16, torch.float16) for case in CASES
         if dtype == torch.bfloat16 or case[0] != 48]


@pytest.mark.parametrize("dtype,case", FUSED,
                         ids=lambda x: str(x).replace("torch.", "") if isinstance(x, torch.dtype) else
                         f"D{x[0]}-{x[1]}-{x[3]}{len(x[2])}d-p{x[4]}-{x[5]}")
def test_fused_query_pass_matches_the_separate_passes(dtype, case, monkeypatch):
    """Same helpers in the same order: dq, dk, dv are the separate passes' (fp64: bitwise; 16-bit: all
    but rare dq elements, one rounding step apart, where the dq dots take the state pass's tiles), and
    the fused launch replaced the state pass."""
    from vicinity_attn.kernels.vicinity import Geometry
    from vicinity_attn.kernels.vicinity import launch_forward as forward
    triton_dtype(dtype, DEVICE)
    _needs_the_fused_pass_here()
    D, Dv, grid, variant, prefix, fmap = case
    assert forward.fused_query_pass(D, Dv, dtype, Geometry.build(grid, grid, variant, fmap, prefix).n_feat)
    *fused, ran_fused = _backward(True, dtype, *case, monkeypatch)
    *separate, ran_separate = _backward(False, dtype, *case, monkeypatch)
    assert ran_fused == ["query_pass_kernel"] and ran_separate == ["state_partial_kernel"]
    for name, a, b in zip(("dq", "dk", "dv"), fused, separate):
        assert torch.isfinite(a).all(), name
        tol = fused_vs_separate_tolerance(dtype, DEVICE, name)
        if tol is None:
            assert torch.equal(a, b), name
        else:
            # Interpreter, measured: at most 2.7e-4 of max |dq| in 0.03 % of the elements (fp16, D16 / Dv32).
            max_rel, max_fraction = tol
            assert rel_err(a, b) <= max_rel and (a != b).float().mean().item() <= max_fraction, name


@pytest.mark.skipif(DEVICE != "cpu", reason="the rule's logic with the arch faked: checked in the interpreter run")
def test_fused_query_pass_rule(monkeypatch):
    """Head dims that are multiples of 16 and fit one state tile, not fp32, sm_90 or newer (or the
    interpreter): fused. Otherwise the separate passes (where the compile gate saw the fused program
    spill, or load its states in narrow pieces)."""
    from vicinity_attn.kernels.vicinity import launch_forward as forward
    assert forward.fused_query_pass(64, 64, torch.bfloat16, 4) and forward.fused_query_pass(32, 16, torch.bfloat16, 10)
    assert not forward.fused_query_pass(128, 64, torch.bfloat16, 4)
    assert not forward.fused_query_pass(40, 40, torch.bfloat16, 4)
    assert not forward.fused_query_pass(64, 24, torch.bfloat16, 4)
    for dtype in (torch.float16, torch.float64):   # 4-byte dot operands: smaller heads fuse
        assert forward.fused_query_pass(16, 16, dtype, 4) and not forward.fused_query_pass(64, 64, dtype, 4)
    assert not forward.fused_query_pass(16, 16, torch.float32, 4)
    monkeypatch.setattr(forward, "target_arch", lambda: 80)
    assert not forward.fused_query_pass(64, 64, torch.bfloat16, 4)
    monkeypatch.setattr(forward, "target_arch", lambda: 90)
    assert forward.fused_query_pass(64, 64, torch.bfloat16, 4)
