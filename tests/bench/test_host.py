"""The host-overhead benchmark (bench.host) end to end at a tiny budget, the GPU model's eager term, and the
CPU layer benchmark (bench.cpu_layers) at one round."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.gpu_model import add_host_term, eager_timeline
from tests.helpers import REPO


def test_host_benchmark_counts_the_launches_and_writes_json(tmp_path):
    out = tmp_path / "host.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-m", "bench", "--host", "--shapes", "c,k", "--budget-seconds", "0.2",
                           "--json", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    row = result["shapes"]["c"]
    modes = row["modes"]
    # Shape c (bf16, D = 32, sum on 14 x 14): state pass + output pass forward; the fused query pass
    # and the key pass backward on the sm_90 plan the stub binds for.
    assert modes["fwd"]["kernels"] == ["state_partial_kernel", "output_pass_kernel"]
    assert modes["bwd"]["kernels"] == ["query_pass_kernel", "key_pass_kernel"]
    assert modes["fwdbwd"]["launches"] == 4
    knn = result["shapes"]["k"]["modes"]
    assert knn["fwd"]["kernels"] == ["knn_threshold_kernel", "knn_forward_kernel"]
    assert knn["bwd"]["kernels"] == ["row_delta_kernel", "knn_dq_kernel", "knn_dkdv_kernel"]
    assert knn["fwd"]["module_attention_us"] is None
    for name, shape in result["shapes"].items():
        for mode in shape["modes"].values():
            assert mode["public_us"] > 0 and mode["backend_us"] > 0 and mode["launchers_us"] > 0
            assert shape["bare_launch_us"] > 0
            assert mode["public_vs_launches"] == pytest.approx(mode["public_us"] / mode["launches_x_bare_us"])
    assert "public" in proc.stdout and ("met" in proc.stdout or "MISSED" in proc.stdout)


def test_host_benchmark_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "bench.host", "--json", ""], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "TRITON_INTERPRET" in proc.stderr


def test_eager_timeline():
    assert eager_timeline(300.0, [10.0, 10.0, 10.0]) == 310.0          # host-bound: the last launch + its kernel
    assert eager_timeline(30.0, [100.0, 100.0, 100.0]) == 310.0        # GPU-bound: first issue + the kernels
    assert eager_timeline(500.0, [1.0]) == 501.0


def test_add_host_term_only_where_measured():
    shapes = {name: {d: {"modelled_us": 50.0, "kernels": [{"modelled_us": 25.0}, {"modelled_us": 25.0}]}
                     for d in ("fwd", "fwdbwd")} for name in ("a", "b")}
    host = {"shapes": {"a": {"modes": {"fwd": {"public_us": 200.0}, "fwdbwd": {"public_us": 400.0}}}}}
    add_host_term(shapes, host)
    assert shapes["a"]["fwd"]["eager_us"] == 225.0 and shapes["a"]["fwd"]["host_bound"]
    assert shapes["a"]["fwdbwd"]["eager_us"] == 425.0
    assert "eager_us" not in shapes["b"]["fwd"]


def test_cpu_layer_benchmark_writes_its_ratios(tmp_path):
    from bench import cpu_layers
    out = tmp_path / "layers.json"
    assert cpu_layers.main(["--rounds", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"vit-8x8", "vvt-7x7", "vvt-clip-112x112"}
    for row in rows.values():
        ours, base = (row["vicinity_ms"], row["softmax_ms"]) if row["kind"] == "small" else (row["clip_ms"],
                                                                                             row["no_clip_ms"])
        assert ours > 0 and base > 0 and row["ratio"] == pytest.approx(ours / base)
        assert row["meets_target"] == (row["ratio"] <= row["target"])
