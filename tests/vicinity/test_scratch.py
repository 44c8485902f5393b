"""The CPU scratch cache of the torch backend: reuse never changes a result, never aliases an output
or a saved tensor, respects its limit, and keeps threads apart."""
import threading

import pytest
import torch

import vicinity_attn
from tests.helpers import check_against_reference, make_inputs, outputs_and_grads, token_counts
from vicinity_attn.vicinity import scratch as scratch_mod

GRID, KV_GRID = (6, 5), (4, 3)


@pytest.fixture(autouse=True)
def _restore_limit():
    limit = vicinity_attn.cpu_scratch_limit()
    yield
    vicinity_attn.set_cpu_scratch_limit(limit)
    vicinity_attn.clear_cpu_scratch()


def _run(q, k, v, do, **kw):
    return [t.detach().clone() for t in outputs_and_grads(q, k, v, do, backend="torch", **kw)]


@pytest.mark.parametrize("prefix", [0, 2])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_cached_equals_uncached_bitwise(prefix, layout):
    Nq, Nk = token_counts(GRID, KV_GRID, prefix)
    q, k, v = make_inputs(2, 3, Nq, Nk, 8, 5, dtype=torch.float32, layout=layout)
    do = torch.randn(q.shape[:-1] + (5,))
    kw = dict(grid=GRID, kv_grid=KV_GRID, num_prefix_tokens=prefix, layout=layout)
    vicinity_attn.set_cpu_scratch_limit(0)
    uncached = _run(q, k, v, do, **kw)
    assert vicinity_attn.cpu_scratch_bytes() == 0
    vicinity_attn.set_cpu_scratch_limit(64 * 2 ** 20)
    first = _run(q, k, v, do, **kw)
    assert vicinity_attn.cpu_scratch_bytes() > 0
    second = _run(q, k, v, do, **kw)
    for a, b, c in zip(uncached, first, second):
        assert torch.equal(a, b) and torch.equal(b, c)


def test_outputs_and_saved_tensors_survive_later_calls():
    """A second call with other inputs reuses the scratch; the first call's output and its pending
    backward (which reads the saved tensors) must be unaffected."""
    Nq, Nk = token_counts(GRID, KV_GRID)
    q1, k1, v1 = make_inputs(2, 2, Nq, Nk, 8, 8, dtype=torch.float32)
    q2, k2, v2 = make_inputs(2, 2, Nq, Nk, 8, 8, dtype=torch.float32)
    do = torch.randn(2, 2, Nq, 8)
    expected = _run(q1, k1, v1, do, grid=GRID, kv_grid=KV_GRID)
    o1 = vicinity_attn.vicinity_attention(q1, k1, v1, GRID, KV_GRID, backend="torch")
    o1_copy = o1.detach().clone()
    o2 = vicinity_attn.vicinity_attention(q2, k2, v2, GRID, KV_GRID, backend="torch")
    torch.autograd.grad(o2, (q2, k2, v2), do)        # the other call's backward also uses the scratch
    assert torch.equal(o1.detach(), o1_copy)
    grads1 = torch.autograd.grad(o1, (q1, k1, v1), do)
    for got, want in zip(grads1, expected[1:]):
        assert torch.equal(got, want)


def test_growing_and_shrinking_shapes_and_dtypes_stay_correct():
    vicinity_attn.set_cpu_scratch_limit(64 * 2 ** 20)
    for grid, B, D, dtype in [((3, 4), 1, 4, torch.float64), ((9, 8), 2, 16, torch.float64),
                              ((3, 4), 1, 4, torch.float64), ((5, 5), 2, 8, torch.float32),
                              ((9, 8), 1, 16, torch.float64)]:
        Nq, Nk = token_counts(grid)
        q, k, v = make_inputs(B, 2, Nq, Nk, D, D, dtype=dtype)
        check_against_reference(q, k, v, grid=grid, backend="torch")


def test_limit_bounds_the_memory_kept():
    Nq, Nk = token_counts(GRID)
    q, k, v = make_inputs(1, 2, Nq, Nk, 16, 16, dtype=torch.float32)
    vicinity_attn.set_cpu_scratch_limit(64 * 2 ** 20)
    vicinity_attn.vicinity_attention(q, k, v, GRID, backend="torch").sum().backward()
    full = vicinity_attn.cpu_scratch_bytes()
    assert full > 0
    limit = full // 2
    vicinity_attn.set_cpu_scratch_limit(limit)        # lowering below what is held releases it
    assert vicinity_attn.cpu_scratch_bytes() == 0
    vicinity_attn.vicinity_attention(q, k, v, GRID, backend="torch").sum().backward()
    assert 0 < vicinity_attn.cpu_scratch_bytes() <= limit
    vicinity_attn.clear_cpu_scratch()
    assert vicinity_attn.cpu_scratch_bytes() == 0


def test_limit_set_in_one_thread_binds_every_thread():
    """The limit is process-wide: a worker thread that filled its cache keeps nothing above a limit set
    from another thread, from the worker's next call on (that call neither reuses nor keeps buffers)."""
    Nq, Nk = token_counts(GRID)
    q, k, v = make_inputs(1, 2, Nq, Nk, 16, 16, dtype=torch.float32, requires_grad=False)
    want = vicinity_attn.vicinity_attention(q, k, v, GRID, backend="torch")
    held, outputs = [], []
    go, done = threading.Event(), threading.Event()

    def worker():
        outputs.append(vicinity_attn.vicinity_attention(q, k, v, GRID, backend="torch"))
        held.append(vicinity_attn.cpu_scratch_bytes())
        done.set()
        go.wait()
        outputs.append(vicinity_attn.vicinity_attention(q, k, v, GRID, backend="torch"))
        held.append(vicinity_attn.cpu_scratch_bytes())

    before = scratch_mod.cpu_scratch_limit()
    vicinity_attn.set_cpu_scratch_limit(64 * 2 ** 20)
    thread = threading.Thread(target=worker)
    thread.start()
    done.wait()
    try:
        vicinity_attn.set_cpu_scratch_limit(0)   # from this (main) thread
    finally:
        go.set()
        thread.join()
        vicinity_attn.set_cpu_scratch_limit(before)
    assert held[0] > 0 and held[1] == 0, held
    assert all(torch.equal(o, want) for o in outputs)


def test_inference_mode_then_training():
    Nq, Nk = token_counts(GRID)
    q, k, v = make_inputs(1, 2, Nq, Nk, 8, 8, dtype=torch.float64)
    with torch.inference_mode():
        vicinity_attn.vicinity_attention(q.detach(), k.detach(), v.detach(), GRID, backend="torch")
    check_against_reference(q, k, v, grid=GRID, backend="torch")


def test_threads_keep_separate_buffers():
    Nq, Nk = token_counts(GRID, KV_GRID)
    cases = [make_inputs(2, 2, Nq, Nk, 8, 8, dtype=torch.float64, requires_grad=False) for _ in range(4)]
    expected = [vicinity_attn.vicinity_attention(*c, GRID, KV_GRID, backend="torch") for c in cases]
    got: dict[int, list[torch.Tensor]] = {}
    barrier = threading.Barrier(len(cases))

    def work(i):
        barrier.wait()
        got[i] = [vicinity_attn.vicinity_attention(*cases[i], GRID, KV_GRID, backend="torch") for _ in range(20)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, want in enumerate(expected):
        assert all(torch.equal(o, want) for o in got[i])


def test_bad_limits_are_rejected(monkeypatch):
    for bad in (-1, 1.5, "10", True):
        with pytest.raises(ValueError, match="nbytes"):
            vicinity_attn.set_cpu_scratch_limit(bad)
    monkeypatch.setenv("VICINITY_ATTN_CPU_SCRATCH_MB", "lots")
    with pytest.raises(ValueError, match="VICINITY_ATTN_CPU_SCRATCH_MB"):
        scratch_mod._limit_from_env()
    monkeypatch.setenv("VICINITY_ATTN_CPU_SCRATCH_MB", "-3")
    with pytest.raises(ValueError, match="VICINITY_ATTN_CPU_SCRATCH_MB"):
        scratch_mod._limit_from_env()
    monkeypatch.setenv("VICINITY_ATTN_CPU_SCRATCH_MB", "1.5")
    assert scratch_mod._limit_from_env() == int(1.5 * 2 ** 20)
