"""The k-NN benchmark (bench.knn) end to end at a tiny size, and its CPU peak-memory measurement."""
from __future__ import annotations

import torch

from bench.cases import Case
from bench.knn import cpu_peak_allocated_bytes, measure_case, ratios
from bench.providers import make_knn_provider


def test_cpu_peak_sees_a_known_allocation():
    def fn():
        a = torch.empty(1 << 20, dtype=torch.float32)    # 4 MiB
        b = torch.empty(1 << 19, dtype=torch.float32)    # 2 MiB, alive with a
        del a, b
        c = torch.empty(1 << 18, dtype=torch.float32)
        return c
    peak = cpu_peak_allocated_bytes(fn)
    assert 6 * 2 ** 20 <= peak < 7 * 2 ** 20


def test_measure_case_rows_and_ratios():
    rows = measure_case(Case((24,), 1, 2, 8, 8, label="knn"), torch.device("cpu"), torch.float32, 6, budget_s=0.05)
    assert {r["provider"] for r in rows} == {"knn", "knn-authors"}
    for r in rows:
        assert r["median_s"] > 0 and r["peak_bytes"] > 0 and r["saved_bytes"] > 0 and r["topk"] == 6
    rt = ratios(rows)
    assert set(rt) == {"time", "time_min", "peak", "saved"}


def test_providers_agree():
    case = Case((30,), 1, 2, 8, 8)
    q, k, v = (torch.randn(1, 2, 30, 8) for _ in range(3))
    ours = make_knn_provider("knn", case, torch.device("cpu"), torch.float32, 9)
    theirs = make_knn_provider("knn-authors", case, torch.device("cpu"), torch.float32, 9)
    torch.testing.assert_close(ours.fn(q, k, v), theirs.fn(q, k, v), rtol=1e-5, atol=1e-6)
    assert "unknown" in make_knn_provider("knn-x", case, torch.device("cpu"), torch.float32)
