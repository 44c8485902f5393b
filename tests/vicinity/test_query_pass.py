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


def _backward(fused: bool, dtype, D, Dv, grid, variant, prefix, fmap, monkeypatch, resident: int | None = None):
    """(dq, dk, dv, kernels launched) of the kernels' backward, with the fused query pass or without
    (fused: ``resident`` features' state tiles kept on chip, 0 the streaming form; None: as planned)."""
    from vicinity_attn.kernels import runtime
    from vicinity_attn.kernels.vicinity import Geometry, queries, state, vicinity_backward, vicinity_forward
    from vicinity_attn.kernels.vicinity import launch_backward as backward
    from vicinity_attn.kernels.vicinity import launch_forward as forward
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
    # The backward and state plans are cached: none made under a patch may serve another call.
    runtime.clear_plan_caches()
    with monkeypatch.context() as m:
        if not fused:
            m.setattr(backward, "fused_query_pass", lambda *args: False)
        if resident is not None:
            m.setattr(forward, "resident_query_features", lambda *args: resident)
        for module, name in ((queries, "query_pass_kernel"), (state, "state_partial_kernel")):
            kernel = getattr(module, name)

            def run(*args, _run=kernel.run, _name=name, **kwargs):
                launched.append(f"{_name} resident={kwargs['RESIDENT']}" if kwargs.get("RESIDENT") else _name)
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
    n_feat = Geometry.build(grid, grid, variant, fmap, prefix).n_feat
    assert ran_fused == [f"query_pass_kernel resident={n_feat}"] and ran_separate == ["state_partial_kernel"]
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


@pytest.mark.parametrize("dtype,resident", [(torch.bfloat16, 2), (torch.float16, 4)], ids=["bf16-2of4", "fp16-4of4"])
def test_resident_form_is_bitwise_the_streaming_form(dtype, resident, monkeypatch):
    """The resident form (the state tiles of the first ``resident`` of F = 4 features loaded once per
    program and kept across the token loop, the others streamed) gives bitwise the streaming form's dq,
    dk, dv: the same helpers in the same order, on the same tiles."""
    triton_dtype(dtype, DEVICE)
    _needs_the_fused_pass_here()
    case = CASES[0]   # F = 4
    *kept, ran_kept = _backward(True, dtype, *case, monkeypatch, resident=resident)
    *streaming, ran_streaming = _backward(True, dtype, *case, monkeypatch, resident=0)
    assert ran_kept == [f"query_pass_kernel resident={resident}"] and ran_streaming == ["query_pass_kernel"]
    for name, a, b in zip(("dq", "dk", "dv"), kept, streaming):
        assert torch.isfinite(a).all() and torch.equal(a, b), name


@pytest.mark.skipif(DEVICE != "cpu", reason="the rule's logic with a GPU plan: checked in the interpreter run")
def test_resident_query_rule(monkeypatch, request):
    """The GPU rule for how many state tiles the fused pass keeps on chip: all of F up to 4 tiles and
    16 KB at narrow head tiles, at 64-wide tiles all of F <= 2 and none past that (where the compile gate
    saw spills)."""
    from vicinity_attn.kernels import runtime
    from vicinity_attn.kernels.vicinity import configs
    runtime.clear_plan_caches()
    request.addfinalizer(runtime.clear_plan_caches)
    monkeypatch.setattr(configs, "interpreting", lambda: False)

    def tiles(block):
        return configs.StateTiles(64, block, block, 8, 3, max_registers=255)
    bf16, fp16 = torch.bfloat16, torch.float16
    assert [configs.resident_query_features(bf16, f, tiles(64)) for f in (1, 2, 3, 4)] == [1, 2, 0, 0]
    assert [configs.resident_query_features(bf16, f, tiles(32)) for f in (2, 4, 8)] == [2, 4, 4]
    assert configs.resident_query_features(fp16, 4, tiles(32)) == 4    # 4-byte TF32 tiles: 16 KB
    assert configs.resident_query_features(fp16, 10, tiles(16)) == 4
