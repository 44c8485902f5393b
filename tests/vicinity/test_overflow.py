"""Issue 25, class 3: inputs whose products pass float32's range overflow the linear form's accumulators.
Where the check is free (CPU tensors: the torch backend, the quadratic form, the Triton interpreter) that is
an OverflowError naming the magnitudes, forward and backward, never a NaN output; in range, nothing changes."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import interpreting
from vicinity_attn import vicinity_attention, vicinity_attention_varlen
from vicinity_attn.common import feature_maps, overflow
from vicinity_attn.vicinity import quadratic

BACKENDS = ["torch", "triton"]


def inputs(scale: float, n: int = 64, requires_grad: bool = True):
    torch.manual_seed(0)
    return [(torch.randn(2, 2, n, 16) * scale).requires_grad_(requires_grad) for _ in range(3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quadratic_form", [False, True])
def test_forward_overflow_raises(backend, quadratic_form, monkeypatch):
    if quadratic_form:
        if backend == "triton":
            pytest.skip("the quadratic form is the torch backend's")
        monkeypatch.setattr(quadratic, "MAX_PAIRS", 10 ** 6)
    q, k, v = inputs(1e14)                       # |q| |k| |v| ~ 1e42 * D F: past float32
    with pytest.raises(OverflowError, match=r"forward: the float32 accumulators overflowed \(max \|q\|"):
        vicinity_attention(q, k, v, (8, 8), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_overflow_raises(backend):
    q, k, v = inputs(1e11)                       # forward in range, the gradient of a huge dO is not
    o = vicinity_attention(q, k, v, (8, 8), backend=backend)
    assert o.isfinite().all()
    with pytest.raises(OverflowError, match=r"backward: .*max \|dO\|"):
        torch.autograd.grad(o, (q, k, v), torch.full_like(o, 3e38))


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_calls_raise(backend):
    torch.manual_seed(0)
    cu = torch.tensor([0, 64, 100], dtype=torch.int32)
    q, k, v = ((torch.randn(100, 2, 16) * 1e14).requires_grad_() for _ in range(3))
    with pytest.raises(OverflowError, match="forward"):
        vicinity_attention_varlen(q, k, v, cu, cu, [(8, 8), (6, 6)], backend=backend)
    q, k, v = ((torch.randn(100, 2, 16) * 1e11).requires_grad_() for _ in range(3))
    o = vicinity_attention_varlen(q, k, v, cu, cu, [(8, 8), (6, 6)], backend=backend)
    with pytest.raises(OverflowError, match="backward"):
        torch.autograd.grad(o, (q, k, v), torch.full_like(o, 3e38))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_inputs_propagate_without_an_error(backend):
    q, k, v = inputs(1.0, requires_grad=False)
    v = v.clone()
    v[0, 0, 3, 2] = float("nan")
    o = vicinity_attention(q, k, v, (8, 8), backend=backend)
    assert o.isnan().any() and o.isfinite().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_check_where_it_would_read_back(backend, monkeypatch):
    # A GPU tensor's check would be a device-to-host read: there the result comes back as computed.
    monkeypatch.setattr(feature_maps, "host_reads_are_free", lambda t: False)
    q, k, v = inputs(1e14, requires_grad=False)
    o = vicinity_attention(q, k, v, (8, 8), backend=backend)
    assert not o.isfinite().all()


def test_float64_has_the_range():
    q, k, v = (t.detach().double() for t in inputs(1e14))
    o = vicinity_attention(q, k, v, (8, 8), backend="torch")
    assert o.isfinite().all() and o.abs().max() <= v.abs().max()


@pytest.fixture
def mode():
    """Restores the process-wide overflow-check mode after the test."""
    before = overflow.overflow_check()
    yield overflow.set_overflow_check
    overflow.set_overflow_check(before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mode_always_checks_where_it_would_read_back(backend, mode, monkeypatch):
    monkeypatch.setattr(feature_maps, "host_reads_are_free", lambda t: False)   # as on a GPU
    mode("always")
    q, k, v = inputs(1e14, requires_grad=False)
    with pytest.raises(OverflowError, match="forward"):
        vicinity_attention(q, k, v, (8, 8), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mode_never_returns_the_result_as_computed(backend, mode):
    mode("never")
    q, k, v = inputs(1e14, requires_grad=False)
    assert not vicinity_attention(q, k, v, (8, 8), backend=backend).isfinite().all()


def test_mode_is_validated(mode, monkeypatch):
    with pytest.raises(ValueError, match="set_overflow_check: mode must be one of"):
        mode("sometimes")
    monkeypatch.setattr(overflow, "_mode", None)
    monkeypatch.setenv(overflow.ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match="VICINITY_ATTN_OVERFLOW_CHECK must be one of"):
        overflow.overflow_check()
    monkeypatch.setenv(overflow.ENV_VAR, "never")
    assert overflow.overflow_check() == "never"


@pytest.mark.skipif(not torch.cuda.is_available() or interpreting(), reason="needs a GPU")
def test_mode_always_on_a_gpu(mode):   # pragma: no cover - GPU only
    q, k, v = (t.cuda() for t in inputs(1e14, requires_grad=False))
    mode("free")
    assert not vicinity_attention(q, k, v, (8, 8), backend="triton").isfinite().all()   # returned as computed
    mode("always")
    with pytest.raises(OverflowError, match="forward"):
        vicinity_attention(q, k, v, (8, 8), backend="triton")
