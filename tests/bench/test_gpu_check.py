"""bench/gpu_check.py without a GPU: the dry run end to end (every stage, tiny shapes, the interpreter), the
deadline (budget, stage skipping, the hard timer), the report rewritten after every stage, the card
decisions, the per-kernel comparison with the model, and the pytest output parsing."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

import bench.gpu_check as gc

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_without_cuda_it_says_so_and_exits_2(capsys, tmp_path):
    assert gc.main(["--out", str(tmp_path / "x.json")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_unknown_stage_is_an_argument_error(tmp_path):
    with pytest.raises(SystemExit):
        gc.main(["--stages", "device,zz", "--dry-run", "--out", str(tmp_path / "x.json")])


@pytest.mark.skipif(not INTERPRET, reason="the dry run runs the kernels in the Triton interpreter")
def test_dry_run_runs_every_stage_and_writes_json_and_log(tmp_path):
    """The command CI runs: every stage on the CPU at tiny shapes (measured ~45-65 s on a loaded 2-core box)."""
    out = tmp_path / "dry.json"
    t0 = time.perf_counter()
    assert gc.main(["--dry-run", "--out", str(out)]) == 0
    wall = time.perf_counter() - t0
    data = json.loads(out.read_text())
    assert data["dry_run"] and "NO number here is a GPU measurement" in data["label"]
    assert list(data["stages"]) == list(gc.STAGES)
    assert all(s["status"] == "ok" for s in data["stages"].values()), data["summary"]
    corr = data["stages"]["correctness"]
    assert corr["ran"] >= 14 and not corr["failed"] and corr["skipped"] == 0
    items = {i["item"]: i for i in corr["items"]}
    assert items["k-NN fp16"]["kept"]["ok"] and items["(knn197) timed shape bf16"]["kept"]["rows_ok"] == 16
    paths = items["(a) timed shape bf16"]["paths"]          # the interpreter takes the fused query pass
    assert paths["fused_query_pass"] and "query_pass_kernel" in paths["kernels"]
    assert all(i["deterministic"] for i in corr["items"])
    assert items["frame-causal 3d + 1 prefix bf16"]["ok"] and items["(video) timed shape bf16"]["ok"]
    kern = {i["item"]: i for i in data["stages"]["kernels"]["items"]}
    rows = {r["kernel"]: r for r in kern["(b) bf16"]["kernels"]}
    assert "DRY RUN" in kern["(b) bf16"]["method"]
    assert rows["output_pass_kernel"]["measured_us"] > 0 and rows["output_pass_kernel"]["modelled_us"] > 0
    timing = data["stages"]["timings"]["items"][0]["providers"]
    assert isinstance(timing["vicinity[triton]"]["fwdbwd_eager_us"], float)
    assert timing["vicinity[triton]"]["fwd_graph_us"] == "CUDA graphs need CUDA"
    assert "sdpa-flash" in timing and "flash_attn" in timing["flash-attn-2"]["skipped"]
    suite = data["stages"]["suite"]["runs"]
    assert suite[0]["counts"].get("passed", 0) >= 3 and not suite[0]["failed"]
    log = (tmp_path / "dry.txt").read_text()
    assert "correctness: ok" in log and "suite: ok" in log and "done in" in log
    print(f"dry run: {wall:.1f} s")


def test_budget_with_a_fake_clock():
    now = [100.0]
    b = gc.Budget(50, clock=lambda: now[0])
    assert b.elapsed() == 0 and b.left() == 50 and b.allows(50)
    now[0] = 130.0
    assert b.left() == 20 and b.allows(20) and not b.allows(21)


def _fake_ctx(tmp_path, deadline=100.0, clock=None):
    report = gc.Report(str(tmp_path / "r.json"), str(tmp_path / "r.txt"), dict(tool="test"))
    budget = gc.Budget(deadline, clock=clock or time.monotonic)
    return dict(report=report, budget=budget, dry=False, device=torch.device("cpu"))


def test_report_rewritten_after_every_stage_and_errors_recorded(tmp_path, monkeypatch):
    seen = []

    def stage(name, result=None, exc=None):
        def run(ctx):
            # What a kill at this moment would leave: the file as written before this stage started.
            seen.append((name, json.loads((tmp_path / "r.json").read_text())["stages"]))
            if exc:
                raise exc
            return result
        return run
    monkeypatch.setattr(gc, "STAGE_FUNCS", dict(device=stage("device", dict(name="x")),
                                                correctness=stage("correctness", exc=RuntimeError("boom")),
                                                kernels=stage("kernels", dict(status="failed", failed=["k"]))))
    monkeypatch.setattr(gc, "STAGE_MIN_S", dict(device=0, correctness=0, kernels=0))
    ctx = _fake_ctx(tmp_path)
    gc.run_stages(ctx, ["device", "correctness", "kernels"])
    assert seen[1][1]["device"]["status"] == "ok" and seen[1][1]["correctness"]["status"] == "running"
    assert seen[2][1]["correctness"]["status"] == "error" and "boom" in seen[2][1]["correctness"]["error"]
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["stages"]["kernels"]["status"] == "failed"
    s = gc.summary(data)
    assert not s["ok"] and set(s["failed"]) == {"correctness", "kernels"}
    assert "correctness: error" in (tmp_path / "r.txt").read_text()


def test_stages_that_do_not_fit_are_skipped_and_recorded(tmp_path, monkeypatch):
    now = [0.0]
    ran = []

    def stage(name, cost):
        def run(ctx):
            ran.append(name)
            now[0] += cost
        return run
    monkeypatch.setattr(gc, "STAGE_FUNCS", dict(device=stage("device", 1), correctness=stage("correctness", 350),
                                                kernels=stage("kernels", 10), suite=stage("suite", 1)))
    ctx = _fake_ctx(tmp_path, deadline=400, clock=lambda: now[0])
    gc.run_stages(ctx, ["device", "correctness", "kernels", "suite"])
    # 49 s left after correctness: kernels (needs 15) runs; then 39 s: the suite (needs 25) still runs.
    assert ran == ["device", "correctness", "kernels", "suite"]
    now[0] = 0.0
    ran.clear()
    monkeypatch.setattr(gc, "STAGE_FUNCS", dict(gc.STAGE_FUNCS, correctness=stage("correctness", 390)))
    ctx = _fake_ctx(tmp_path, deadline=400, clock=lambda: now[0])
    gc.run_stages(ctx, ["device", "correctness", "kernels", "suite"])
    assert ran == ["device", "correctness"]
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["stages"]["kernels"]["status"] == "skipped" and "deadline" in data["stages"]["suite"]["reason"]


def test_items_stop_at_the_deadline(tmp_path):
    now = [0.0]
    ctx = _fake_ctx(tmp_path, deadline=30, clock=lambda: now[0])
    ctx["report"].data["stages"]["x"] = {}

    def item(it, device):
        now[0] += 10
        return dict(ok=it["name"] != "b")
    got = gc._run_items(ctx, "x", [dict(name=n) for n in "abcd"], item, per_item_s=5)
    entry = ctx["report"].data["stages"]["x"]
    assert got["status"] == "failed" and entry["failed"] == ["b"] and entry["ran"] == 3 and entry["skipped"] == 1
    assert entry["items"][-1] == dict(item="d", skipped="deadline")


def test_hard_deadline_interrupts_and_the_stage_is_marked(tmp_path, monkeypatch):
    def forever(ctx):
        while True:
            time.sleep(0.01)
    monkeypatch.setattr(gc, "STAGE_FUNCS", dict(device=forever))
    ctx = _fake_ctx(tmp_path)
    with pytest.raises(gc.DeadlineExceeded):
        with gc.hard_deadline(0.2):
            gc.run_stages(ctx, ["device"])
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["stages"]["device"]["status"] == "interrupted"


@pytest.mark.parametrize("name,sms,described,chip", [
    ("NVIDIA H100 80GB HBM3", 132, True, "H100 SXM"),
    ("NVIDIA H100 SXM5 80GB", 132, True, "H100 SXM"),
    ("NVIDIA H200", 132, True, "H200"),
    ("NVIDIA H100 PCIe", 114, False, "H100 SXM"),
    ("NVIDIA H100 NVL", 132, False, "H100 SXM"),
    ("NVIDIA A100-SXM4-80GB", 108, False, "H100 SXM"),
])
def test_which_cards_the_model_describes(name, sms, described, chip):
    got = gc.describe_card(name, sms)
    assert got["described"] is described and got["chip"] == chip
    assert ("NOT" in got["note"]) is (not described)


def test_model_rows_retimed_for_the_h200_and_ratios():
    chips = gc.chip_models()
    row = dict(kernel="k1", role="fwd", hbm_bytes=2.0e9, l2_bytes=1.0, tensor_flops=1.0, issue_us=1.0)
    model = dict(shapes=dict(s=dict(fwdbwd=dict(kernels=[row, dict(row, role="bwd", hbm_bytes=0.0)]))))
    h100 = gc.model_rows(model, "s", chips["H100 SXM"])
    h200 = gc.model_rows(model, "s", chips["H200"])
    assert h100[0]["modelled_us"] == pytest.approx(2e9 / (0.85 * 3.35e12) * 1e6 + 2.5)
    assert h200[0]["modelled_us"] < h100[0]["modelled_us"] and h200[1]["modelled_us"] == pytest.approx(3.5)
    table = gc.per_kernel({"k1": (200.0, 4), "memset": (4.0, 2)}, h100[1:] + h100[1:], calls=2)
    k1 = table[0]
    assert k1["kernel"] == "k1" and k1["modelled_launches"] == 2 and k1["launches_per_call"] == 2
    assert k1["measured_us"] == 100.0 and k1["ratio"] == round(100 / 7.0, 2) == k1["old_ratio"]
    assert k1["stall_free_us"] is None and k1["floor_ratio"] is None       # no latency readout: no floor
    assert table[1] == dict(kernel="memset", roles=[], modelled_us=None, old_modelled_us=None, stall_free_us=None,
                            modelled_launches=0, measured_us=2.0, launches_per_call=1.0, ratio=None, old_ratio=None,
                            floor_ratio=None)


def test_model_rows_carry_both_models():
    chips = gc.chip_models()
    row = dict(kernel="k1", role="fwd", hbm_bytes=2.0e9, l2_bytes=1.0, tensor_flops=1.0, issue_us=1.0,
               old_modelled_us=999.0, modelled_us=40.0, h200_modelled_us=30.0)
    model = dict(shapes=dict(s=dict(fwdbwd=dict(kernels=[row]))))
    h100, h200 = (gc.model_rows(model, "s", chips[c])[0] for c in ("H100 SXM", "H200"))
    assert h100["modelled_us"] == 40.0 and h200["modelled_us"] == 30.0
    assert h100["old_modelled_us"] == pytest.approx(2e9 / (0.85 * 3.35e12) * 1e6 + 2.5)   # retimed, not copied
    table = gc.per_kernel({"k1": (100.0, 1)}, [h100], calls=1)
    assert table[0]["ratio"] == 2.5 and table[0]["old_ratio"] == round(100 / h100["old_modelled_us"], 2)


def test_model_rows_carry_the_stall_free_floor_per_chip():
    chips = gc.chip_models()
    latency = dict(issue_us=20.0, smem_us=1.0, hbm_us=12.0, l2_us=2.0, tensor_us=3.0)
    row = dict(kernel="k1", role="fwd", hbm_bytes=2.0e9, l2_bytes=1.0, tensor_flops=1.0, issue_us=1.0,
               old_modelled_us=999.0, modelled_us=40.0, h200_modelled_us=30.0, latency=latency,
               latency_h200=dict(latency, issue_us=10.0))
    model = dict(shapes=dict(s=dict(fwdbwd=dict(kernels=[row, dict(row, role="bwd")]))))
    h100, h200 = (gc.model_rows(model, "s", chips[c]) for c in ("H100 SXM", "H200"))
    assert h100[0]["stall_free_us"] == pytest.approx(20.0 + 2.5)             # issue-bound
    assert h200[0]["stall_free_us"] == pytest.approx(12.0 + 2.5)             # its own readout: HBM-bound
    table = gc.per_kernel({"k1": (90.0, 2)}, h100, calls=1)
    assert table[0]["stall_free_us"] == pytest.approx(45.0) and table[0]["floor_ratio"] == 2.0


def test_pytest_output_parsed_with_spaces_in_ids():
    text = ("tests/a.py::test_x[257-8-D = 257] PASSED   [ 10%]\n"
            "tests/a.py::test_y FAILED\ntests/a.py::test_z SKIPPED (needs two GPUs)   [ 30%]\n"
            "tests/b.py::test_w ERROR\nnoise PASSED\n")
    got = gc.parse_pytest(text)
    assert got["counts"] == dict(passed=1, failed=1, skipped=1, error=1)
    assert got["failed"] == ["tests/a.py::test_y", "tests/b.py::test_w"]


def test_suite_commands_run_the_device_modules_first():
    real = gc.suite_commands(dry=False)
    assert real[0][-len(gc.SUITE_DEVICE_MODULES):] == list(gc.SUITE_DEVICE_MODULES)
    assert "tests" in real[1] and "--ignore=tests/tools" in real[1]
    assert all(os.path.exists(os.path.join(gc.ROOT, m)) for m in gc.SUITE_DEVICE_MODULES)


def test_timed_shapes_are_the_models():
    from bench.gpu_model import SHAPES
    real, dry = gc.timed_shapes(False), gc.timed_shapes(True)
    assert list(real) == list(SHAPES) == list(dry)
    assert real["knn1024"]["topk"] == 512 and real["b"]["grid"] == (224, 224)
    assert real["video"]["op"] == "vicinity" and real["video"]["causal"] == "frames"
    assert "causal" not in real["video-bidir"] and dry["video"]["causal"] == "frames"
    assert all(math_prod(s["grid"]) <= 16 for s in dry.values())


def math_prod(xs):
    out = 1
    for x in xs:
        out *= x
    return out
