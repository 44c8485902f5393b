"""The decisions of tests/helpers.py that make the suite right on a GPU, checked on a CPU by faking what a GPU
run sees (TRITON_INTERPRET=0 and torch.cuda.is_available() True): where triton tests put tensors, which
float64 cases skip, the tolerances of the "exact" and fused-versus-separate checks."""
import pytest
import torch

from tests import helpers


@pytest.mark.parametrize("interpret,cuda,want", [(True, False, "cpu"), (True, True, "cpu"), (False, True, "cuda"),
                                                 (False, False, None)])
def test_triton_device(interpret, cuda, want):
    assert helpers.triton_device(interpret, cuda) == want


def test_triton_device_reads_the_environment_and_torch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert helpers.triton_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert helpers.triton_device() is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert helpers.triton_device() == "cpu"


def test_float64_skips_on_cuda_only():
    assert helpers.triton_dtype(torch.float64, "cpu") == torch.float64
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert helpers.triton_dtype(dtype, "cuda") == dtype
    with pytest.raises(pytest.skip.Exception, match="float64 on CUDA"):
        helpers.triton_dtype(torch.float64, "cuda")
    with pytest.raises(pytest.skip.Exception):
        helpers.triton_dtype(torch.float64, torch.device("cuda", 1))


def test_exact_case_never_asks_1e12_of_gpu_arithmetic():
    assert helpers.exact_case("cpu") == (torch.float64, 1e-10, 1e-12)
    dtype, rtol, atol = helpers.exact_case("cuda")
    assert dtype == torch.float32 and rtol >= 1e-5 and atol >= 1e-6


def test_fused_vs_separate_tolerances():
    tol = helpers.fused_vs_separate_tolerance
    # interpreter: bitwise but for 16-bit dq
    assert tol(torch.float64, "cpu", "dq") is None
    assert tol(torch.bfloat16, "cpu", "dk") is None and tol(torch.float16, "cpu", "dv") is None
    assert tol(torch.float16, "cpu", "dq") == (1e-3, 1e-3)
    # GPU: every gradient within two steps of the dtype, anywhere
    for name in ("dq", "dk", "dv"):
        assert tol(torch.float16, "cuda", name) == (2 * torch.finfo(torch.float16).eps, 1.0)
        assert tol(torch.bfloat16, "cuda", name) == (2 * torch.finfo(torch.bfloat16).eps, 1.0)
