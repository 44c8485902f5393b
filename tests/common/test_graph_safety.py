"""The dense paths are safe to capture in a CUDA graph (and under torch.compile(mode="reduce-overhead")):
forward and backward of every operation make no device-to-host read (``.item()``, ``bool(t)``,
``.tolist()``, ``.cpu()``, ``.numpy()``) and produce no data-dependent shape (``nonzero``,
``masked_select``, ``unique``, boolean-mask indexing). Checked on the CPU, where the same Python runs:
aten ops are recorded by the profiler (which does not change the call's path), the Python-level reads
by spies. The triton backend runs in the interpreter, whose own copies to NumPy are not the call's."""
from __future__ import annotations

import os

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from vicinity_attn import knn_attention, vicinity_attention
from vicinity_attn.common import feature_maps

# aten ops that read device data on the host or size their output by it.
HOST_READS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::nonzero_static",
              "aten::masked_select", "aten::unique_consecutive", "aten::_unique2", "aten::unique_dim"}
PY_READS = ("item", "tolist", "cpu", "numpy", "__bool__")


@pytest.fixture
def python_reads(monkeypatch):
    """Counts the Python-level host reads made outside the Triton interpreter."""
    import traceback
    seen: list[str] = []

    def spy(name, original):
        def method(self, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            if f"{os.sep}triton{os.sep}" not in caller.filename:     # the interpreter's own copies
                seen.append(f"{name} from {caller.filename}:{caller.lineno}")
            return original(self, *args, **kwargs)
        return method

    for name in PY_READS:
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    return seen


def _aten_reads(fn) -> list[str]:
    """The host reads among the aten ops ``fn`` runs; not those inside ``_assert_async``, which reads on
    a CPU but asserts on the device, without a read, on a GPU."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({e.name for e in prof.events() if e.name in HOST_READS and not _inside_assert_async(e)})


def _inside_assert_async(event) -> bool:
    while event is not None:
        if event.name.startswith("aten::_assert_async"):
            return True
        event = event.cpu_parent
    return False


CALLS = {   # q, k, v: 25 tokens (a prefix token and a 4 x 6 grid)
    "vicinity-sum": lambda q, k, v, backend: vicinity_attention(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], (4, 6),
                                                                backend=backend),
    "vicinity-product-prefix-cross": lambda q, k, v, backend: vicinity_attention(
        q, k[:, :, :13], v[:, :, :13], (4, 6), (3, 4), variant="product", num_prefix_tokens=1, backend=backend),
    "vicinity-floor": lambda q, k, v, backend: vicinity_attention(q, k, v, (4, 6), den_floor=2.0, num_prefix_tokens=1,
                                                                  backend=backend),
    "vicinity-clamp": lambda q, k, v, backend: vicinity_attention(q, k, v, (4, 6), clamp=(1e-4, 1e4),
                                                                  num_prefix_tokens=1, backend=backend),
    "vicinity-causal-floor-clamp": lambda q, k, v, backend: vicinity_attention(
        q, k, v, (4, 6), den_floor=2.0, clamp=(1e-4, 1e4), num_prefix_tokens=1, causal="frames", backend=backend),
    "knn": lambda q, k, v, backend: knn_attention(q, k, v, 7, backend=backend),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("call", list(CALLS))
def test_dense_forward_and_backward_read_nothing_back(call, backend, python_reads, monkeypatch):
    # What a GPU tensor takes: CPU tensors may read values back for free (feature_maps.host_reads_are_free).
    monkeypatch.setattr(feature_maps, "host_reads_are_free", lambda t: False)
    q, k, v = (torch.randn(2, 2, 25, 8, requires_grad=True) for _ in range(3))
    do = torch.randn(2, 2, 25, 8)

    def step():
        o = CALLS[call](q, k, v, backend)
        torch.autograd.grad(o, (q, k, v), do[:, :, :o.shape[2]])

    step()                       # first call: plans and caches filled
    python_reads.clear()
    assert _aten_reads(step) == []
    assert python_reads == []


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_varlen_reads_nothing_back_when_asked(backend, python_reads, monkeypatch):
    """vicinity_attention_varlen with check_cu_seqlens_on_host=False: the offsets are checked on the device,
    nothing is read back (the default reads cu_seqlens once, for a clear error)."""
    from vicinity_attn import vicinity_attention_varlen
    monkeypatch.setattr(feature_maps, "host_reads_are_free", lambda t: False)
    grids = [(2, 3), (3, 2), (2, 2)]
    cu = torch.tensor([0, 6, 12, 16], dtype=torch.int32)
    q, k, v = (torch.randn(16, 2, 8, requires_grad=True) for _ in range(3))

    def step(host_check):
        o = vicinity_attention_varlen(q, k, v, cu, cu, grids, backend=backend, check_cu_seqlens_on_host=host_check)
        torch.autograd.grad(o, (q, k, v), torch.ones_like(o))

    step(False)
    python_reads.clear()
    reads = _aten_reads(lambda: step(False))
    assert reads == [] and python_reads == []
    python_reads.clear()
    step(True)
    assert python_reads, "the default check reads cu_seqlens back"
    with pytest.raises(RuntimeError):   # the device-side check still catches a bad cu_seqlens
        bad = torch.tensor([0, 5, 12, 16], dtype=torch.int32)
        vicinity_attention_varlen(q, k, v, bad, cu, grids, backend=backend, check_cu_seqlens_on_host=False)
