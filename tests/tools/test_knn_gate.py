"""The k-NN kernels in the AOT compile gate (tools.compile_gate, the "knn" matrix; launches
captured by launch_capture's "knn" operation): its quick cases, compiled for real in the session's one
quick-gate run (tests/helpers.py). The full k-NN matrix: ``python -m tools.compile_gate
--ops knn``."""
import pytest

pytest.importorskip("triton")

from tests.helpers import kernels_of, quick_gate_report  # noqa: E402

ROLES = {"knn_select", "knn_fwd", "knn_delta", "knn_dq", "knn_dkdv", "knn_dk", "knn_dv"}


def test_knn_quick_matrix_compiles_without_spills_on_tensor_cores():
    report, log = quick_gate_report()
    kernels = kernels_of(report, "knn")
    assert {r for k in kernels for r in k["roles"]} == ROLES, log[-3000:]
    # both selection paths: the row of scores recomputed per bisection step, and kept on chip
    assert {k["constexprs"]["ROW_ON_CHIP"] for k in kernels if "knn_select" in k["roles"]} == {False, True}
    assert {k["dtype"] for k in kernels} == {"fp16", "bf16", "fp32"}
    bad = [f"{k['kernel']} {k['arch']} {k['cases']}: {k['verdicts']['core']}" for k in kernels if k["verdicts"]["core"]]
    assert not bad, "\n".join(bad)
    for arch, kind in (("sm_80", "HMMA"), ("sm_90a", "HGMMA")):
        dots = [k for k in kernels if k["arch"] == arch and "knn_delta" not in k["roles"]]
        assert dots and all(k["has_dot"] and k["sass"]["kernel"]["tensor_core"] > 0 for k in dots)
        assert any(kind in op for k in dots for op in k["sass"]["kernel"]["tensor_core_kinds"])


def test_knn_aligned_cases_get_wide_tile_accesses():
    report, _ = quick_gate_report()
    aligned = [k for k in kernels_of(report, "knn") if k["aligned"]]
    assert aligned and all(k["verdicts"]["wide_tiles"] == [] for k in aligned), \
        [(k["kernel"], k["arch"], k["verdicts"]["wide_tiles"][:3]) for k in aligned if k["verdicts"]["wide_tiles"]]
