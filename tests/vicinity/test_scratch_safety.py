"""The CPU scratch cache under re-entry and a malformed environment variable.

Re-entry: a call that starts while another is in flight on the same thread (a signal handler, a
hook) must not write into the outer call's temporaries. The nested call is triggered
deterministically from inside the outer one by wrapping a helper of the torch backend.
"""
import signal
import subprocess
import sys

import pytest
import torch

import vicinity_attn
from tests.helpers import make_inputs, token_counts
from vicinity_attn.common.spec import VicinitySpec
from vicinity_attn.vicinity import scratch as scratch_mod
from vicinity_attn.vicinity import torch_backend

OUTER_GRID, INNER_GRID = (6, 5), (4, 3)   # the inner call is smaller, so the cache would hand it the same memory


@pytest.fixture(autouse=True)
def _cache_on():
    limit = vicinity_attn.cpu_scratch_limit()
    vicinity_attn.set_cpu_scratch_limit(64 * 2 ** 20)
    vicinity_attn.clear_cpu_scratch()
    yield
    vicinity_attn.set_cpu_scratch_limit(limit)
    vicinity_attn.clear_cpu_scratch()


def _inner_call():
    """What a handler might run: a public forward of another shape, and the backend's forward and
    backward (called directly: inside the outer call's custom op, autograd does not record)."""
    Nq, Nk = token_counts(INNER_GRID)
    q, k, v = make_inputs(1, 2, Nq, Nk, 8, 8, dtype=torch.float32, requires_grad=False)
    vicinity_attn.vicinity_attention(q, k, v, INNER_GRID, backend="torch")
    spec = VicinitySpec(grid=INNER_GRID, kv_grid=INNER_GRID)
    o, den, S, z = torch_backend.forward(q, k, v, spec)
    torch_backend.backward(torch.randn_like(o), q, k, v, o, den, S, z, spec)


def _outer_results():
    Nq, Nk = token_counts(OUTER_GRID)
    q, k, v = make_inputs(2, 3, Nq, Nk, 8, 8, dtype=torch.float32)
    do = torch.randn(2, 3, Nq, 8)
    o = vicinity_attn.vicinity_attention(q, k, v, OUTER_GRID, backend="torch")
    grads = torch.autograd.grad(o, (q, k, v), do)
    return [t.detach().clone() for t in (o, *grads)]


def _nest_inside(monkeypatch, run_nested):
    """Every call of the backend's per-coordinate product (forward and backward) first runs
    ``run_nested`` once, while the outer call holds its scratch buffers."""
    original = torch_backend._per_coord
    state = {"depth": 0, "nested": 0}

    def hooked(*args, **kwargs):
        if state["depth"] == 0:
            state["depth"] += 1
            try:
                run_nested()
                state["nested"] += 1
            finally:
                state["depth"] -= 1
        return original(*args, **kwargs)

    monkeypatch.setattr(torch_backend, "_per_coord", hooked)
    return state


def test_nested_call_does_not_corrupt_outer_call(monkeypatch):
    torch.manual_seed(1)
    expected = _outer_results()
    state = _nest_inside(monkeypatch, _inner_call)
    torch.manual_seed(1)
    got = _outer_results()
    assert state["nested"] > 0
    for name, g, e in zip(("o", "dq", "dk", "dv"), got, expected):
        assert torch.equal(g, e), f"{name} changed by a nested call: max diff {(g - e).abs().max().item():.3e}"


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="needs SIGUSR1")
def test_call_from_signal_handler_does_not_corrupt_outer_call(monkeypatch):
    """The issue's scenario: a signal handler runs the attention while a call is in flight."""
    torch.manual_seed(1)
    expected = _outer_results()
    handled = []

    def handler(signum, frame):
        _inner_call()
        handled.append(signum)

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        state = _nest_inside(monkeypatch, lambda: signal.raise_signal(signal.SIGUSR1))
        torch.manual_seed(1)
        got = _outer_results()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert state["nested"] > 0 and len(handled) == state["nested"]
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


def test_nested_session_gets_fresh_memory_and_outer_keeps_cache():
    with scratch_mod.scratch_session():
        outer = scratch_mod.scratch("inputs", 64, torch.float32, torch.device("cpu"))
        assert scratch_mod.scratch("inputs", 64, torch.float32, torch.device("cpu")).data_ptr() == outer.data_ptr()
        with scratch_mod.scratch_session():
            inner = scratch_mod.scratch("inputs", 64, torch.float32, torch.device("cpu"))
            assert inner.data_ptr() != outer.data_ptr()
        assert scratch_mod.scratch("inputs", 64, torch.float32, torch.device("cpu")).data_ptr() == outer.data_ptr()


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "lots", "-3", "1e400"])
def test_bad_env_value_is_named(monkeypatch, raw):
    monkeypatch.setenv(scratch_mod.ENV_VAR, raw)
    with pytest.raises(ValueError, match="VICINITY_ATTN_CPU_SCRATCH_MB"):
        scratch_mod._limit_from_env()


@pytest.mark.parametrize("raw", ["nan", "inf", "garbage", "-1"])
def test_bad_env_value_falls_back_with_a_warning(monkeypatch, raw):
    monkeypatch.setenv(scratch_mod.ENV_VAR, raw)
    with pytest.warns(RuntimeWarning, match=rf"VICINITY_ATTN_CPU_SCRATCH_MB .*{raw!r}.*default"):
        assert scratch_mod._initial_limit() == 256 * 2 ** 20


@pytest.mark.parametrize("raw", ["nan"])
def test_bad_env_value_warns_at_import_and_keeps_default(raw):
    """A fresh interpreter: import succeeds with a RuntimeWarning naming the variable, default kept."""
    code = ("import warnings; warnings.simplefilter('error', RuntimeWarning)\n"
            "try:\n    import vicinity_attn\nexcept RuntimeWarning as w:\n    print('WARNED', w)\n"
            "warnings.simplefilter('ignore')\nimport vicinity_attn\n"
            "print('LIMIT', vicinity_attn.cpu_scratch_limit())\n")
    env = {"VICINITY_ATTN_CPU_SCRATCH_MB": raw, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "WARNED VICINITY_ATTN_CPU_SCRATCH_MB" in out.stdout and repr(raw) in out.stdout, out.stdout
    assert f"LIMIT {256 * 2 ** 20}" in out.stdout
