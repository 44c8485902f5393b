"""Checks both operations' torch.func tests share: each takes the call under test and the reference call
as functions of (q, k, v), and compares in float64 at the level of rounding."""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from helpers import rel_err

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def close_fp64(got: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    """float64 against the float64 reference: relative error at the level of rounding."""
    assert got.dtype == ref.dtype and got.shape == ref.shape, name
    assert ref.abs().max() > 0, f"{name}: the reference is all zero"
    err = rel_err(got, ref)
    assert err < 1e-10, f"{name}: relative error {err:.3e}"


def check_grad_and_vmap_of_grad(fn: Attention, ref_fn: Attention, inputs: tuple) -> None:
    """torch.func.grad of a loss, and per-example gradients (vmap over the batch of a grad over one example)."""
    loss = lambda f: (lambda q, k, v: f(q, k, v).square().sum())  # noqa: E731
    got = torch.func.grad(loss(fn), argnums=(0, 1, 2))(*inputs)
    ref = torch.func.grad(loss(ref_fn), argnums=(0, 1, 2))(*inputs)
    for name, g, r in zip("qkv", got, ref):
        close_fp64(g, r, f"grad d{name}")
    per_example = lambda f: torch.func.vmap(torch.func.grad(loss(f), argnums=(0, 1, 2)))  # noqa: E731
    batched = tuple(t.unsqueeze(1) for t in inputs)
    for name, g, r in zip("qkv", per_example(fn)(*batched), per_example(ref_fn)(*batched)):
        close_fp64(g, r, f"vmap(grad) d{name}")


def check_jacobian(fn: Attention, ref_fn: Attention, inputs: tuple, transform: str) -> None:
    """torch.func.jacrev / jacfwd against the reference's, computed by the batching rules (no per-sample
    fallback loop)."""
    jac = getattr(torch.func, transform)
    ref = jac(ref_fn, argnums=(0, 1, 2))(*inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = jac(fn, argnums=(0, 1, 2))(*inputs)
    assert not [w for w in caught if "performance drop" in str(w.message)], "vmap fell back to a loop"
    for name, g, r in zip("qkv", got, ref):
        close_fp64(g, r, f"{transform} d/d{name}")


def check_vmap_over_an_extra_dimension(fn: Attention, ref_fn: Attention, q: torch.Tensor, k: torch.Tensor,
                                       v: torch.Tensor) -> None:
    """vmap over a new leading dimension of q (k and v shared) against a loop of reference calls."""
    qs = torch.randn(2, *q.shape, dtype=q.dtype)
    ref = torch.stack([ref_fn(x, k, v) for x in qs])
    got = torch.func.vmap(fn, in_dims=(0, None, None))(qs, k, v)
    close_fp64(got, ref, "vmap")


# Derivatives of derivatives: the fused backends raise one message naming backend='reference'.
SECOND_ORDER = {
    "create_graph": lambda f, q, k, v: torch.autograd.grad(
        torch.autograd.grad(f(q, k, v).square().sum(), q, create_graph=True)[0].sum(), q),
    "hessian": lambda f, q, k, v: torch.func.hessian(lambda x: f(x, k, v).sum())(q),
    "grad_of_grad": lambda f, q, k, v: torch.func.grad(
        lambda x: torch.func.grad(lambda y: f(y, k, v).square().sum())(x).sum())(q),
    "jvp_of_grad": lambda f, q, k, v: torch.func.jvp(
        torch.func.grad(lambda y: f(y, k, v).square().sum()), (q,), (torch.randn_like(q),)),
}
