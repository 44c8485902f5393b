"""Shared checks of the integration tests: float64 identity and the tolerance rule over a model's output and
all its parameter gradients. A tensor whose float64 truth is rounding noise (below 1e-12: a gradient that
is zero in exact arithmetic, e.g. a bias followed by a normalisation) must stay noise; the rule skips it
(a relative error of noise means nothing).

Over a whole model the rule compares RMS errors (DESIGN.md section 4 allows max-abs or RMS ratios): the
max-abs error of one element of one of ~60 gradients, each the sum of many layers' rounding, is a noisy
statistic, and the worst of 60 noisy ratios exceeds 2 by chance (measured on EfficientViT with one thread:
a single conv weight gradient at 4.1x the stock model's max-abs error, its RMS error at 2.2x; the median
ratio over tensors and seeds is 1.1-1.2)."""
from __future__ import annotations

import torch

from tests.helpers import FLOOR, close_fp64

NOISE = 1e-12


def assert_fp64_equal(got: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    assert len(got) == len(ref)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g.shape == r.shape, f"tensor {i}: {tuple(g.shape)} != {tuple(r.shape)}"
        if r.abs().max() < NOISE:
            assert g.abs().max() < NOISE, f"tensor {i}: {g.abs().max():.3e} where the truth is 0"
        else:
            close_fp64(g, r, f"tensor {i}")


def rms_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """RMS(x - ref) / RMS(ref), in float64."""
    ref = ref.double()
    return ((x.double() - ref).square().mean().sqrt() / ref.square().mean().sqrt()).item()


def assert_rule(got: list[torch.Tensor], truth: list[torch.Tensor], plain: list[torch.Tensor],
                dtype: torch.dtype) -> None:
    """The tolerance rule tensor by tensor: RMS error against the float64 truth at most 2x the plain
    computation's RMS error in dtype, plus FLOOR[dtype]."""
    assert len(got) == len(truth) == len(plain)
    for i, (g, t, p) in enumerate(zip(got, truth, plain)):
        if t.abs().max() < NOISE:
            continue
        err, plain_err = rms_err(g, t), rms_err(p, t)
        assert err <= 2 * plain_err + FLOOR[dtype], f"tensor {i}: error {err:.3e}, plain {dtype} error {plain_err:.3e}"
