"""The GPU model (bench/gpu_model.py): traffic counted by running one program per launch in the
interpreter, checked against the FLOP formula and tile sizes; the time arithmetic; the generated docs section."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

_REPO = str(Path(__file__).resolve().parents[2])

pytest.importorskip("triton")

import bench.gpu_model as gm  # noqa: E402
from bench.flops import vicinity_forward_flops  # noqa: E402
from bench.gpu_model_doc import BEGIN, END, rewrite_doc  # noqa: E402

INTERPRET = __import__("os").environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.mark.skipif(not INTERPRET, reason="the traffic stage runs the kernels in the Triton interpreter")
def test_traffic_of_one_program_per_launch(monkeypatch):
    # 128 tokens (two 64-token state blocks, one 128-token output tile), D = Dv = 16 (one 16-wide tile):
    # no padding anywhere.
    shape = dict(dtype="bf16", d=16, dv=16, batch=1, heads=2, grid=(8, 16))
    monkeypatch.setitem(gm.SHAPES, "t", shape)
    launches = gm.stage_traffic(["t"])["t"]
    kernels = [x["kernel"] for x in launches]
    # The backward starts with the fused query pass (dq and the state gradients: the model plans for
    # an sm_90 GPU), which computes the row weights itself (no launch of its own), then the key pass.
    assert kernels == ["state_partial_kernel", "output_pass_kernel", "query_pass_kernel", "key_pass_kernel"]
    assert gm._first_bwd(launches) == 2
    query = launches[2]
    assert query["program_bytes"]["read:q_ptr"] == 128 * 16 * 2             # q, once: both token blocks
    assert query["program_bytes"]["read:do_ptr"] == 128 * 16 * 2            # dO, once
    assert query["program_bytes"]["write:dq_ptr"] == 128 * 16 * 2           # dq
    fwd = launches[:gm._first_bwd(launches)]
    flops = sum(x["program_flops"] * math.prod(x["grid"]) for x in fwd)
    # Plus the state pass's z dot: the stacked [F * D, tokens] operand times a 16-wide column block
    # (the token weights in column 0), per head.
    z_dot = 2 * 2 * 128 * (4 * 16) * 16
    assert flops == vicinity_forward_flops(1, 2, 128, 128, 16, 16, n_features=4) + z_dot
    out = launches[kernels.index("output_pass_kernel")]
    # The resident output pass (sm_90): two persistent programs a head, one 64-token block each here.
    assert out["grid"] == [2, 2, 1]
    assert out["program_bytes"]["read:x_ptr"] == 64 * 16 * 2                 # one bf16 q block
    assert out["program_bytes"]["write:out_ptr"] == 64 * 16 * 2              # one bf16 o block
    assert out["program_bytes"]["read:m_ptr"] == 4 * 16 * 16 * 4             # the F fp32 state tiles, once
    assert out["tensor_bytes"]["x_ptr"] >= 2 * 128 * 16 * 2                  # the q tensor (both heads)


@pytest.mark.skipif(not INTERPRET, reason="the traffic stage runs the kernels in the Triton interpreter")
def test_knn_traffic_and_phases(monkeypatch):
    """k-NN attention, 64 tokens (one 64-key tile: the selection holds the row on chip), D = Dv = 16."""
    shape = dict(op="knn", dtype="bf16", d=16, dv=16, batch=1, heads=2, grid=(64,), extra=(("topk", 33),))
    monkeypatch.setitem(gm.SHAPES, "k", shape)
    launches = gm.stage_traffic(["k"])["k"]
    assert [(x["kernel"], x["phase"], x["grid"]) for x in launches] == [
        (kernel, phase, [1, 2, 1]) for kernel, phase in (("knn_threshold_kernel", "fwd"), ("knn_forward_kernel", "fwd"),
                                                         ("row_delta_kernel", "bwd"), ("knn_dq_kernel", "bwd"),
                                                         ("knn_dkdv_kernel", "bwd"))]
    tile = 2 * 64 * 64 * 16     # one [64 x 16] @ [16 x 64] (or [64 x 64] @ [64 x 16]) dot
    # select: q k^T once; forward: q k^T, p v; dq: q k^T, dO v^T, ds k; dk/dv: those and p^T dO, ds^T q
    assert [x["program_flops"] for x in launches] == [tile, 2 * tile, 0, 3 * tile, 4 * tile]
    assert gm._first_bwd(launches) == 2
    fwd = launches[1]
    assert fwd["program_bytes"]["read:q_ptr"] == 64 * 16 * 2 and fwd["program_bytes"]["write:o_ptr"] == 64 * 16 * 2


def _plan(**kw):
    base = dict(role="fwd_state", kernel="k", grid=[264, 1], num_warps=4, regs=100, smem=0, ctas_per_sm=2,
                sass_instructions=1000, main_loop=dict(instructions=100, tensor_core=8, load_bits=256,
                                                       cta_flops_per_iter=1000))
    base.update(kw)
    return base


def test_kernel_time_is_the_largest_floor_plus_launch():
    traffic = dict(program_bytes={"read:x_ptr": 4096, "write:o_ptr": 1024}, program_flops=10_000,
                   tensor_bytes={"x_ptr": 264 * 4096 // 4, "o_ptr": 10 ** 9})
    t = gm.kernel_time(_plan(), traffic)
    chip = gm.H100_SXM
    assert t["main_loop_trips"] == 10 and t["instructions_per_program"] == 1000 + 100 * 9
    assert t["hbm_bytes"] == 264 * 4096 // 4 + 264 * 1024            # x read once from HBM (L2 serves repeats)
    assert t["l2_bytes"] == 264 * (4096 + 1024)
    issue = 2 * 4 * 1900 / (4 * chip["clock_hz"]) * 1e6               # 2 programs on the busiest SM
    assert t["issue_us"] == pytest.approx(issue, rel=1e-3)
    floors = [t["hbm_us"], t["l2_us"], t["tensor_us"], t["issue_us"]]
    assert t["modelled_us"] == pytest.approx(max(floors) + chip["launch_overhead_s"] * 1e6, abs=2e-3)


def test_fa2_model_follows_the_formula():
    case = gm._case("b")
    fwd = gm.fa2_time(case, "fwd")
    n = 224 * 224
    assert fwd["flops"] == 4 * n * n * 64 * 4
    assert gm.fa2_time(case, "fwdbwd")["flops"] == pytest.approx(3.5 * fwd["flops"])
    assert fwd["compute_us"] == pytest.approx(fwd["flops"] / (gm.FA2_FRACTION * 989e12) * 1e6, rel=1e-6)


def test_io_floor_counts_inputs_outputs_and_one_statistic_per_row():
    case = gm._case("b")                                   # B1 H4, 224x224, D = Dv = 64, bf16
    rows, tensor = 4 * 224 * 224, 4 * 224 * 224 * 64 * 2
    fwd, both = gm.io_floor(case, "fwd"), gm.io_floor(case, "fwdbwd")
    assert fwd["bytes"] == 4 * tensor + 4 * rows                  # q, k, v read; o written; den
    assert both["bytes"] == fwd["bytes"] + 7 * tensor + 4 * rows  # q, k, v, dO read; dq, dk, dv written; den
    assert fwd["us"] == pytest.approx(fwd["bytes"] / (0.85 * 3.35e12) * 1e6, rel=1e-4)


def test_combine_rejects_a_plan_the_interpreter_did_not_reproduce():
    plan = {n: [_plan(grid=[4, 1])] for n in gm.SHAPES}
    traffic = {n: [dict(kernel="k", grid=[5, 1, 1], program_bytes={}, program_flops=0, tensor_bytes={})]
               for n in gm.SHAPES}
    with pytest.raises(RuntimeError, match="launched differently"):
        gm.combine(plan, traffic)


def test_readme_section_is_generated_between_markers(tmp_path):
    kernel = dict(role="fwd_state", modelled_us=3.0, bound="issue", programs=8, ctas_per_sm=2)
    entry = dict(modelled_us=5.0, io_floor_us=2.5, vs_io_floor=2.0, hbm_floor_us=1.0, issue_floor_us=2.0, launches=2,
                 fa2_modelled_us=9.0, kernels=[kernel])
    model = dict(command="python -m bench.gpu_model", triton="x", chip=gm.H100_SXM, fa2_fraction_of_peak=0.35,
                 shapes={"a": dict(title="tiny", fwd=entry, fwdbwd=entry)})
    readme = tmp_path / "README.md"
    readme.write_text(f"# t\nbefore\n{BEGIN}\nold text\n{END}\nafter\n")
    rewrite_doc(model, str(readme))
    text = readme.read_text()
    assert "old text" not in text and text.startswith("# t\nbefore\n") and text.endswith(f"{END}\nafter\n")
    table = [line for line in text.splitlines() if line.startswith("| (a)")]
    assert len(table) == 2 and all(line.count("(model)") == 5 and "| 2.00x (model) |" in line for line in table)
    readme.write_text("no markers")
    with pytest.raises(RuntimeError, match="markers"):
        rewrite_doc(model, str(readme))


def test_readme_knn_rows_say_what_fa2_is_and_the_selection_share(tmp_path):
    kernels = [dict(role="knn_select", modelled_us=3.0, bound="issue", programs=8, ctas_per_sm=2),
               dict(role="knn_fwd", modelled_us=1.0, bound="l2", programs=8, ctas_per_sm=1)]
    entry = dict(modelled_us=4.0, io_floor_us=2.0, vs_io_floor=2.0, hbm_floor_us=1.0, issue_floor_us=2.0, launches=2,
                 fa2_modelled_us=9.0, kernels=kernels)
    model = dict(command="python -m bench.gpu_model", triton="x", chip=gm.H100_SXM, fa2_fraction_of_peak=0.35,
                 shapes={"k": dict(title="k-NN tiny", op="knn", fwd=entry, fwdbwd=entry)})
    readme = tmp_path / "README.md"
    readme.write_text(f"{BEGIN}\n{END}\n")
    text = open(rewrite_doc(model, str(readme))).read()
    assert "(k) 75%" in text and "topk = N" in text
