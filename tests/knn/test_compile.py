"""k-NN attention's custom ops: opcheck, torch.compile(fullgraph=True), autocast."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_rule, check_reduce_overhead_compile, make_inputs
from vicinity_attn import knn_attention
from vicinity_attn.knn import ops as knn_ops


def _opcheck(backend, q, k, v, topk, scale, needs_list):
    torch.library.opcheck(knn_ops.FORWARD_OPS[backend], (q, k, v, topk, scale))
    with torch.no_grad():
        o, tau, lse = knn_ops.FORWARD_OPS[backend](q, k, v, topk, scale)
    do = torch.randn_like(o)
    for needs in needs_list:
        torch.library.opcheck(knn_ops.BACKWARD_OPS[backend],
                              (do, q.detach(), k.detach(), v.detach(), o, tau, lse, topk, scale, *needs))


@pytest.mark.parametrize("dtype, layout", [(torch.float32, "bhnd"), (torch.float64, "bnhd")])
def test_opcheck_torch(dtype, layout):
    q, k, v = (t.transpose(1, 2) if layout == "bnhd" else t
               for t in make_inputs(2, 2, 7, 9, 8, 5, dtype=dtype, layout=layout))
    _opcheck("torch", q, k, v, 4, 0.3, ([True, True, True], [False, True, False], [True, False, True]))


def test_opcheck_triton():
    """Through the Triton interpreter (opcheck runs the op a dozen times: tiny shapes)."""
    q, k, v = (t.transpose(1, 2) for t in make_inputs(1, 2, 5, 6, 4, 3, dtype=torch.float32, layout="bnhd"))
    _opcheck("triton", q, k, v, 3, 0.5, ([True, True, True], [False, True, True]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) traces knn_attention without a graph break and matches eager."""
    torch._dynamo.reset()
    q, k, v = make_inputs(1, 2, 8, 10, 8, 8, dtype=torch.float64)

    def fn(q, k, v):
        return knn_attention(q, k, v, 4, layout="bhnd", backend=backend) * 2.0

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    want = fn(q, k, v)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    do = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(want, (q, k, v), do)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_bf16(backend):
    """Under CPU autocast (bf16) the op runs in bf16 and meets the rule against the float64 reference."""
    q, k, v = make_inputs(1, 2, 12, 12, 8, 8, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = knn_attention(q, k, v, 5, backend=backend)
    assert out.dtype == torch.bfloat16
    dq = torch.autograd.grad(out.float().sum(), q)[0]
    assert dq.dtype == torch.float32
    low = [t.detach().to(torch.bfloat16) for t in (q, k, v)]
    ref = knn_attention(*(t.double() for t in low), 5, backend="reference")
    plain = knn_attention(*low, 5, backend="reference")
    assert_rule("out", out, ref, plain, torch.bfloat16)


def test_double_backward_is_a_clear_error():
    q, k, v = make_inputs(1, 1, 5, 6, 4, 4, dtype=torch.float64)
    out = knn_attention(q, k, v, 3, backend="torch")
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dq.sum().backward()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_reduce_overhead_matches_eager(backend):
    """torch.compile(mode="reduce-overhead") (CUDA graphs on a GPU; plain compile on a CPU) traces the op
    with no graph break and matches eager, gradients included."""
    inputs = tuple(make_inputs(1, 2, 8, 10, 8, 8, dtype=torch.float32))
    check_reduce_overhead_compile(lambda q, k, v: knn_attention(q, k, v, 4, backend=backend) * 2.0, inputs)
