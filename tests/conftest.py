"""Test-session setup.

No GPU exists in this project's CI, so the Triton kernels are tested through the Triton
interpreter. TRITON_INTERPRET must be set before triton is first imported, which is why it is set
here, at conftest import time, before any test module (or the package) imports triton. A value
already in the environment wins (e.g. TRITON_INTERPRET=0 on a real GPU machine).

On a GPU run (TRITON_INTERPRET=0 and a CUDA device; ``python -m bench.gpu_check`` does this)
tests/vicinity/test_triton_backend.py and tests/vicinity/test_query_pass.py put their tensors on the CUDA
device (tests.helpers.triton_device decides; float64 cases skip there with the reason, tests.helpers.triton_dtype).
Tests elsewhere that hand CPU tensors to backend="triton" cannot run without the interpreter and are
skipped there, with that reason; everything else runs as on a CPU.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

GPU_RUN = os.environ["TRITON_INTERPRET"] in ("", "0") and torch.cuda.is_available()
# These pick the CUDA device themselves on a GPU run (tests.helpers.triton_device).
DEVICE_AWARE_MODULES = ("tests.vicinity.test_triton_backend", "tests.vicinity.test_query_pass")


def pytest_collection_modifyitems(config, items):
    if not GPU_RUN:
        return
    skip = pytest.mark.skip(reason="CPU tensors with backend='triton' need the interpreter; on this GPU run the "
                                   "triton backend is tested on the device by tests/vicinity/test_triton_backend.py")
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        uses_triton = params.get("backend") == "triton" or "triton" in getattr(item, "originalname", item.name)
        if uses_triton and item.module.__name__ not in DEVICE_AWARE_MODULES:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _linear_torch_form(request, monkeypatch):
    """Tests of the torch backend exercise its linear form at their small shapes; the quadratic form that
    small CPU calls take by default (vicinity/quadratic.py) is tested where marked ``quadratic_form``."""
    if "quadratic_form" not in request.keywords:
        from vicinity_attn.vicinity import quadratic
        monkeypatch.setattr(quadratic, "MAX_PAIRS", 0)
