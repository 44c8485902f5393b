"""Smoke tests of the benchmark CLI (``python -m bench``) on tiny shapes, and the correctness of its
``authors`` baseline against the float64 reference. Fast: a few seconds on a CPU."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

# bench/ is not installed with the package (it is run from a checkout: ``python -m bench``), so
# make the repository root importable whatever directory pytest is started from.
_REPO = str(Path(__file__).resolve().parents[2])

from bench.authors import authors_vicinity_attention  # noqa: E402
from bench.cli import main  # noqa: E402
from bench.flops import mode_flops, softmax_forward_flops, vicinity_forward_flops  # noqa: E402
from bench.memory import saved_tensor_bytes  # noqa: E402
from bench.report import fit_exponent  # noqa: E402
from tests.helpers import rel_err  # noqa: E402
from vicinity_attn.common.spec import VicinitySpec  # noqa: E402
from vicinity_attn.vicinity.reference import reference_vicinity_attention  # noqa: E402


@pytest.mark.parametrize("grid,kv_grid,variant", [
    ((3, 5), (3, 5), "sum"),
    ((4, 6), (2, 3), "sum"),        # keys on a coarser grid (the official sr_ratio)
    ((3, 4), (3, 4), "product"),
    ((7,), (7,), "sum"),            # 1-d
    ((2, 3, 2), (2, 3, 2), "sum"),  # 3-d
])
def test_authors_baseline_matches_reference_float64(grid, kv_grid, variant):
    """The baseline computes the same operation as the reference: forward and all three gradients."""
    gen = torch.Generator().manual_seed(0)
    nq, nk = math.prod(grid), math.prod(kv_grid)
    q = torch.randn(2, 3, nq, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, nk, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, nk, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    spec = VicinitySpec(grid=grid, kv_grid=kv_grid, variant=variant)
    ref = reference_vicinity_attention(q, k, v, spec)
    out = authors_vicinity_attention(q, k, v, grid, kv_grid, variant=variant)
    assert out.shape == ref.shape and out.dtype == torch.float64
    assert rel_err(out, ref) < 1e-12
    dout = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    g_ref = torch.autograd.grad(ref, (q, k, v), dout)
    g_out = torch.autograd.grad(out, (q, k, v), dout)
    for name, a, b in zip("qkv", g_out, g_ref):
        assert rel_err(a, b) < 1e-11, f"d{name} differs"


def test_authors_baseline_gradcheck():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 6, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: authors_vicinity_attention(a, b, c, (2, 3)), (q, k, v))


def test_cli_quick_tiny_shapes_json_and_plot(tmp_path, capsys):
    out = tmp_path / "r.json"
    plot = tmp_path / "r.png"
    rc = main(["--grids", "4,6", "--heads", "2", "--dim", "8",
               "--providers", "vicinity,vicinity-torch,authors,flash,sdpa-math",
               "--budget-seconds", "0.02", "--out", str(out), "--plot", str(plot), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "No GPU timings are measured" in text
    # On a CPU "vicinity" is the torch backend: the duplicate is skipped, and the reason is printed.
    assert "same implementation as 'vicinity'" in text
    data = json.loads(out.read_text())
    env = data["environment"]
    for key in ("device", "torch", "triton", "torch_threads", "cpu_model", "gpu_measured"):
        assert key in env
    assert "4*N*F*D*Dv" in data["flop_formula"]
    rows = data["rows"]
    assert len(rows) == 2 * 5 * 3  # grids x providers x modes
    for r in rows:
        assert (r["median_ms"] is None) != (r["skipped"] is None), r
        if r["median_ms"] is not None:
            assert r["median_ms"] > 0 and r["flops_per_s"] > 0 and r["saved_bytes"] > 0
    measured = {(r["provider"], r["mode"]) for r in rows if r["median_ms"] is not None}
    for p in ("vicinity", "authors", "flash", "sdpa-math"):
        for m in ("fwd", "bwd", "fwdbwd"):
            assert (p, m) in measured
    flash_rows = [r for r in rows if r["provider"] == "flash" and r["median_ms"] is not None]
    assert all(r["speedup_vs_flash"] == pytest.approx(1.0) for r in flash_rows)
    assert all(r["label"] == "sdpa-cpu (flash-style)" for r in flash_rows)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in text
    else:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_skips_with_reason_and_still_writes(tmp_path, capsys):
    """A time budget nothing fits into: every row is skipped, each with its reason printed."""
    out = tmp_path / "r.json"
    assert main(["--grids", "4", "--providers", "authors,flash", "--modes", "fwd", "--max-call-seconds", "1e-12",
                 "--out", str(out), "--plot", "", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert text.count("per call > --max-call-seconds") == 2
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and all(r["skipped"] for r in rows)


def test_cli_rejects_unknown_provider():
    with pytest.raises(SystemExit):
        main(["--providers", "nope", "--out", ""])


def test_saved_tensor_bytes_counts_each_storage_once():
    x = torch.randn(100, requires_grad=True)
    y = torch.randn(100, requires_grad=True)
    nbytes, count = saved_tensor_bytes(lambda: x * y)
    assert nbytes == 2 * 100 * 4 and count == 2
    nbytes, count = saved_tensor_bytes(lambda: x * x)  # x saved twice, one storage
    assert nbytes == 100 * 4 and count == 2


def test_flop_formulas_and_fit():
    assert vicinity_forward_flops(1, 1, 10, 10, 8, 8, 4) == 4 * 10 * 4 * 8 * 8
    assert softmax_forward_flops(1, 1, 10, 10, 8, 8) == 4 * 10 * 10 * 8
    assert mode_flops(1.0, "linear", "fwdbwd") == 3.0
    assert mode_flops(1.0, "softmax", "bwd") == 2.5
    ns = [100, 400, 1600]
    assert fit_exponent(ns, [3e-6 * n ** 1.2 for n in ns]) == pytest.approx(1.2)


def test_other_cpu_use_excludes_own_time(monkeypatch):
    """Machine busy time minus this process's own CPU time, over wall time; warns above 0.25 cores."""
    import bench.env as env_mod
    clock = {"busy": 100.0, "own": 10.0, "wall": 1000.0}
    monkeypatch.setattr(env_mod, "_busy_cpu_seconds", lambda: clock["busy"])
    monkeypatch.setattr(env_mod, "_own_cpu_seconds", lambda: clock["own"])
    monkeypatch.setattr(env_mod.time, "perf_counter", lambda: clock["wall"])
    with env_mod.OtherCpuUse() as quiet:
        clock.update(busy=104.0, own=13.9, wall=1002.0)     # 4 s busy, 3.9 s of it ours, over 2 s
    assert quiet.cores == pytest.approx(0.05) and quiet.warning() is None
    with env_mod.OtherCpuUse() as loud:
        clock.update(busy=108.0, own=15.0, wall=1004.0)     # 4 s busy, 1.1 s ours, over 2 s
    assert loud.cores == pytest.approx(1.45) and "1.45 CPU cores" in loud.warning()
    monkeypatch.setattr(env_mod, "_busy_cpu_seconds", lambda: None)
    with env_mod.OtherCpuUse() as unknown:
        pass
    assert unknown.cores is None and unknown.warning() is None


def test_busy_cpu_seconds_reads_proc_stat():
    import bench.env as env_mod
    first = env_mod._busy_cpu_seconds()
    if first is None:
        pytest.skip("no /proc/stat on this system")
    sum(i * i for i in range(200_000))
    assert env_mod._busy_cpu_seconds() >= first > 0


@pytest.mark.parametrize("argv,what", [
    (["--grids", "28x"], "--grids"),
    (["--grids", "0"], "--grids"),
    (["--modes", "fwd,nope"], "--modes"),
    (["--heads", "-2"], "--heads"),
    (["--model", "--resolutions", "100"], "--resolutions"),
    (["--model", "--attentions", "nope"], "--attentions"),
])
def test_cli_bad_option_is_one_line_error(argv, what, capsys):
    """A bad option ends with exit status 2 and one line on stderr naming the option (no traceback)."""
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--out", "", "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and what in err and "Traceback" not in err, err


def test_help_has_no_internal_jargon_and_states_quick_run_time(capsys):
    from bench.cli import QUICK_RUN_TIME, build_parser
    text = " ".join(build_parser().format_help().split())
    assert "issue" not in text.lower()
    assert QUICK_RUN_TIME in text
    readme = " ".join((Path(_REPO) / "README.md").read_text(encoding="utf-8").split())
    assert QUICK_RUN_TIME in readme, "README and --help disagree on the quick run time"


def test_table_labels_skipped_rows_like_measured_ones_and_flags_noise(tmp_path, capsys):
    """Skipped rows carry the provider's label (not its command-line name); a noisy row is marked."""
    from bench.report import format_table
    base = {"case": "8x8 B1 H1 D8", "n": 64, "flops_per_s": 1e9, "speedup_vs_flash": None, "saved_bytes": 0,
            "peak_bytes": None}
    rows = [dict(base, mode="fwd", provider="flash", label="sdpa-cpu (flash-style)", skipped=None,
                 median_ms=1.0, rel_iqr=0.6, noisy=True),
            dict(base, mode="bwd", provider="flash", label="sdpa-cpu (flash-style)", skipped="too slow",
                 median_ms=None, rel_iqr=None, noisy=None)]
    env = {"gpu_measured": False, "cpu_model": "x", "torch_threads": 1, "torch": "t", "triton": "t",
           "flash_attn": None}
    text = format_table(rows, env)
    assert "60% noisy" in text and "1 row(s) marked noisy" in text
    squeezed = " ".join(text.split())
    assert "bwd sdpa-cpu (flash-style) 64 skipped" in squeezed and "bwd flash" not in squeezed
    assert "8x8 B1 H1 D8 bwd sdpa-cpu (flash-style): too slow" in text


@pytest.mark.parametrize("attention", ["vicinity", "softmax", "authors"])
def test_model_backbone_training_step(attention):
    """The VVT-tiny-shaped backbone runs a training step at a small resolution with every attention;
    the three differ in the attention core only (same parameters)."""
    from bench.backbone import build_backbone
    torch.manual_seed(0)
    model = build_backbone(attention)
    reference_keys = set(build_backbone("vicinity").state_dict())
    assert set(model.state_dict()) == reference_keys
    images = torch.randn(2, 3, 64, 64)
    logits = model(images)
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 2])).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() > 0 for g in grads) > 0.9 * len(grads)


def test_model_sweep_skips_beyond_the_step_limit(monkeypatch):
    """Once a resolution is estimated over the step limit, that attention's larger ones are skipped with
    the reason; a failed point stops its attention too."""
    import bench.backbone as backbone_mod
    calls = []

    def fake_worker(attention, res, device, batch, budget_s, threads, timeout_s):
        calls.append((attention, res))
        if attention == "authors" and res == 320:
            return {"skipped": "failed: boom"}
        scale = (res / 224) ** (4 if attention == "softmax" else 2)
        return {"step_s": 1.0 * scale, "cpu_step_s": 0.9 * scale, "peak_bytes": 1e8 * (res / 224) ** 2}

    monkeypatch.setattr(backbone_mod, "_run_worker", fake_worker)
    monkeypatch.setattr(backbone_mod, "_available_bytes", lambda device: 1e12)
    rows = backbone_mod.run_model_sweep(["vicinity", "softmax", "authors"], [224, 320, 448, 640], "cpu",
                                     max_step_s=10.0, progress=False)
    by = {(r["attention"], r["resolution"]): r for r in rows}
    assert all(not by[("vicinity", r)]["skipped"] for r in (224, 320, 448, 640))
    # softmax: 1, 4.2, 16 s ...: 448 is estimated over 10 s from 224 and 320 and skipped, as is 640.
    assert by[("softmax", 448)]["skipped"].startswith("estimated") and by[("softmax", 640)]["skipped"]
    assert ("softmax", 448) not in calls
    assert by[("authors", 320)]["skipped"] == "failed: boom"
    assert by[("authors", 448)]["skipped"] == "a smaller resolution failed" and ("authors", 448) not in calls
    assert backbone_mod.growth_exponent(rows, "vicinity", "step_s") == pytest.approx(1.0)
    text = backbone_mod.format_model_table(rows, {"device": "cpu", "torch_threads": 1})
    assert "vicinity: step time ~ pixels^1.00" in text and "softmax 448x448: estimated" in text
    assert "2.04x, 2.04x" in text   # softmax / vicinity at 320x320: (320/224)^4 / (320/224)^2


def test_cpu_thread_policy(monkeypatch):
    """Small calls run on one thread; larger ones on the cores other processes left idle (never more than
    torch's setting); VICINITY_ATTN_CPU_THREADS=torch turns it off; the thread count is restored."""
    from vicinity_attn.vicinity import cpu_threads
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv("VICINITY_ATTN_CPU_THREADS", raising=False)
        assert cpu_threads.call_threads(10) == 1
        big = cpu_threads.SMALL_CALL_WORK * 10
        monkeypatch.setattr(cpu_threads._IDLE, "idle", lambda: 0.3)
        assert cpu_threads.call_threads(big) == 1
        monkeypatch.setattr(cpu_threads._IDLE, "idle", lambda: 1.8)
        assert cpu_threads.call_threads(big) == 2
        monkeypatch.setattr(cpu_threads._IDLE, "idle", lambda: 7.0)
        assert cpu_threads.call_threads(big) == 2
        monkeypatch.setattr(cpu_threads._IDLE, "idle", lambda: None)
        assert cpu_threads.call_threads(big) == 2
        monkeypatch.setenv("VICINITY_ATTN_CPU_THREADS", "torch")
        assert cpu_threads.call_threads(10) == 2
        monkeypatch.delenv("VICINITY_ATTN_CPU_THREADS")
        seen = []
        wrapped = cpu_threads.with_call_threads(lambda q, k, v: seen.append(torch.get_num_threads()))
        x = torch.zeros(1, 1, 4, 4)
        wrapped(x, x, x)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    start = (0.0, 100.0, 10.0)
    assert cpu_threads.other_processes_cores(start, (2.0, 104.0, 13.0)) == pytest.approx(0.5)
    assert cpu_threads.other_processes_cores(start, (2.0, None, 13.0)) is None
