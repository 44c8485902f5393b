"""Shared checks of the integration tests: float64 identity and the tolerance rule over a model's output and
all its parameter gradients. A tensor whose float64 truth is rounding noise (below 1e-12: a gradient that
is zero in exact arithmetic, e.g. a bias followed by a normalisation) must stay noise; the rule skips it
(a relative error of noise means nothing)."""
from __future__ import annotations

import torch

from tests.helpers import FLOOR, close_fp64, rel_err

NOISE = 1e-12


def assert_fp64_equal(got: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    assert len(got) == len(ref)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g.shape == r.shape, f"tensor {i}: {tuple(g.shape)} != {tuple(r.shape)}"
        if r.abs().max() < NOISE:
            assert g.abs().max() < NOISE, f"tensor {i}: {g.abs().max():.3e} where the truth is 0"
        else:
            close_fp64(g, r, f"tensor {i}")


def assert_rule(got: list[torch.Tensor], truth: list[torch.Tensor], plain: list[torch.Tensor],
                dtype: torch.dtype) -> None:
    """The tolerance rule tensor by tensor: error against the float64 truth at most 2x the plain computation's
    error in dtype, plus FLOOR[dtype]."""
    assert len(got) == len(truth) == len(plain)
    for i, (g, t, p) in enumerate(zip(got, truth, plain)):
        if t.abs().max() < NOISE:
            continue
        err, plain_err = rel_err(g, t), rel_err(p, t)
        assert err <= 2 * plain_err + FLOOR[dtype], f"tensor {i}: error {err:.3e}, plain {dtype} error {plain_err:.3e}"
