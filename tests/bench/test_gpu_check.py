"""bench/gpu_check.py without a GPU: the message and exit status, argument checks, and the JSON / PNG
it writes with the model's side filled in (measurements left empty and labelled so)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

_REPO = str(Path(__file__).resolve().parents[2])

import bench.gpu_check as gc  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")


def _model(path: Path) -> Path:
    entry = lambda us: dict(modelled_us=us, hbm_floor_us=us / 4, fa2_modelled_us=2 * us, kernels=[])  # noqa: E731
    shapes = {n: dict(title=f"shape {n}", fwd=entry(10.0 + i), fwdbwd=entry(30.0 + i)) for i, n in enumerate(gc.SHAPES)}
    path.write_text(json.dumps(dict(shapes=shapes)))
    return path


def test_without_cuda_it_says_so_and_exits_2(capsys, tmp_path):
    assert gc.main(["--out-dir", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_unknown_shape_is_an_argument_error(tmp_path):
    with pytest.raises(SystemExit):
        gc.main(["--shapes", "a,zz", "--dry-run", "--out-dir", str(tmp_path)])


def test_dry_run_writes_json_and_png_with_the_model_side(tmp_path):
    model = _model(tmp_path / "model.json")
    assert gc.main(["--dry-run", "--out-dir", str(tmp_path), "--model", str(model)]) == 0
    result = json.loads((tmp_path / "gpu-check.json").read_text())
    assert result["measured"] is False and "NOT MEASURED" in result["note"]
    rows = result["rows"]
    assert [(r["shape"], r["direction"]) for r in rows] == [(n, d) for n in gc.SHAPES for d in ("fwd", "fwdbwd")]
    assert rows[0]["vicinity_modelled_us"] == 10.0 and rows[1]["fa2_modelled_us"] == 60.0
    assert all(r["vicinity_measured_us"] is None and r["flash_measured_us"] is None for r in rows)
    png = (tmp_path / "gpu-check.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_measurements_land_beside_the_model(tmp_path):
    model = json.loads(_model(tmp_path / "model.json").read_text())
    measured = {"a": {"vicinity": {"label": "vicinity[triton]", "fwd": {"median_us": 12.5, "peak_bytes": 1024}},
                      "flash": {"skipped": "no flash here"}}}
    result = gc.assemble(["a"], model, measured, None, {})
    fwd = result["rows"][0]
    assert fwd["vicinity_measured_us"] == 12.5 and fwd["vicinity_modelled_us"] == 10.0
    assert fwd["vicinity_peak_bytes"] == 1024 and fwd["flash_label"] == "no flash here"
    gc.plot(result, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 5000
