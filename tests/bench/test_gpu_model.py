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
    # Loop trips by loop header line: the resident output program runs its token loop once (one block)
    # and its two feature loops (state loads before the token loop, dots inside it; static_range, so
    # unrolled on a GPU, but loops in the interpreter) F = 4 times; the state program runs its chunk's
    # two 64-token blocks.
    assert sorted(out["back_edges"].values()) == [1, 4, 4]
    assert all(k.startswith("output.py:") for k in out["back_edges"])
    assert list(launches[0]["back_edges"].values()) == [2]


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


@pytest.mark.skipif(not INTERPRET, reason="the traffic stage runs the kernels in the Triton interpreter")
def test_frame_causal_traffic_traces_a_frame_not_the_empty_prefix_slot(monkeypatch):
    """Frame-causal (no prefix tokens: slot 0 is empty): 2 frames of 8 x 16 = 128 tokens, D = Dv = 16. The traced
    program is the first frame's, and only the frames' programs are counted."""
    shape = dict(op="vicinity_causal", dtype="bf16", d=16, dv=16, batch=1, heads=2, grid=(2, 8, 16))
    monkeypatch.setitem(gm.SHAPES, "v", shape)
    launches = gm.stage_traffic(["v"])["v"]
    state = next(x for x in launches if x["kernel"] == "state_partial_kernel")
    assert state["grid"][1] == 3 and state["program"] == [0, 1, 0]            # slots: prefix, frame 0, frame 1
    assert state["active_programs"] == state["grid"][0] * 2
    assert state["program_bytes"]["read:x_ptr"] == 128 * 16 * 2               # the frame's keys
    out = next(x for x in launches if x["kernel"] == "output_pass_kernel")
    per_slot = out["grid"][0] // 3
    assert out["program"] == [per_slot, 0, 0] and out["program_bytes"]["read:x_ptr"] == 128 * 16 * 2 // per_slot
    assert out["active_programs"] == 2 * per_slot * out["grid"][1] * out["grid"][2]
    assert all(x["program"] == [0, 0, 0] and "active_programs" not in x for x in launches
               if x["kernel"] == "slot_scan_kernel")


def test_representative_program_of_frame_causal_launches():
    per_token = dict(FRAMES=True, slot0_len=3, frame_len=200, blocks_per_slot=4, BLOCK_N=64)
    assert gm.representative_program("output_pass_kernel", (12, 8, 1), per_token) == ((4, 0, 0), (1 + 2 * 4) * 8)
    state = dict(FRAMES=True, slot0_len=0, frame_len=200)
    assert gm.representative_program("state_partial_kernel", (16, 5, 1), state) == ((0, 1, 0), 16 * 4)
    assert gm.representative_program("state_partial_kernel", (16, 5, 1), dict(state, slot0_len=2))[1] == 16 * 5
    assert gm.representative_program("output_pass_kernel", (12, 8, 1), dict(BLOCK_N=64)) == (None, None)


def test_fa2_block_causal_counts_the_frames_each_frame_sees():
    video, bidir = gm._case("video"), gm._case("video-bidir")
    assert video.op == "vicinity_causal" and video.grid == bidir.grid == (16, 32, 32)
    assert gm.fa2_work_fraction(video) == 17 / 32 and gm.fa2_work_fraction(bidir) == 1.0
    assert gm.fa2_time(video, "fwd")["flops"] == pytest.approx(17 / 32 * gm.fa2_time(bidir, "fwd")["flops"])
    assert gm.fa2_published_time(video, "fwdbwd", dense=True) == gm.fa2_published_time(bidir, "fwdbwd")
    assert gm.fa2_published_time(video, "fwdbwd")["modelled_us"] < gm.fa2_published_time(bidir, "fwdbwd")["modelled_us"]


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


def _doc_kernel(role, us):
    return dict(role=role, kernel="k", modelled_us=us, h200_modelled_us=us - 0.5, old_modelled_us=us / 2,
                bound="chain", programs=8, regs=100, ctas_per_sm=2,
                main_loop=dict(round_trips=2, barriers=50, wgmma_waits=6, shared_stores={"16": 64, "128": 30}))


def _doc_entry(us, kernels):
    return dict(modelled_us=us, h200_modelled_us=us - 1, old_modelled_us=us / 2, io_floor_us=2.5,
                vs_io_floor=2.0, old_vs_io_floor=1.0, launches=2, fa2_modelled_us=9.0, fa2_old_modelled_us=8.0,
                kernels=kernels)


def test_readme_section_is_generated_between_markers(tmp_path):
    kernel = _doc_kernel("fwd_state", 3.0)
    entry = _doc_entry(5.0, [kernel])
    model = dict(command="python -m bench.gpu_model", triton="x", chip=gm.H100_SXM, fa2_fraction_of_peak=0.35,
                 shapes={"a": dict(title="tiny", fwd=entry, fwdbwd=entry)})
    readme = tmp_path / "README.md"
    readme.write_text(f"# t\nbefore\n{BEGIN}\nold text\n{END}\nafter\n")
    rewrite_doc(model, str(readme))
    text = readme.read_text()
    assert "old text" not in text and text.startswith("# t\nbefore\n") and text.endswith(f"{END}\nafter\n")
    table = [line for line in text.splitlines() if line.startswith("| (a) tiny")]
    assert len(table) == 2 and all(line.count("(model)") == 7 and "| 2.00x (model) |" in line for line in table)
    assert "| (a) | fwd_state | `k` | 8 | 100 | 2 | 2 | 50 | 6 | 128b x 30 16b x 64 | 1.5 | 3.0 | 2.5 | chain |" in text
    readme.write_text("no markers")
    with pytest.raises(RuntimeError, match="markers"):
        rewrite_doc(model, str(readme))


def test_readme_knn_rows_say_what_fa2_is_and_the_selection_share(tmp_path):
    kernels = [_doc_kernel("knn_select", 3.0), _doc_kernel("knn_fwd", 1.0)]
    entry = _doc_entry(4.0, kernels)
    model = dict(command="python -m bench.gpu_model", triton="x", chip=gm.H100_SXM, fa2_fraction_of_peak=0.35,
                 shapes={"k": dict(title="k-NN tiny", op="knn", fwd=entry, fwdbwd=entry)})
    readme = tmp_path / "README.md"
    readme.write_text(f"{BEGIN}\n{END}\n")
    text = open(rewrite_doc(model, str(readme))).read()
    assert "(k) 75%" in text and "topk = N" in text


# ------------------------------------------------------------------------------------------------
# The latency readouts of tools.sass on synthetic SASS, and the latency-aware model's terms

def _sass(text):
    """Instructions from lines of SASS text (one per line, no predicates)."""
    from tools.sass import Instr
    out = []
    for i, line in enumerate(x.strip() for x in text.strip().splitlines()):
        ins = Instr(16 * i, line.split()[0], line, ("k.py", 1))
        ins.target = None
        out.append(ins)
    return out


def test_round_trip_rule_on_synthetic_sass():
    from tools.sass import latency_chain
    # The serialised tile fetch: load -> shared store -> barrier -> wgmma -> wait, then a dependent
    # z load consumed directly: two round trips, one barrier, one wgmma wait, two shared stores.
    body = _sass("""
        LDG.E.128 R4, desc[UR4][R2.64]
        LDG.E.128 R8, desc[UR4][R2.64+0x10]
        FMUL R20, R21, R22
        STS.128 [R30], R4
        STS.U16 [R30+0x10], R8
        BAR.SYNC.DEFER_BLOCKING 0x0
        HGMMA.64x64x16.F32.BF16 R40, R56, gdesc[UR8], R40, gsb0
        WARPGROUP.DEPBAR.LE gsb0, 0x0
        LDG.E R12, desc[UR4][R2.64+0x20]
        FADD R13, R12, R13
    """)
    got = latency_chain(body)
    assert (got["round_trips"], got["pipelined"]) == (2, 0)       # the two tile loads overlap: one trip
    assert got["cover"] == [2, 0] and got["loads"] == 3
    assert (got["barriers"], got["wgmma_waits"]) == (1, 1)
    assert got["shared_stores"] == {128: 1, 16: 1}
    # A pointer chase: the second load's address is the first one's result.
    chase = latency_chain(_sass("LDG.E.64 R4, desc[UR4][R2.64]\nLDG.E R6, desc[UR4][R4.64]\nFADD R7, R6, R6"))
    assert chase["round_trips"] == 2
    # A load consumed in the next iteration is covered by the instructions after it and before its
    # consumer, across the back edge: a body of work early in the body, nothing at its end.
    work = "\n".join(f"FFMA R{20 + i}, R{20 + i}, R1, R1" for i in range(8))
    early = latency_chain(_sass(f"FADD R9, R8, R8\nLDG.E R8, desc[UR4][R2.64]\n{work}"))
    late = latency_chain(_sass(f"FADD R9, R8, R8\n{work}\nLDG.E R8, desc[UR4][R2.64]"))
    assert (early["round_trips"], early["pipelined"], early["cover"]) == (1, 0, [8])
    assert (late["round_trips"], late["pipelined"], late["cover"]) == (1, 0, [0])
    # cp.async: DEPBAR.LE SB0, 1 waits for all but the newest committed group, i.e. the copy of two
    # iterations back, more than a whole body earlier: pipelined.
    cp = latency_chain(_sass(f"DEPBAR.LE SB0, 0x1\nLDGSTS.E.128 [R10], desc[UR4][R2.64]\nLDGDEPBAR\n{work}"))
    assert (cp["round_trips"], cp["pipelined"], cp["loads"]) == (0, 1, 1)
    # Without steady state (straight-line code), an unconsumed load costs nothing.
    assert latency_chain(_sass("LDG.E R8, desc[UR4][R2.64]\nFADD R9, R1, R1"), steady=False)["round_trips"] == 0


def _latency_plan(round_trips=2, cover=0, warps=8, ctas=1, grid=(1056,)):
    chain = dict(round_trips=round_trips, pipelined=0, barriers=4, wgmma_waits=1, shared_stores={16: 8, 128: 2},
                 loads=round_trips, cover=[cover] * round_trips)
    return _plan(grid=list(grid), num_warps=warps, ctas_per_sm=ctas, outside_instructions=200,
                 outside_chain=dict(round_trips=1, pipelined=0, barriers=1, wgmma_waits=0, shared_stores={},
                                    loads=1, cover=[0]),
                 loops=[dict(start=0, parent=None, back_edge="k.py:7", own_instructions=100, chain=chain,
                             main=True)])


def _latency_traffic(program_bytes=4096, size=10 ** 9):
    return dict(program_bytes={"read:x_ptr": program_bytes, "write:o_ptr": 1024}, program_flops=10_000,
                tensor_bytes={"x_ptr": size, "o_ptr": size}, back_edges={"k.py:7": 12})


def test_latency_model_terms_behave():
    plan, traffic = _latency_plan(), _latency_traffic()
    base = gm.latency_time(plan, traffic)
    assert base["loop_trips"] == [12] and base["instructions_per_program"] == 200 + 12 * 100
    assert base["round_trips_per_program"] == 1 + 12 * 2 and base["barriers_per_program"] == 1 + 12 * 4
    # More resident CTAs never make a launch slower, and help a latency-bound one.
    times = [gm.latency_time(plan, traffic, ctas_per_sm=c)["modelled_us"] for c in range(1, 9)]
    assert all(b <= a for a, b in zip(times, times[1:])) and times[-1] < times[0]
    # The H200 is never slower than the H100, and faster where HBM bounds the launch.
    mem_bound = _latency_plan(round_trips=0, grid=(132,)), _latency_traffic(10 ** 8, 10 ** 12)
    for p, t in ((plan, traffic), mem_bound):
        h100, h200 = gm.latency_time(p, t, gm.H100_SXM), gm.latency_time(p, t, gm.H200)
        assert h200["modelled_us"] <= h100["modelled_us"]
    assert gm.latency_time(*mem_bound)["bound"] == "hbm"
    assert gm.latency_time(*mem_bound, gm.H200)["modelled_us"] < gm.latency_time(*mem_bound)["modelled_us"]
    # A round trip covered by enough instructions costs no stall; more round trips cost more.
    covered = gm.latency_time(_latency_plan(cover=10 ** 4), traffic)
    none = gm.latency_time(_latency_plan(round_trips=0), traffic)
    assert covered["stall_cycles_per_program"] == none["stall_cycles_per_program"]
    assert gm.latency_time(_latency_plan(round_trips=4), traffic)["chain_us"] > base["chain_us"]
    # The sustained issue rate is below the peak and falls with fewer warps per scheduler.
    assert gm.issue_rate(2) == gm.issue_rate(8) < 1 and gm.issue_rate(1) == gm.issue_rate(2) / 2


def test_loop_trips_split_between_an_unrolled_loop_and_its_remainder():
    plan = _latency_plan()
    main, rest = (dict(plan["loops"][0], start=s, chain=dict(plan["loops"][0]["chain"], loads=n))
                  for s, n in ((0, 32), (64, 8)))
    plan["loops"] = [main, dict(rest, main=False)]
    traffic = dict(_latency_traffic(), back_edges={"k.py:7": 33})
    assert gm.loop_trips(plan, traffic) == [8, 1]              # 8 x 4 unrolled + 1
    assert gm.loop_trips(plan, dict(traffic, back_edges={})) == [gm.kernel_time(plan, traffic)["main_loop_trips"], 1]


def test_fa2_at_its_published_head_dim_64_rate():
    assert gm.fa2_hdim64_tflops(100, "fwd") == 282 and gm.fa2_hdim64_tflops(10 ** 6, "bwd") == 291
    assert 318 < gm.fa2_hdim64_tflops(3136, "fwd") < 321
    case = gm._case("b")
    fwd, both = gm.fa2_published_time(case, "fwd"), gm.fa2_published_time(case, "fwdbwd")
    n = 224 * 224
    assert fwd["modelled_us"] == pytest.approx(4 * n * n * 64 * 4 / 324e12 * 1e6 + 2.5, rel=1e-4)
    assert both["modelled_us"] == pytest.approx(fwd["modelled_us"] + 2.5 * 4 * n * n * 64 * 4 / 291e12 * 1e6
                                                + 3 * 2.5, rel=1e-4)


def test_issue27_targets_read_from_the_shapes():
    def entry(new, old, launches, fa2=1000.0, ctas=1):
        kernels = [dict(kernel="k", ctas_per_sm=ctas)]
        return dict(modelled_us=new, old_modelled_us=old, vs_io_floor=new / 100, old_vs_io_floor=old / 100,
                    io_floor_us=100.0, fa2_modelled_us=fa2, fa2_old_modelled_us=fa2, launches=launches, kernels=kernels)
    shapes = dict(a=dict(fwdbwd=entry(200.0, 75.0, 6)), b=dict(fwdbwd=entry(140.0, 130.0, 6, ctas=2)),
                  c=dict(fwd=entry(1.0, 1.0, 2), fwdbwd=entry(1.0, 1.0, 6)))
    got = gm.issue27_targets(shapes)
    floor, fa2, launches, ctas = got.values()
    assert (floor["value"], floor["met"]) == (1.4, True)
    assert (fa2["value"], fa2["old"], fa2["met"]) == (5.0, 13.33, False)
    assert (launches["value"], launches["met"]) == (4, False)                   # 2 forward, 4 backward
    assert ctas["value"] == ["k: 1"] and not ctas["met"]


def test_stall_free_floor_and_the_instruction_cut_a_target_needs():
    launch = gm.H100_SXM["launch_overhead_s"] * 1e6

    def kernel(issue, hbm, chain):
        return dict(latency=dict(issue_us=issue, smem_us=1.0, hbm_us=hbm, l2_us=2.0, tensor_us=3.0, chain_us=chain))
    # One issue-bound launch (40 us of issue, 80 us with its stalls), one bound by HBM (25 us).
    kernels = [kernel(40.0, 10.0, 80.0), kernel(20.0, 25.0, 30.0)]
    assert gm.stall_free_floor(kernels) == pytest.approx(40.0 + 25.0 + 2 * launch)
    # Issue time scales as 1 / rate: at the peak (1.0 a cycle) the first launch issues in 25 us.
    assert gm.stall_free_floor(kernels, 1.0) == pytest.approx(25.0 + 25.0 + 2 * launch)
    # A target of 60 us + launches: the first launch must lose a quarter of its instructions (30 us); the
    # second stays HBM-bound whatever its instructions.
    cut = gm.instruction_cut_for(kernels, 55.0 + 2 * launch)
    assert cut == pytest.approx(0.25, abs=1e-6)
    assert gm.instruction_cut_for(kernels, 100.0) == 0.0
    assert gm.instruction_cut_for(kernels, 20.0 + 2 * launch) is None          # below the HBM-bound launch
    entry = dict(modelled_us=150.0, old_modelled_us=70.0, vs_io_floor=1.5, old_vs_io_floor=0.7, fa2_modelled_us=600.0,
                 fa2_old_modelled_us=600.0, io_floor_us=100.0, launches=2, kernels=[
                     dict(k, kernel="k", ctas_per_sm=1) for k in kernels])
    fa2 = gm.issue27_targets(dict(a=dict(fwdbwd=entry)))["VVT stage 1 fwd+bwd >= 10x faster than FlashAttention-2"]
    assert fa2["target_us"] == 60.0 and fa2["stall_free_us"] == pytest.approx(70.0)
    assert fa2["stall_free_at_issue"]["1.0"] == pytest.approx(55.0)
    assert fa2["instruction_cut"] == pytest.approx(0.25, abs=1e-3)          # 60 us = 30 + 25 + 2 launches
