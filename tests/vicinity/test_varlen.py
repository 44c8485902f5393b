"""vicinity_attention_varlen: a packed call equals per-sequence vicinity_attention calls on every backend."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import FLOOR, count_launches, pack, rel_err
from vicinity_attn import vicinity_attention, vicinity_attention_varlen
from vicinity_attn.vicinity import varlen as varlen_ops


def per_sequence(q, k, v, cu_q, cu_k, grids, kv_grids=None, **kw):
    """The packed call's meaning: one vicinity_attention call per sequence (layout "bnhd", batch 1)."""
    kv_grids = kv_grids or grids
    outs = []
    for i in range(len(grids)):
        a, b, c, d = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        outs.append(vicinity_attention(q[a:b][None], k[c:d][None], v[c:d][None], grids[i], kv_grids[i],
                                       layout="bnhd", **kw)[0])
    return torch.cat(outs)


def outputs_and_grads(fn, q, k, v, do):
    out = fn()
    return [out, *torch.autograd.grad(out, (q, k, v), do)]


def assert_matches_per_sequence(grids, kv_grids=None, prefix=0, backend="torch", tol=1e-12, H=2, D=4, Dv=3,
                                against=None, **kw):
    """The packed call on ``backend`` against per-sequence calls on ``against`` (default: the same backend;
    the triton tests use the torch backend there, which is 1e-12-equal to triton and costs no interpreter time)."""
    q, k, v, cu_q, cu_k = pack(grids, kv_grids, prefix, H, D, Dv, feature_map=kw.get("feature_map"))
    do = torch.randn(q.shape[0], H, Dv, dtype=torch.float64)
    kw = dict(num_prefix_tokens=prefix, **kw)
    want = outputs_and_grads(lambda: per_sequence(q, k, v, cu_q, cu_k, grids, kv_grids, backend=against or backend,
                                                  **kw), q, k, v, do)
    got = outputs_and_grads(lambda: vicinity_attention_varlen(q, k, v, cu_q, cu_k, grids, kv_grids, backend=backend,
                                                              **kw), q, k, v, do)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert rel_err(g, w) <= tol, f"{name}: {rel_err(g, w):.3e}"


# Mixed resolutions, cross grids (Nq != Nk per sequence), equal grids that group, prefix tokens.
CASES_2D = dict(grids=[(3, 4), (2, 5), (3, 4), (1, 3)], kv_grids=[(2, 2), (1, 5), (2, 2), (1, 2)])


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("variant", ["sum", "product", "none"])
def test_matches_per_sequence_2d_cross_prefix(backend, variant):
    assert_matches_per_sequence(**CASES_2D, prefix=1, backend=backend, variant=variant)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("grids", [[5, (7,), 3], [(2, 2, 3), (1, 3, 2), (2, 2, 3)]], ids=["1d", "3d"])
def test_matches_per_sequence_1d_3d(backend, grids):
    assert_matches_per_sequence(grids, backend=backend, variant="product" if len(grids) == 3 else "sum")


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_identity_matches_per_sequence(backend):
    """feature_map="identity" (non-negative q, k): the packed call equals per-sequence calls (the triton pack
    against the torch backend's per-sequence calls)."""
    assert_matches_per_sequence(**CASES_2D, prefix=1, backend=backend, feature_map="identity",
                                against="torch" if backend == "triton" else None, H=1 if backend == "triton" else 2)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_floor_clamp_elu1_match_per_sequence(backend):
    assert_matches_per_sequence(**CASES_2D, prefix=2, backend=backend, feature_map="elu1", den_floor=3.0,
                                clamp=(1e-3, 5.0))


# ----------------------------------------------------------------------------------------------------
# triton (the interpreter): one launch per pass for the whole pack

def test_triton_matches_per_sequence_mixed_2d_cross_prefix(monkeypatch):
    """Mixed 2-d grids, cross grids, prefix tokens, fp64; every allocation poisoned with NaN (outputs,
    states, chunk partials: an unwritten element, or a partial of a chunk past a sequence's end that
    the reduction summed, would show)."""
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: (lambda t: t.fill_(float("nan")) if t.is_floating_point()
                                                          else t)(real_empty(*a, **kw)))
    assert_matches_per_sequence(**CASES_2D, prefix=1, backend="triton", against="torch", H=1)


def test_triton_chunked_1d_one_launch_per_pass(monkeypatch):
    """1-d sequences of 40, 3 and 17 tokens: under the interpreter a state pass takes chunks of 2 blocks
    of 16 tokens, so the sequences have 2, 1 and 1 chunks. Each pass is one launch for the whole pack."""
    from vicinity_attn.kernels.vicinity import launch_backward as backward
    from vicinity_attn.kernels.vicinity import launch_forward as forward
    launches = count_launches(monkeypatch, [(forward, name) for name in ("state_partial_kernel", "output_pass_kernel")]
                              + [(backward, name) for name in ("dq_pass_kernel", "row_weights_kernel",
                                                               "key_pass_kernel")])
    assert_matches_per_sequence([40, 3, 17], backend="triton", against="torch")
    # Forward: state pass (its chunk reduction inside), output pass. Backward: dq (with the row weights),
    # state pass (its chunk reduction inside), key pass (dk and dv).
    assert launches == dict(state_partial_kernel=2, output_pass_kernel=1, dq_pass_kernel=1, key_pass_kernel=1)


def test_triton_3d_product_floor_clamp_elu1():
    assert_matches_per_sequence([(2, 2, 3), (1, 3, 2)], [(1, 2, 3), (1, 3, 1)], prefix=2, backend="triton",
                                against="torch", H=1, variant="product", feature_map="elu1", den_floor=3.0,
                                clamp=(1e-3, 5.0))


def test_triton_gradcheck():
    grids, kv_grids = [(2, 2), (1, 3)], [(1, 2), (1, 3)]
    q, k, v, cu_q, cu_k = pack(grids, kv_grids, H=1, D=2, Dv=2)
    fn = lambda q, k, v: vicinity_attention_varlen(q, k, v, cu_q, cu_k, grids, kv_grids,  # noqa: E731
                                                   backend="triton")
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


@pytest.mark.parametrize("feature_map", ["relu", "identity"])
def test_triton_bf16_tolerance_rule(feature_map):
    check_low_precision(torch.bfloat16, "triton", H=1, feature_map=feature_map)


def test_triton_torch_compile_fullgraph():
    grids = [(2, 3), (1, 4)]
    q, k, v, cu_q, cu_k = pack(grids, H=1)
    fn = torch.compile(lambda q, k, v, cq, ck: vicinity_attention_varlen(q, k, v, cq, ck, grids, backend="triton"),
                       fullgraph=True, backend="aot_eager")
    out = fn(q, k, v, cu_q, cu_k)
    out.sum().backward()
    want = per_sequence(q.detach(), k.detach(), v.detach(), cu_q, cu_k, grids, backend="torch")
    assert rel_err(out, want) <= 1e-12


def test_triton_refuses_torch_func():
    q, k, v, cu_q, cu_k = pack([(2, 2)], requires_grad=False)
    with pytest.raises(RuntimeError, match="does not support torch.func"):
        torch.func.grad(lambda q: vicinity_attention_varlen(q, k, v, cu_q, cu_k, [(2, 2)], backend="triton").sum())(q)


def test_triton_keeps_the_pack_tables_per_spec(monkeypatch):
    """The per-sequence tables are built once per (spec, device): a second call with the same grids builds
    none, copies no table again, and gives bitwise the same results."""
    from vicinity_attn.vicinity import triton_varlen
    triton_varlen._geometry_and_pack.cache_clear()
    built = []
    real_build = triton_varlen.Packing.build
    monkeypatch.setattr(triton_varlen.Packing, "build",
                        lambda *a, **kw: built.append(real_build(*a, **kw)) or built[-1])
    grids = [(2, 3), (3, 2)]
    q, k, v, cu_q, cu_k = pack(grids, H=1)
    do = torch.randn(q.shape[0], 1, v.shape[-1], dtype=q.dtype)
    fn = lambda: vicinity_attention_varlen(q, k, v, cu_q, cu_k, grids, backend="triton")  # noqa: E731
    first = outputs_and_grads(fn, q, k, v, do)
    tables = dict(built[0]._tables)
    second = outputs_and_grads(fn, q, k, v, do)
    assert len(built) == 1 and tables
    assert all(built[0]._tables[key] is t for key, t in tables.items())
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_torch_groups_equal_grids_into_one_call(monkeypatch):
    calls = []
    original = varlen_ops.custom_op_attention

    def counting(backend, q, k, v, spec):
        calls.append((q.shape[0], spec.grid, spec.kv_grid))
        return original(backend, q, k, v, spec)
    monkeypatch.setattr(varlen_ops, "custom_op_attention", counting)
    q, k, v, cu_q, cu_k = pack(**CASES_2D)
    vicinity_attention_varlen(q, k, v, cu_q, cu_k, **CASES_2D, backend="torch")
    # Sequences 0 and 2 share (grid, kv_grid): one batch of 2; the others alone. In order of appearance.
    assert calls == [(2, (3, 4), (2, 2)), (1, (2, 5), (1, 5)), (1, (1, 3), (1, 2))]


def check_low_precision(dtype, backend, H=2, feature_map="relu"):
    """``backend`` in a low precision against the float64 reference, by the tolerance rule (the plain
    computation: the reference in that dtype)."""
    q, k, v, cu_q, cu_k = pack(**CASES_2D, prefix=1, H=H, D=8, Dv=8, dtype=dtype, feature_map=feature_map)
    run = lambda q, k, v, backend: vicinity_attention_varlen(q, k, v, cu_q, cu_k, **CASES_2D,  # noqa: E731
                                                             num_prefix_tokens=1, backend=backend,
                                                             feature_map=feature_map)
    as64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    do = torch.randn(q.shape[0], H, 8, dtype=torch.float64)
    ref = outputs_and_grads(lambda: run(*as64, "reference"), *as64, do)
    got = outputs_and_grads(lambda: run(q, k, v, backend), q, k, v, do.to(dtype))
    lowp = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    plain = outputs_and_grads(lambda: run(*lowp, "reference"), *lowp, do.to(dtype))
    for name, g, r, p in zip(("out", "dq", "dk", "dv"), got, ref, plain):
        assert g.dtype == dtype
        assert rel_err(g, r) <= 2 * rel_err(p, r) + FLOOR[dtype], name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("feature_map", ["relu", "identity"])
def test_low_precision_tolerance_rule(dtype, feature_map):
    check_low_precision(dtype, "torch", feature_map=feature_map)


def test_gradcheck_torch():
    grids, kv_grids = [(2, 3), (1, 2)], [(1, 3), (1, 2)]
    q, k, v, cu_q, cu_k = pack(grids, kv_grids, prefix=1, H=1, D=2, Dv=2)
    fn = lambda q, k, v: vicinity_attention_varlen(q, k, v, cu_q, cu_k, grids, kv_grids, num_prefix_tokens=1,  # noqa: E731
                                                   backend="torch")
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_torch_compile_fullgraph_torch_backend():
    grids = [(2, 3), (3, 2), (2, 3)]
    q, k, v, cu_q, cu_k = pack(grids)
    fn = torch.compile(lambda q, k, v, cq, ck: vicinity_attention_varlen(q, k, v, cq, ck, grids, backend="torch"),
                       fullgraph=True, backend="aot_eager")
    out = fn(q, k, v, cu_q, cu_k)
    assert rel_err(out, vicinity_attention_varlen(q, k, v, cu_q, cu_k, grids, backend="torch")) <= 1e-12
    bad = cu_q.clone()
    bad[1] = 5
    with pytest.raises(RuntimeError, match="cu_seqlens_q disagrees"):
        fn(q, k, v, bad, cu_k)


def test_no_heads_keeps_the_graph():
    q, k, v, cu_q, cu_k = pack([(2, 2), (1, 3)], H=0)
    out = vicinity_attention_varlen(q, k, v, cu_q, cu_k, [(2, 2), (1, 3)])
    assert out.shape == (7, 0, 3)
    out.sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape


# ----------------------------------------------------------------------------------------------------
# validation: every bad call names its argument


def _bad_calls():
    grids = [(2, 2), (1, 3)]
    q, k, v, cu, _ = pack(grids, requires_grad=False)
    ok = dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, grids=grids)
    yield "cu_seqlens_q must be an int32", dict(ok, cu_seqlens_q=cu.long())
    yield "cu_seqlens_k must be 1-d", dict(ok, cu_seqlens_k=cu[None])
    yield "cu_seqlens_q must start at 0", dict(ok, cu_seqlens_q=torch.tensor([1, 4, 7], dtype=torch.int32))
    yield "cu_seqlens_q must be strictly increasing", dict(ok, cu_seqlens_q=torch.tensor([0, 7, 7],
                                                                                          dtype=torch.int32))
    yield "cu_seqlens_q must be strictly increasing", dict(ok, cu_seqlens_q=torch.tensor([0, 5, 4],
                                                                                          dtype=torch.int32))
    yield r"cu_seqlens_k\[-1\] must equal the number of packed tokens 7", dict(
        ok, cu_seqlens_k=torch.tensor([0, 4, 6], dtype=torch.int32))
    yield r"cu_seqlens_q must have len\(grids\) \+ 1 = 3", dict(ok, cu_seqlens_q=cu[:2])
    yield r"grids\[0\] has 4 tokens .* cu_seqlens_q gives sequence 0 3 tokens", dict(
        ok, cu_seqlens_q=torch.tensor([0, 3, 7], dtype=torch.int32))
    yield r"kv_grids\[1\] has 2 tokens", dict(ok, kv_grids=[(2, 2), (1, 2)])
    yield "same number of axes: grids\\[1\\]", dict(ok, grids=[(2, 2), (3,)])
    yield "same number of axes: kv_grids\\[0\\]", dict(ok, kv_grids=[(4,), (3,)])
    yield "kv_grids must hold one grid per sequence", dict(ok, kv_grids=[(2, 2)])
    yield "grids must hold at least one grid", dict(ok, grids=[])
    yield r"grids\[1\] sizes must be positive", dict(ok, grids=[(2, 2), (0, 3)])
    yield "grids must be a list", dict(ok, grids="2x2")
    yield r"q must be 3-d \[T, H, D\]", dict(ok, q=q[None])
    yield "k and v must have the same number of tokens", dict(ok, v=v[:5])
    yield "q, k and v must share batch and head sizes", dict(ok, k=k[:, :1])
    yield "q and k must have the same head dim", dict(ok, k=k[..., :3])
    yield "must share a dtype", dict(ok, v=v.float())
    yield "variant must be one of", dict(ok, variant="max")
    yield "backend must be one of", dict(ok, backend="cuda")
    yield "num_prefix_tokens must be >= 0", dict(ok, num_prefix_tokens=-1)
    yield "eps must be a positive", dict(ok, eps=0.0)
    yield "cu_seqlens_q must be a torch.Tensor", dict(ok, cu_seqlens_q=[0, 4, 7])


@pytest.mark.parametrize("match,call", list(_bad_calls()), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_calls_name_the_argument(match, call):
    with pytest.raises((ValueError, TypeError), match=match):
        vicinity_attention_varlen(**call)
