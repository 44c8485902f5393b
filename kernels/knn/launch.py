"""Thin launchers of the k-NN kernels: allocate the per-row state, pick the config, launch."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton.language as tl

from ..fast_launch import launch_kernel
from ..runtime import cdiv, pick_precision, plan_cache
from .backward import knn_dkdv_kernel, knn_dq_kernel, row_delta_kernel
from .configs import pick_config
from .forward import knn_forward_kernel
from .select import knn_threshold_kernel


def selection_constexprs(acc: tl.dtype) -> dict:
    """The key dtype and bit count of the selection pass for scores in ``acc``."""
    return dict(KEY=tl.uint64, NBITS=64) if acc == tl.float64 else dict(KEY=tl.uint32, NBITS=32)


@dataclass(frozen=True)
class KnnPlan:
    """What every launch of one shape needs besides its tensors, planned once (:func:`knn_plan`)."""

    acc_dtype: torch.dtype
    block_m: int
    block_n: int
    threshold: dict     # constexprs and launch options of each kernel (never mutated: launches only read them)
    forward: dict
    row_delta: dict
    dq: dict
    dkdv: dict


@plan_cache
def knn_plan(D: int, Dv: int, Nk: int, dtype: torch.dtype) -> KnnPlan:
    """The :class:`KnnPlan` for head dims D, Dv, Nk keys and inputs of ``dtype``."""
    prec = pick_precision(dtype)
    cfg = pick_config(D, Dv, Nk, dtype)
    chunks = cfg.chunks()
    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg)
    forward = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=chunks["BLOCK_K"], N_K=chunks["N_K"],
                   ACC=prec.acc, DOT=prec.dot, PREC=prec.prec, **launch)
    backward = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, **chunks, ACC=prec.acc,
                    DOT=prec.dot, PREC=prec.prec, **launch)
    return KnnPlan(
        acc_dtype=torch.float64 if prec.acc == tl.float64 else torch.float32, block_m=cfg.block_m,
        block_n=cfg.block_n,
        threshold=dict(ROW_ON_CHIP=cfg.row_on_chip(Nk), **selection_constexprs(prec.acc), **forward),
        forward=dict(BLOCK_DV=cfg.block_dv, **forward),
        row_delta=dict(BLOCK_M=cfg.block_m, BLOCK_DV=cfg.block_dv, ACC=prec.acc, num_warps=cfg.num_warps,
                       maxnreg=cfg.maxnreg),
        dq=backward,
        dkdv=dict(backward, BLOCK_DV=cfg.block_dv, num_warps=cfg.dkdv_num_warps, num_stages=cfg.dkdv_num_stages))


def knn_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, topk: int,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Writes o [B, H, Nq, Dv]; returns tau and lse, [B*H, Nq] in the accumulation dtype."""
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[-1]
    plan = knn_plan(D, Dv, Nk, q.dtype)
    tau = torch.empty((B * H, Nq), dtype=plan.acc_dtype, device=q.device)
    lse = torch.empty_like(tau)
    grid = (cdiv(Nq, plan.block_m), B * H)
    launch_kernel(knn_threshold_kernel, grid, q, k, tau, *q.stride(), *k.stride(), H, Nq, Nk, D, topk, scale,
                  **plan.threshold)
    launch_kernel(knn_forward_kernel, grid, q, k, v, o, tau, lse, *q.stride(), *k.stride(), *v.stride(),
                  *o.stride(), H, Nq, Nk, D, Dv, scale, **plan.forward)
    return tau, lse


def knn_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 tau: torch.Tensor, lse: torch.Tensor, dq: torch.Tensor | None, dk: torch.Tensor | None,
                 dv: torch.Tensor | None, scale: float) -> None:
    """Writes whichever of dq, dk, dv is given (each [B, H, N, E], any strides)."""
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[-1]
    plan = knn_plan(D, Dv, Nk, q.dtype)
    q_grid = (cdiv(Nq, plan.block_m), B * H)
    delta = torch.empty_like(lse)
    if dq is not None or dk is not None:
        launch_kernel(row_delta_kernel, q_grid, do, o, delta, *do.stride(), *o.stride(), H, Nq, Dv, **plan.row_delta)
    if dq is not None:
        launch_kernel(knn_dq_kernel, q_grid, q, k, v, do, dq, tau, lse, delta, *q.stride(), *k.stride(), *v.stride(),
                      *do.stride(), *dq.stride(), H, Nq, Nk, D, Dv, scale, **plan.dq)
    if dk is not None or dv is not None:
        # A gradient not wanted gets a dummy pointer and stride set; its constexpr flag skips its work.
        dk_t = dk if dk is not None else k
        dv_t = dv if dv is not None else v
        launch_kernel(knn_dkdv_kernel, (cdiv(Nk, plan.block_n), B * H),
                      q, k, v, do, dk_t, dv_t, tau, lse, delta, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
                      *dk_t.stride(), *dv_t.stride(), H, Nq, Nk, D, Dv, scale, NEED_DK=dk is not None,
                      NEED_DV=dv is not None, **plan.dkdv)
