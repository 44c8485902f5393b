"""The custom ops (``vicinity_attn.vicinity.ops``): opcheck, torch.compile(fullgraph=True), recompilation."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from tests.helpers import check_reduce_overhead_compile, make_inputs, token_counts
from vicinity_attn import VicinityAttention, vicinity_attention
from vicinity_attn.vicinity import ops

# (grid, kv_grid, variant, feature_map, num_prefix_tokens): 2-d cross grid, prefix tokens, 3-d product.
SPECS = [
    ([3, 4], [2, 3], "sum", "relu", 0),
    ([2, 3], [2, 3], "sum", "elu1", 2),
    ([2, 2, 3], [1, 2, 2], "product", "relu", 0),
    ([3, 3], [2, 2], "sum", "identity", 1),
]


def _op_inputs(spec, dtype, layout="bhnd", B=2, H=2, D=8, Dv=5):
    """q, k, v as the ops take them ([B, H, N, D] views; for "bnhd" the memory is [B, N, H, D], the
    module's layout, which outputs must follow) and the spec as the ops' schema values."""
    grid, kv_grid, variant, feature_map, prefix = spec
    nq, nk = token_counts(grid, kv_grid, prefix)
    tensors = make_inputs(B, H, nq, nk, D, Dv, dtype=dtype, layout=layout, requires_grad=False,
                          feature_map=feature_map)
    q, k, v = (t.transpose(1, 2) if layout == "bnhd" else t for t in tensors)
    return (q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True),
            [grid, kv_grid, variant, feature_map, 1e-4, prefix, 0.0, [], ""])


def _opcheck(backend, q, k, v, args, needs_list):
    fwd = ops.FORWARD_OPS[backend]
    bwd = {"torch": ops.torch_backward, "triton": ops.triton_backward}[backend]
    torch.library.opcheck(fwd, (q, k, v, *args))
    with torch.no_grad():
        o, den, S, z = fwd(q, k, v, *args)
    do = torch.randn_like(o)
    for needs in needs_list:
        torch.library.opcheck(bwd, (do, q.detach(), k.detach(), v.detach(), o, den, S, z, *args, *needs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spec_i, layout", [(0, "bhnd"), (1, "bnhd"), (2, "bhnd"), (3, "bnhd")])
def test_opcheck_torch(dtype, spec_i, layout):
    q, k, v, args = _op_inputs(SPECS[spec_i], dtype, layout)
    _opcheck("torch", q, k, v, args, ([True, True, True], [True, False, True], [False, True, False]))


@pytest.mark.parametrize("dtype, spec_i, layout", [(torch.float32, 0, "bnhd"), (torch.float64, 1, "bhnd"),
                                                    (torch.float32, 3, "bhnd")])
def test_opcheck_triton(dtype, spec_i, layout):
    """Through the Triton interpreter (opcheck runs the op a dozen times: tiny shapes)."""
    q, k, v, args = _op_inputs(SPECS[spec_i], dtype, layout, B=1, H=2, D=4, Dv=3)
    _opcheck("triton", q, k, v, args, ([True, True, True], [False, True, True]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_custom_op_path_matches_reference(backend):
    """The functional API's custom-op path gives the reference's outputs and gradients (fp64)."""
    q, k, v, (grid, kv_grid, variant, fmap, eps, prefix, *_) = _op_inputs(SPECS[1], torch.float64, "bnhd")
    kw = dict(grid=grid, kv_grid=kv_grid, variant=variant, feature_map=fmap, num_prefix_tokens=prefix)
    out = vicinity_attention(q, k, v, backend=backend, **kw)
    ref = vicinity_attention(q, k, v, backend="reference", **kw)
    do = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), do)
    want = torch.autograd.grad(ref, (q, k, v), do)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_fullgraph_identity_after_a_feature_map_in_the_graph(backend):
    """flash-bla's convention under torch.compile(fullgraph=True): the caller's own non-negative feature map
    (elu + 1 here) traced in the same graph as the op with feature_map="identity"; outputs and gradients
    equal the float64 reference with feature_map="elu1" on the raw inputs."""
    torch._dynamo.reset()
    q, k, v = make_inputs(1, 2, 13, 7, 8, 5)
    kw = dict(grid=(3, 4), kv_grid=(2, 3), num_prefix_tokens=1, layout="bhnd")

    def fn(q, k, v):
        phi = lambda x: torch.nn.functional.elu(x) + 1.0  # noqa: E731
        return vicinity_attention(phi(q), phi(k), v, feature_map="identity", backend=backend, **kw)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    ref = vicinity_attention(q, k, v, feature_map="elu1", backend="reference", **kw)
    do = torch.randn_like(ref)
    for g, w in zip((out, *torch.autograd.grad(out, (q, k, v), do)), (ref, *torch.autograd.grad(ref, (q, k, v), do))):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def _module_grads(module, x, H, W, dout, params):
    """Output, dx and parameter grads; ``params`` is the eager module (the compiled one shares them)."""
    x = x.detach().clone().requires_grad_(True)
    params.zero_grad(set_to_none=True)
    out = module(x, H, W)
    out.backward(dout)
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in params.named_parameters()}


def _assert_same(eager, compiled, rtol, atol):
    (o1, x1, p1), (o2, x2, p2) = eager, compiled
    torch.testing.assert_close(o2, o1, rtol=rtol, atol=atol)
    torch.testing.assert_close(x2, x1, rtol=rtol, atol=atol)
    assert p1.keys() == p2.keys()
    for name in p1:
        torch.testing.assert_close(p2[name], p1[name], rtol=rtol, atol=atol, msg=name)


def test_compile_fullgraph_inductor_matches_eager():
    """torch.compile(fullgraph=True) with the default (inductor) backend: no graph break, same
    outputs and gradients (inputs and parameters) as eager. fullgraph=True raises on any break."""
    torch._dynamo.reset()
    module = VicinityAttention(16, 2, sr_ratio=2, backend="torch", num_prefix_tokens=1)
    compiled = torch.compile(module, fullgraph=True)
    H, W = 4, 6
    x = torch.randn(2, 1 + H * W, 16)
    dout = torch.randn(2, 1 + H * W, 16)
    _assert_same(_module_grads(module, x, H, W, dout, module), _module_grads(compiled, x, H, W, dout, module),
                 rtol=1e-5, atol=1e-6)


def _count_graphs(module, compiled, sizes):
    graphs = []
    for H, W in sizes:
        x = torch.randn(1, H * W, 16, dtype=torch.float64)
        dout = torch.randn_like(x)
        _assert_same(_module_grads(module, x, H, W, dout, module), _module_grads(compiled, x, H, W, dout, module),
                     rtol=1e-10, atol=1e-12)
        graphs.append(counters["stats"]["unique_graphs"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    return graphs


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_recompiles_at_most_once_for_new_grid_sizes(backend):
    """First grid size: one graph. A second size: one recompile, after which H, W and N are dynamic
    (automatic dynamic shapes), so further sizes reuse that graph. Counted with dynamo's counters;
    ``fullgraph=True`` makes any graph break an error. aot_eager runs dynamo + AOTAutograd (fake
    tensors, the ops' fake and autograd registrations) without inductor's C++ build time."""
    torch._dynamo.reset()
    counters.clear()
    module = VicinityAttention(16, 2, sr_ratio=2, backend=backend).double()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    # Small grids (the triton backend runs in the interpreter here), but no key-grid axis of size 1:
    # dynamo always specialises sizes 0 and 1. Automatic dynamic shapes only generalise what changed,
    # so the second size changes H, W and the token count N (4x4 -> 6x4 would leave W static and a
    # later new W would recompile once more).
    graphs = _count_graphs(module, compiled, [(4, 4), (6, 8), (4, 6), (8, 6)])
    assert graphs[0] == 1
    assert graphs[-1] <= 2, f"graphs compiled after each new grid size: {graphs}"



def test_compile_dynamic_true_never_recompiles():
    """With dynamic=True every size is symbolic from the first call: even 4x6 -> 6x4 (same token
    count, different H and W) and a new token count reuse the one graph."""
    torch._dynamo.reset()
    counters.clear()
    module = VicinityAttention(16, 2, sr_ratio=2, backend="torch").double()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager", dynamic=True)
    graphs = _count_graphs(module, compiled, [(4, 6), (6, 4), (8, 10)])
    assert graphs == [1, 1, 1], f"graphs compiled after each new grid size: {graphs}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_reduce_overhead_matches_eager(backend):
    """torch.compile(mode="reduce-overhead"), the mode that captures CUDA graphs on a GPU (on a CPU it
    compiles without them): the op traces with no graph break and matches eager, gradients included."""
    inputs = tuple(make_inputs(1, 2, 12, 12, 8, 8, dtype=torch.float32))
    check_reduce_overhead_compile(lambda q, k, v: vicinity_attention(q, k, v, (3, 4), backend=backend) * 2.0, inputs)
