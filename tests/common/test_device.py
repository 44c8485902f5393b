"""The device guard of the triton backends (vicinity_attn.common.device.launch_device): tensors on cuda:1 while
cuda:0 is current must launch on cuda:1. Without a second GPU (or any), checked with a mock: the guard asks
torch.cuda.device for the tensor's device, and both backends (vicinity and k-NN) launch inside it."""
import contextlib

import pytest
import torch

from tests.helpers import interpreting
from vicinity_attn.common import device as device_mod

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="drives the backends with CPU tensors (interpreter)")


class _FakeGuard:
    """Stands in for torch.cuda.device: records the device asked for and whether a launch happens inside."""
    log: list = []
    current = None

    def __init__(self, dev):
        self.dev = dev
        _FakeGuard.log.append(dev)

    def __enter__(self):
        _FakeGuard.current = self.dev

    def __exit__(self, *exc):
        _FakeGuard.current = None


class _CudaLike:
    def __init__(self, index):
        self.device = torch.device("cuda", index)


def test_guard_asks_for_the_tensors_gpu(monkeypatch):
    _FakeGuard.log = []
    monkeypatch.setattr(torch.cuda, "device", _FakeGuard)
    with device_mod.launch_device(_CudaLike(1)):
        assert _FakeGuard.current == torch.device("cuda", 1)
    assert _FakeGuard.log == [torch.device("cuda", 1)] and _FakeGuard.current is None
    for t in (torch.empty(1), torch.empty(1, device="meta")):
        assert isinstance(device_mod.launch_device(t), contextlib.nullcontext)


def _guarded(monkeypatch, module, names):
    """Replaces ``module``'s launch_device by one that records, and ``names`` (the launchers it calls) by
    wrappers that record whether they ran inside the guard, for which tensor's device."""
    seen = []
    real_guard = module.launch_device

    @contextlib.contextmanager
    def guard(t):
        seen.append(("enter", t.device))
        _FakeGuard.current = t.device
        with real_guard(t):
            yield
        _FakeGuard.current = None

    monkeypatch.setattr(module, "launch_device", guard)
    for name in names:
        launcher = getattr(module, name)

        def wrapped(*args, _launcher=launcher, _name=name, **kwargs):
            seen.append((_name, _FakeGuard.current))
            return _launcher(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapped)
    return seen


@needs_interpreter
def test_knn_triton_backend_launches_inside_the_guard(monkeypatch):
    from vicinity_attn.knn import triton_backend
    seen = _guarded(monkeypatch, triton_backend, ("knn_forward", "knn_backward"))
    q, k, v = (torch.randn(1, 2, 12, 8) for _ in range(3))
    o, tau, lse = triton_backend.forward(q, k, v, 4, 8 ** -0.5)
    triton_backend.backward(torch.randn_like(o), q, k, v, o, tau, lse, 4, 8 ** -0.5)
    cpu = torch.device("cpu")
    assert seen == [("enter", cpu), ("knn_forward", cpu), ("enter", cpu), ("knn_backward", cpu)]


@needs_interpreter
def test_vicinity_triton_backend_launches_inside_the_guard(monkeypatch):
    from vicinity_attn.common.spec import VicinitySpec
    from vicinity_attn.vicinity import triton_backend
    seen = _guarded(monkeypatch, triton_backend, ("vicinity_forward", "vicinity_backward"))
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    spec = VicinitySpec(grid=(2, 3), kv_grid=(2, 3))
    o, den, S, z = triton_backend.forward(q, k, v, spec)
    triton_backend.backward(torch.randn_like(o), q, k, v, o, den, S, z, spec)
    cpu = torch.device("cpu")
    assert seen == [("enter", cpu), ("vicinity_forward", cpu), ("enter", cpu), ("vicinity_backward", cpu)]


@pytest.mark.skipif(interpreting() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_knn_launches_on_the_tensors_gpu():   # pragma: no cover - GPU only
    from vicinity_attn import knn_attention
    q, k, v = (torch.randn(1, 2, 40, 16, device="cuda:1") for _ in range(3))
    with torch.cuda.device(0):
        out = knn_attention(q, k, v, 10, backend="triton")
        ref = knn_attention(q, k, v, 10, backend="torch")
    assert out.device == q.device
    assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
