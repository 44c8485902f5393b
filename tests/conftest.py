"""Test-session setup.

No GPU exists in this project's CI, so the Triton kernels are tested through the Triton
interpreter. TRITON_INTERPRET must be set before triton is first imported, which is why it is set
here, at conftest import time, before any test module (or the package) imports triton. A value
already in the environment wins (e.g. TRITON_INTERPRET=0 on a real GPU machine).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
