"""Frame-causal vicinity attention (``causal="frames"``): the reference's mask, the torch backend against the
float64 reference (forward, gradients, forward-mode AD, compile, varlen), windows with carried states, the
streaming cache and the layer. The triton backend's frame-causal kernels: test_causal_triton.py; context
parallelism over frames: test_context_parallel.py."""
import math

import pytest
import torch

from tests.helpers import check_against_reference, check_jacobian, close_fp64, interpreting, make_inputs, token_counts
from vicinity_attn import FrameCache, VicinityAttention, vicinity_attention, vicinity_attention_step
from vicinity_attn import vicinity_attention_varlen as varlen
from vicinity_attn.common.spec import VicinitySpec
from vicinity_attn.vicinity import frames
from vicinity_attn.vicinity.reference import frame_mask

TRITON = pytest.param("triton", marks=pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1"))

# (grid, kv_grid, prefix, options)
CASES = [
    ((4, 5, 6), None, 0, dict()),
    ((3, 8, 8), (3, 4, 4), 2, dict(variant="product")),
    ((5, 6), (5, 3), 1, dict(variant="none", den_floor=4.0)),
    ((4, 3, 5), None, 2, dict(clamp=(1e-4, 1e4), feature_map="elu1")),
    ((4, 3, 5), (4, 2, 2), 1, dict(clamp=(0.05, 0.8))),          # a clamp that bites
]


def _ids(case):
    grid, kv, P, opts = case
    return f"{'x'.join(map(str, grid))}-kv{'x'.join(map(str, kv or grid))}-P{P}-" + "-".join(sorted(opts)) or "plain"


def _call(q, k, v, grid, kv_grid, P, backend, **opts):
    return vicinity_attention(q, k, v, grid, kv_grid, num_prefix_tokens=P, causal="frames", backend=backend, **opts)


def test_mask_is_frame_causal_with_prefix_as_frame_minus_one():
    spec = VicinitySpec(grid=(3, 2), kv_grid=(3, 1), num_prefix_tokens=1, causal="frames")
    # rows: prefix query, then 2 queries per frame; columns: prefix key, then 1 key per frame
    want = torch.tensor([[1, 0, 0, 0],
                         [1, 1, 0, 0], [1, 1, 0, 0],
                         [1, 1, 1, 0], [1, 1, 1, 0],
                         [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.float64)
    assert torch.equal(frame_mask(spec), want)


def test_last_frame_sees_everything_and_prefix_queries_only_the_prefix():
    grid, P = (3, 4, 2), 2
    q, k, v = make_inputs(2, 2, *token_counts(grid, None, P), 6, 5, requires_grad=False)
    causal = _call(q, k, v, grid, None, P, "reference")
    full = vicinity_attention(q, k, v, grid, num_prefix_tokens=P, backend="reference")
    last = slice(P + 2 * 8, None)
    close_fp64(causal[:, :, last], full[:, :, last], "last frame")
    # A prefix query attends to the prefix keys alone with weight 1: plain linear attention over them.
    phi_q, phi_k = q[:, :, :P].relu(), k[:, :, :P].relu()
    scores = phi_q @ phi_k.transpose(-1, -2)
    close_fp64(causal[:, :, :P], (scores @ v[:, :, :P]) / (scores.sum(-1, keepdim=True) + 1e-4), "prefix rows")
    assert (causal[:, :, :last.start] - full[:, :, :last.start]).abs().max() > 1e-3   # earlier frames differ


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_later_frames_do_not_change_earlier_outputs(backend):
    grid, kv, P = (4, 3, 3), (4, 2, 1), 1
    q, k, v = make_inputs(1, 2, *token_counts(grid, kv, P), 8, 4, requires_grad=False)
    o = _call(q, k, v, grid, kv, P, backend)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, P + 2 * 2:] += 1.0            # keys of frames 2 and 3
    v2[:, :, P + 2 * 2:] -= 2.0
    o2 = _call(q, k2, v2, grid, kv, P, backend)
    cut = P + 2 * 9
    assert torch.equal(o[:, :, :cut], o2[:, :, :cut])
    assert (o[:, :, cut:] - o2[:, :, cut:]).abs().min() > 0


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_torch_backend_matches_the_reference_float64(case):
    grid, kv, P, opts = case
    q, k, v = make_inputs(2, 3, *token_counts(grid, kv, P), 8, 6)
    check_against_reference(q, k, v, grid=grid, kv_grid=kv, num_prefix_tokens=P, causal="frames", backend="torch",
                            **opts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=_ids)
def test_torch_backend_low_precision_by_the_tolerance_rule(case, dtype):
    grid, kv, P, opts = case
    q, k, v = make_inputs(2, 2, *token_counts(grid, kv, P), 32, 16, dtype=dtype)
    check_against_reference(q, k, v, grid=grid, kv_grid=kv, num_prefix_tokens=P, causal="frames", backend="torch",
                            **opts)


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=_ids)
def test_torch_backend_in_head_chunks_matches_the_reference(monkeypatch, case, layout):
    """The window functions split into (batch, head) chunks (CHUNK_BYTES made small: one slice per chunk, B = 2,
    H = 3) stay exact, in both memory orders, with a prefix and a clamp that bites."""
    from vicinity_attn.vicinity import torch_backend
    monkeypatch.setattr(torch_backend, "CHUNK_BYTES", 1)
    seen = []
    monkeypatch.setattr(frames, "_chunks", lambda x, width, chunks=frames._chunks: seen.append(chunks(x, width))
                        or seen[-1])
    grid, kv, P, opts = case
    q, k, v = make_inputs(2, 3, *token_counts(grid, kv, P), 8, 6, layout=layout)
    check_against_reference(q, k, v, grid=grid, kv_grid=kv, num_prefix_tokens=P, causal="frames", backend="torch",
                            layout=layout, **opts)
    assert seen and all(len(c) == 6 for c in seen)   # forward, query side and key side each ran in 6 chunks


@pytest.mark.parametrize("grid, variant, P, want", [
    ((4, 5, 6), "sum", 0, (0, 1)),              # the time axis' cos / sin
    ((4, 5, 6), "sum", 1, (0, 1, 6, 7)),        # + the prefix scheme's two (0 / 1 on grid tokens)
    ((4, 1, 6), "sum", 0, (0, 1, 2, 3)),        # an axis of size 1: its features are constant too
    ((3, 8, 8), "product", 2, (8, 9)),          # products with the other axes vary within a frame
    ((5,), "product", 0, (0, 1)),               # 1-d: every feature is the time axis'
    ((5, 6), "none", 0, (0,)),
    ((300, 64, 64), "sum", 0, (0, 1)),          # found over two blocks of frames
])
def test_frame_constant_features(grid, variant, P, want):
    spec = VicinitySpec(grid=grid, kv_grid=grid, variant=variant, num_prefix_tokens=P, causal="frames")
    assert (frames.frame_constant(spec, "query"), frames.frame_constant(spec, "key")) == (want, want)


def test_torch_window_functions_take_the_cpu_thread_policy(monkeypatch):
    """Forward and both backward sides run with the threads cpu_threads.call_threads picks (here 1 of 2), as
    the bidirectional path does, and torch's setting is restored after each."""
    from vicinity_attn.vicinity import cpu_threads
    monkeypatch.setattr(cpu_threads, "call_threads", lambda work: 1)
    seen = {}
    for name in ("_window_forward", "_window_query_backward", "_window_key_backward"):
        def record(*args, _name=name, _fn=getattr(frames, name), **kwargs):
            seen[_name] = torch.get_num_threads()
            return _fn(*args, **kwargs)
        monkeypatch.setattr(frames, name, record)
    grid, kv, P, opts = CASES[0]
    q, k, v = make_inputs(1, 2, *token_counts(grid, kv, P), 8, 6)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _call(q, k, v, grid, kv, P, "torch").sum().backward()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    assert seen == {"_window_forward": 1, "_window_query_backward": 1, "_window_key_backward": 1}


# triton: jacfwd only (its jacrev takes ~150 s interpreted)
@pytest.mark.parametrize("transform, backend", [("jacfwd", "torch"), ("jacrev", "torch"),
                                                pytest.param("jacfwd", "triton", marks=TRITON.marks)])
def test_jacobians_match_the_reference(transform, backend):
    grid, P = (3, 2, 2), 1
    inputs = tuple(t.detach() for t in make_inputs(1, 2, *token_counts(grid, None, P), 4, 3))
    kw = dict(num_prefix_tokens=P, causal="frames", feature_map="elu1", den_floor=0.5)
    check_jacobian(lambda q, k, v: vicinity_attention(q, k, v, grid, backend=backend, **kw),
                   lambda q, k, v: vicinity_attention(q, k, v, grid, backend="reference", **kw), inputs, transform)


def test_forward_ad_with_a_clamp_is_refused():
    q, k, v = (t.detach() for t in make_inputs(1, 1, 8, 8, 4, 4))
    with pytest.raises(NotImplementedError, match="clamp"):
        torch.func.jvp(lambda x: vicinity_attention(x, k, v, (2, 4), causal="frames", clamp=(1e-4, 1e4),
                                                    backend="torch"), (q,), (torch.randn_like(q),))


@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_compiles_without_graph_breaks_and_matches_eager(backend):
    grid, kv, P = (3, 4, 4), (3, 2, 2), 1
    q, k, v = make_inputs(1, 2, *token_counts(grid, kv, P), 8, 8)
    fn = lambda a, b, c: _call(a, b, c, grid, kv, P, backend, clamp=(1e-4, 1e4))  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    out, want = compiled(q, k, v), fn(q, k, v)
    close_fp64(out, want, "compiled o")
    do = torch.randn_like(out)
    for g, w, name in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(want, (q, k, v), do), "qkv"):
        close_fp64(g, w, f"compiled d{name}")


@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_custom_ops_opcheck_with_causal(backend):
    """The ops' schema, fakes (the per-slot saved states) and autograd with causal="frames"."""
    from vicinity_attn.vicinity import ops
    q, k, v = make_inputs(1, 2, 1 + 12, 1 + 6, 4, 3)
    args = [[3, 4], [3, 2], "sum", "relu", 1e-4, 1, 0.0, [], "frames"]
    fwd, bwd = ops.FORWARD_OPS[backend], ops.BACKWARD_OPS[backend]
    torch.library.opcheck(fwd, (q, k, v, *args))
    with torch.no_grad():
        o, den, S, z = fwd(q, k, v, *args)
    F = ops.feature_count(2, "sum", True)
    assert S.shape == ((1, 2, 3 + 1, F * 4, 3) if backend == "torch" else (2, 3 + 1, F, 4, 3))
    torch.library.opcheck(bwd, (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o, den, S, z,
                                *args, True, False, True))


@pytest.mark.parametrize("backend", ["torch", "reference", TRITON])
def test_varlen_packs_give_each_sequence_its_own_frames(backend):
    P, H = 1, 2
    grids = [(3, 2, 2), (4, 3, 1), (3, 2, 2)]
    kv_grids = [(3, 1, 2), (4, 1, 1), (3, 1, 2)]
    lq = [P + math.prod(g) for g in grids]
    lk = [P + math.prod(g) for g in kv_grids]
    q = torch.randn(sum(lq), H, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(sum(lk), H, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(sum(lk), H, 3, dtype=torch.float64, requires_grad=True)
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    o = varlen(q, k, v, cu(lq), cu(lk), grids, kv_grids, num_prefix_tokens=P, causal="frames", backend=backend)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    qo, ko = [0, *torch.tensor(lq).cumsum(0).tolist()], [0, *torch.tensor(lk).cumsum(0).tolist()]
    for i, (g, kg) in enumerate(zip(grids, kv_grids)):
        parts = [t[a:b].detach().clone().unsqueeze(0).requires_grad_() for t, a, b in
                 ((q, qo[i], qo[i + 1]), (k, ko[i], ko[i + 1]), (v, ko[i], ko[i + 1]))]
        want = vicinity_attention(*parts, g, kg, num_prefix_tokens=P, causal="frames", layout="bnhd",
                                  backend="reference")
        close_fp64(o[qo[i]:qo[i + 1]], want[0], f"sequence {i} o")
        dwant = torch.autograd.grad(want, parts, do[qo[i]:qo[i + 1]].unsqueeze(0))
        for got, w, (a, b), name in zip(grads, dwant, ((qo[i], qo[i + 1]), (ko[i], ko[i + 1]), (ko[i], ko[i + 1])),
                                        "qkv"):
            close_fp64(got[a:b], w[0], f"sequence {i} d{name}")


@pytest.mark.parametrize("clamp, chunked", [(None, False), ((0.05, 0.8), False), ((0.05, 0.8), True)])
def test_windows_chained_by_their_carry_equal_the_whole_call(monkeypatch, clamp, chunked):
    """Windows of 1, 3 and 2 frames, each from the previous one's carry; the key side with the gradient of
    the carry (what later windows send back) equals autograd of the reference over the whole clip. Chunked:
    every window function one (batch, head) slice at a time (init, carry and carry_grad split with them)."""
    if chunked:
        from vicinity_attn.vicinity import torch_backend
        monkeypatch.setattr(torch_backend, "CHUNK_BYTES", 1)
    grid, kv, P = (6, 2, 3), (6, 2, 1), 2
    spec = VicinitySpec(grid=grid, kv_grid=kv, num_prefix_tokens=P, clamp=clamp, causal="frames")
    q, k, v = make_inputs(2 if chunked else 1, 2, *token_counts(grid, kv, P), 5, 4)
    want = vicinity_attention(q, k, v, grid, kv, num_prefix_tokens=P, clamp=clamp, causal="frames",
                              backend="reference")
    do = torch.randn_like(want)
    dwant = torch.autograd.grad(want, (q, k, v), do)
    bounds, f0, init, saved = [(0, 1), (1, 4), (4, 6)], None, None, []
    for f0, f1 in bounds:
        qs = slice(0 if f0 == 0 else P + f0 * 6, P + f1 * 6)
        ks = slice(0 if f0 == 0 else P + f0 * 2, P + f1 * 2)
        o, den, S, z, carry = frames.window_forward(q[:, :, qs].detach(), k[:, :, ks].detach(), v[:, :, ks].detach(),
                                                    spec, f0, init)
        close_fp64(o, want[:, :, qs].detach(), f"window {f0}..{f1} o")
        saved.append((qs, ks, f0, o, den, S, z))
        init = carry
    carry_grad = None
    for qs, ks, f0, o, den, S, z in reversed(saved):
        dq, dpre, init_grad = frames.window_query_backward(do[:, :, qs], q[:, :, qs].detach(), o, den, S, z, spec, f0,
                                                           True)
        dk, dv = frames.window_key_backward(k[:, :, ks].detach(), v[:, :, ks].detach(), dpre, spec, f0, carry_grad,
                                            True, True)
        for got, w, name in zip((dq, dk, dv), (dwant[0][:, :, qs], dwant[1][:, :, ks], dwant[2][:, :, ks]), "qkv"):
            close_fp64(got, w, f"window from frame {f0} d{name}")
        # The earlier windows' keys feed this window's queries through its init.
        carry_grad = init_grad if carry_grad is None else tuple(a + b for a, b in zip(init_grad, carry_grad))


STREAM_CASES = [(backend, P, clamp) for backend in ("torch", "reference")
                for P, clamp in ((0, None), (2, (1e-4, 1e4)), (1, (0.05, 0.8)))]
STREAM_CASES.append(pytest.param("triton", 1, (0.05, 0.8), marks=TRITON.marks))   # one: ~8 s interpreted


@pytest.mark.parametrize("backend, P, clamp", STREAM_CASES)
def test_stream_equals_the_whole_call_frame_by_frame(backend, P, clamp):
    grid, kv, B, H = (17, 3, 4), (17, 2, 2), 2, 2
    q, k, v = make_inputs(B, H, *token_counts(grid, kv, P), 8, 5, requires_grad=False, layout="bnhd")
    kw = dict(num_prefix_tokens=P, clamp=clamp, layout="bnhd")
    want = vicinity_attention(q, k, v, grid, kv, causal="frames", backend="reference", **kw)
    cache = FrameCache(grid, kv, backend=backend, **kw)
    steps, iq, ik, outs = [1, 2, 1, 3] + [1] * 10, 0, 0, []
    for n in steps:
        nq, nk = (P if cache.frame == 0 else 0) + n * 12, (P if cache.frame == 0 else 0) + n * 4
        outs.append(vicinity_attention_step(q[:, iq:iq + nq], k[:, ik:ik + nk], v[:, ik:ik + nk], cache))
        iq, ik = iq + nq, ik + nk
    assert cache.frame == 17 and len(steps) >= 14
    close_fp64(torch.cat(outs, 1), want, "streamed o")
    if backend != "reference":   # constant memory: the states alone, F x D x Dv per head
        S, z = cache.states
        F = 6 + (2 if P else 0)
        assert S.shape == (B, H, F, 8, 5) and z.shape == (B, H, F, 8)


def test_stream_errors_name_what_is_wrong():
    cache = FrameCache((2, 2, 2), backend="torch")
    q, k, v = make_inputs(1, 1, 4, 4, 4, 4, requires_grad=False)
    with pytest.raises(ValueError, match="whole number"):
        cache.step(q[:, :, :3], k[:, :, :3], v[:, :, :3])
    cache.step(q, k, v)
    with pytest.raises(ValueError, match="B, H, D, Dv"):
        cache.step(q.float(), k.float(), v.float())
    with pytest.raises(ValueError, match="inference"):
        cache.step(q.requires_grad_(), k, v)
    cache.step(q.detach(), k, v)
    with pytest.raises(ValueError, match="reached the grid's 2 frames"):
        cache.step(q.detach(), k, v)
    cache.reset()
    assert cache.frame == 0 and cache.states is None
    with pytest.raises(TypeError, match="FrameCache"):
        vicinity_attention_step(q.detach(), k, v, cache=None)


@pytest.mark.parametrize("grid, kv_grid, causal, match", [
    ((16,), None, "frames", "2-d or 3-d"),
    ((4, 4), (2, 4), "frames", "as many frames"),
    ((4, 4), None, "tokens", "causal must be"),
])
def test_bad_causal_calls_name_the_argument(grid, kv_grid, causal, match):
    q, k, v = make_inputs(1, 1, 16, 16 if kv_grid is None else 8, 4, 4)
    with pytest.raises(ValueError, match=match):
        vicinity_attention(q, k, v, grid, kv_grid, causal=causal, backend="torch")
    with pytest.raises(ValueError, match=match):
        FrameCache(grid, kv_grid) if causal == "frames" else VicinityAttention(8, 2, causal=causal)


@pytest.mark.parametrize("sr_ratio, P", [(1, 0), (2, 1)])
def test_layer_video_and_streaming(sr_ratio, P):
    torch.manual_seed(0)
    layer = VicinityAttention(32, 4, sr_ratio=sr_ratio, num_prefix_tokens=P, causal="frames", backend="torch",
                              temperature=True).double().eval()
    T, H, W = 5, 4, 4
    x = torch.randn(2, P + T * H * W, 32, dtype=torch.float64)
    full = layer(x, H, W, frames=T)
    # Against the functional call on the layer's own projections (sr_ratio reduces each frame).
    bidirectional = VicinityAttention(32, 4, sr_ratio=sr_ratio, num_prefix_tokens=P, backend="torch",
                                      temperature=True).double().eval()
    bidirectional.load_state_dict(layer.state_dict())
    assert (bidirectional(x, H, W, frames=T) - full)[:, :P + H * W].abs().max() > 1e-6   # frame 0 sees less
    close_fp64(bidirectional(x, H, W, frames=T)[:, -H * W:], full[:, -H * W:], "last frame = bidirectional")
    cache, outs, i = layer.frame_cache(T, H, W), [], 0
    with torch.no_grad():
        for f in range(T):
            n = (P if f == 0 else 0) + H * W
            outs.append(layer(x[:, i:i + n], H, W, cache=cache))
            i += n
    close_fp64(torch.cat(outs, 1), full, "streamed layer")
    with pytest.raises(ValueError, match="frames=T"):
        layer(x[:, :P + H * W], H, W)
