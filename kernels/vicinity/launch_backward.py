"""Backward launcher: query pass (dq and the state gradients dS, dz: one launch where the head dims fit
one state tile, queries.py; else the dq pass with the row weights, then the state pass), key pass
(dk and dv in one launch: keys.py).

With g_i = dO_i / den_i and c_i = -(dO_i . o_i) / den_i (README, "The math in short"):
    dq = phi'(q) * sum_m P_m (S_m g + z_m c)
    dS_m = sum_i P_m phi(q_i) g_i^T,  dz_m = sum_i P_m phi(q_i) c_i
    dv = sum_m P_m dS_m^T phi(k),     dk = phi'(k) * sum_m P_m (dS_m v + dz_m)
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..fast_launch import launch_kernel
from ..runtime import cdiv, plan_cache
from .clamp import clamped_row_weights_kernel, state_grad_mask_kernel
from .configs import (
    LaunchConfig,
    clamped_packed_config,
    dot_precision,
    frame_launch,
    pick_config,
    pow2_scale,
    resident_options,
    resident_programs,
    resident_states,
)
from .frames import Slots
from .geometry import Geometry
from .keys import key_pass_kernel
from .launch_forward import (
    REDUCE_BLOCK,
    REDUCE_WARPS,
    QueryGradient,
    _copy_dtype,
    compute_states,
    fused_query_pass,
    operand_copy,
    output_pass,
    varlen_kwargs,
)
from .queries import ROWS_COMPUTE, ROWS_FROM_ACC, ROWS_LOAD, dq_pass_kernel, row_weights_kernel
from .varlen import Packing


def vicinity_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                      den: torch.Tensor, S: torch.Tensor, z: torch.Tensor, dq: torch.Tensor | None,
                      dk: torch.Tensor | None, dv: torch.Tensor | None, geom: Geometry, eps: float = 1e-4,
                      den_floor: float = 0.0, clamp: tuple[float, float] | None = None,
                      pack: Packing | None = None) -> None:
    """Fills dq, dk, dv (strided, shaped like q, k, v) from dO [B, H, Nq, Dv] and the forward's saved
    den, S, z (all scaled by s_k = 2^-ceil(log2 Nk), see ``vicinity_forward``). A gradient passed as
    None is not computed, and the passes only it needs are skipped.

    Scaling bookkeeping: with den' = s_k den, rs = 1/den' and rz = -(dO.o)/den' are 1/s_k times g, c,
    so S' rs = S g and z' rz = z c (dq exact). The state gradients come out 1/s_k too large; the
    reduction multiplies by s_q = 2^-ceil(log2 Nq) to keep them O(1), and the key pass multiplies its
    result by s_k / s_q (an exact power of two).

    ``eps`` and ``den_floor`` (unscaled, as given to ``vicinity_forward``) locate the rows where the
    floor was active (there c = 0). With ``clamp``, the row weights come from clamp.py instead (dO is
    replaced by the masked g / s_k and rs = 1), and dS is masked where S was clamped.
    The two passes are :func:`backward_queries` and :func:`backward_keys` (context parallelism sums
    the state gradients of every rank's queries between them).

    Packed (``pack``, varlen.py): tensors are [1, H, T, E] views of the packed ones, den [H, Tq], S, z
    [S * H, ...]; the same passes, one launch each, with s_k and s_q per sequence.
    """
    if pack is not None:
        _packed_backward(do, q, k, v, o, den, S, z, dq, dk, dv, geom, eps, den_floor, clamp, pack)
        return
    Nq, Nk = q.shape[2], k.shape[2]
    need_states = dk is not None or dv is not None
    plan = backward_plan(geom, q.dtype, q.shape[-1], do.shape[-1], Nq, Nk, clamp, dq is not None, need_states)
    dS_op = None if plan.ds_copy is None else torch.empty(S.shape, dtype=plan.ds_copy, device=S.device)
    states = backward_queries(do, q, o, den, S, z, dq, geom, eps, den_floor, clamp, Nq, Nk,
                              need_states=need_states, ds_copy=dS_op, plan=plan)
    if states is not None:
        dS, dz = states
        backward_keys(k, v, S, dS if dS_op is None else dS_op, dz, dk, dv, geom, clamp, Nq, Nk, plan=plan)


class BackwardPlan(NamedTuple):
    """What a dense backward decides from shapes alone, once per shape (:func:`backward_plan`)."""

    cfg: LaunchConfig
    s_k: float                    # pow2_scale of the key count
    s_q: float                    # pow2_scale of the query count
    fused: bool                   # the query pass is one launch (queries.py): dq and states wanted, no clamp
    ds_copy: torch.dtype | None   # dtype of dS's copy for the key pass's dots (``operand_copy``), or None


@plan_cache
def backward_plan(geom: Geometry, dtype: torch.dtype, D: int, Dv: int, n_queries: int, n_keys: int,
                  clamp: tuple[float, float] | None, need_dq: bool, need_states: bool) -> BackwardPlan:
    """The :class:`BackwardPlan` of a backward over ``n_queries`` queries and ``n_keys`` keys (head dims D,
    Dv, inputs of ``dtype``), wanting dq (``need_dq``) and the state gradients (``need_states``)."""
    cfg = pick_config(D, Dv, dtype, n_feat=geom.n_feat)
    fused = need_dq and need_states and clamp is None and fused_query_pass(D, Dv, dtype, geom.n_feat)
    ds_copy = _copy_dtype("bwd_keys", dtype, D, Dv, clamp) if need_states else None
    return BackwardPlan(cfg, pow2_scale(n_keys), pow2_scale(n_queries), fused, ds_copy)


def backward_queries(do: torch.Tensor, q: torch.Tensor, o: torch.Tensor, den: torch.Tensor, S: torch.Tensor,
                     z: torch.Tensor, dq: torch.Tensor | None, geom: Geometry, eps: float, den_floor: float,
                     clamp: tuple[float, float] | None, n_queries: int, n_keys: int, query_offset: int = 0,
                     need_states: bool = True, ds_copy: torch.Tensor | None = None,
                     plan: BackwardPlan | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The query pass: fills dq (unless None) for the queries q [B, H, n, D] at sequence positions
    query_offset .. query_offset + n - 1 of ``n_queries`` (keys: ``n_keys``), and returns their state
    gradients (dS [BH, F, D, Dv], dz [BH, F, D], scaled as :func:`vicinity_backward` says) when
    ``need_states``, else None. ``ds_copy``: dS is also written into it (see ``compute_states``), for a key
    pass that reads it in its dot operand dtype. ``plan``: :func:`backward_plan` of these arguments, where
    the caller has it."""
    if dq is None and not need_states:
        return None
    B, H, Nq, D = q.shape
    if plan is None:
        plan = backward_plan(geom, q.dtype, D, do.shape[-1], n_queries, n_keys, clamp, dq is not None, need_states)
    cfg, s_k, s_q = plan.cfg, plan.s_k, plan.s_q

    if plan.fused:
        # One launch (queries.py): q and dO read once, the row weights never written.
        grad = QueryGradient(dq, S, z, den, den_floor * s_k, eps * s_k)
        return compute_states(q, do, geom, True, s_q, "bwd_state", tok_offset=query_offset, s_copy=ds_copy, dq=grad)
    rs = torch.empty(B * H, Nq, dtype=den.dtype, device=q.device)
    rz = torch.empty_like(rs)
    # The dq pass computes the row weights itself (from dO, o, den) and writes them for the state pass.
    rows = dict(o=o, den=den, den_floor=den_floor * s_k, eps=eps * s_k)
    if clamp is not None:
        do = _clamped_row_weights(do, q, den, S, z, rs, rz, geom, cfg, eps, den_floor, clamp, s_k, query_offset)
        rows = {}   # the dq pass reads the clamped backward's rs, rz
    elif dq is None:
        _row_weights(do, o, den, rs, rz, cfg, (cdiv(Nq, cfg.block_n), B * H), den_floor * s_k, eps * s_k)

    if dq is not None:
        _dq_pass(q, do, S, z, rs, rz, dq, geom, True, 1.0, cfg, "bwd_dq", query_offset, **rows)
    if not need_states:
        return None
    return compute_states(q, do, geom, True, s_q, "bwd_state", rs=rs, rz=rz, tok_offset=query_offset,
                          s_copy=ds_copy)


def backward_keys(k: torch.Tensor, v: torch.Tensor, S: torch.Tensor, dS: torch.Tensor, dz: torch.Tensor,
                  dk: torch.Tensor | None, dv: torch.Tensor | None, geom: Geometry,
                  clamp: tuple[float, float] | None, n_queries: int, n_keys: int, key_offset: int = 0,
                  plan: BackwardPlan | None = None) -> None:
    """The key pass: fills dk, dv (where not None) for the keys k [B, H, n, D], v [B, H, n, Dv] at
    sequence positions key_offset .. key_offset + n - 1, from the state gradients of all ``n_queries``
    queries (dS masked here in place where the clamped S was clamped). ``plan``: as for
    :func:`backward_queries` (only its config and scales are read)."""
    if plan is None:
        cfg = pick_config(k.shape[-1], v.shape[-1], k.dtype, n_feat=geom.n_feat)
        s_k, s_q = pow2_scale(n_keys), pow2_scale(n_queries)
    else:
        cfg, s_k, s_q = plan.cfg, plan.s_k, plan.s_q
    if clamp is not None:
        n = dS.numel()
        launch_kernel(state_grad_mask_kernel, (cdiv(n, REDUCE_BLOCK),), dS, S, n, clamp[0] * s_k, clamp[1] * s_k,
               BLOCK=REDUCE_BLOCK, num_warps=REDUCE_WARPS)
    _key_pass(k, v, dS, dz, dk, dv, geom, cfg, s_k / s_q, key_offset)


def _packed_backward(do, q, k, v, o, den, S, z, dq, dk, dv, geom: Geometry, eps: float, den_floor: float, clamp,
                     pack: Packing) -> None:
    """:func:`vicinity_backward` of a packed call: the same passes, one launch each, the scales per
    sequence (factor tables: s_k, s_q, s_k / s_q and ones)."""
    H, Tq, D, Dv = q.shape[1], q.shape[2], q.shape[3], v.shape[3]
    cfg = pick_config(D, Dv, q.dtype)
    s_k, s_q = pack.scales(False), pack.scales(True)
    factors = lambda values: pack.factors(values, den.dtype)  # noqa: E731
    f_k, ones = factors(s_k), factors([1.0] * pack.n_seqs)
    rs = torch.empty(H, Tq, dtype=den.dtype, device=q.device)
    rz = torch.empty_like(rs)
    row_grid = (cdiv(pack.max_length(True), cfg.block_n), pack.n_seqs * H)
    # As in backward_queries: the dq pass computes rs, rz (its factor table scales den_floor and eps).
    rows = dict(o=o, den=den, den_floor=den_floor, eps=eps, factor=f_k)
    if clamp is not None:
        num = torch.empty(1, H, Tq, Dv, dtype=den.dtype, device=q.device)
        output_pass(q, S, z, num, geom, True, cfg, "fwd_output", None, pack=pack, factor=ones)
        g = torch.empty(1, H, Tq, Dv, dtype=clamped_grad_dtype(do.dtype), device=q.device)
        launch_kernel(clamped_row_weights_kernel, row_grid,
            do, num, den, g, rs, rz, H, Tq, Dv, den_floor, eps, clamp[0], clamp[1], 1.0,
            *do.stride(), *g.stride(), BLOCK_N=cfg.block_n, BLOCK_DV=cfg.block_dv,
            ACC=dot_precision("bwd_row_weights", q.dtype).acc, **cfg.options("bwd_row_weights"),
            **varlen_kwargs(pack, f_k))
        do = g
        rows = dict(factor=ones)
        cfg = clamped_packed_config(cfg)
    elif dq is None:
        _row_weights(do, o, den, rs, rz, cfg, row_grid, den_floor, eps, pack, f_k)
    if dq is not None:
        _dq_pass(q, do, S, z, rs, rz, dq, geom, True, 1.0, cfg, "bwd_dq", pack=pack, **rows)
    if dk is None and dv is None:
        return
    dS_op = operand_copy("bwd_keys", q.dtype, S.shape, S.device, clamp)
    dS, dz = compute_states(q, do, geom, True, 1.0, "bwd_state", rs=rs, rz=rz, pack=pack, factor=factors(s_q),
                            s_copy=dS_op)
    if clamp is not None:
        n = dS.numel()
        launch_kernel(state_grad_mask_kernel, (cdiv(n, REDUCE_BLOCK),), dS, S, n, clamp[0], clamp[1],
               BLOCK=REDUCE_BLOCK, num_warps=REDUCE_WARPS, factor_ptr=f_k, rows_per_seq=n // pack.n_seqs,
               VARLEN=True)
    _key_pass(k, v, dS if dS_op is None else dS_op, dz, dk, dv, geom, cfg, 1.0, pack=pack,
              factor=factors([a / b for a, b in zip(s_k, s_q)]))


def clamped_grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the clamped backward's g / s_k (up to hi * Nk * |dO|: past fp16's 65504): fp32 for
    fp16 inputs (the dots reading it run in TF32 there), else the inputs' own (bf16 has fp32's range)."""
    return torch.float32 if dtype == torch.float16 else dtype


def _dq_pass(x, y, states, z, rs, rz, out, geom: Geometry, is_query: bool, out_scale: float,
                 cfg: LaunchConfig, launch: str, tok_offset: int = 0, pack: Packing | None = None,
                 factor: torch.Tensor | None = None, o: torch.Tensor | None = None, den: torch.Tensor | None = None,
                 den_floor: float = 0.0, eps: float = 0.0, frames: Slots | None = None):
    """The dq pass: out = out_scale * phi'(x) * (rs sum_m P_m y M_m^T + rz sum_m P_m z_m), y = dO.
    With ``o`` and ``den``, rs and rz are computed in the kernel from dO, o, den, den_floor and eps (scaled
    like den) and written into rs, rz; otherwise (the clamped backward) they are read from rs, rz.
    ``launch`` ("bwd_dq") picks the dot precision and launch options. Packed (``pack``):
    factor[i] multiplies den_floor and eps (with ``o``) or out_scale (without) for sequence i. ``frames``
    (frame-causal, frames.py): states [BH, n_slots, F, D, Dv], z [BH, n_slots, F, D] per slot."""
    B, H, N, D = x.shape
    Dv = y.shape[-1]
    # One D tile holds all of phi(q) . acc: dO . o comes from the kernel's accumulator, o is not read.
    mode = ROWS_LOAD if o is None else ROWS_FROM_ACC if D <= cfg.block_d else ROWS_COMPUTE
    if o is None:
        o, den = y, z  # never read
    sizes = geom.q_sizes if is_query else geom.k_sizes
    block_n, kwargs = _dq_plan(geom, is_query, launch, x.dtype, cfg, mode.value, frames is not None,
                               bool(D % 16 or Dv % 16))
    extra = varlen_kwargs(pack, factor)
    if frames is not None:
        grid = (frames.token_programs(block_n), B * H, cdiv(D, cfg.block_d))
        extra = frames.token_kwargs(block_n)
    elif pack is None:
        grid = (cdiv(N, block_n), B * H, cdiv(D, cfg.block_d))
    else:
        grid = (cdiv(pack.max_length(is_query), block_n), pack.n_seqs * H, cdiv(D, cfg.block_d))
    launch_kernel(dq_pass_kernel, grid,
                  x, y, states, z, rs, rz, o, den, out, H, N, D, Dv, geom.n_prefix - tok_offset, *sizes, out_scale,
                  den_floor, eps, *x.stride(), *y.stride(), *o.stride(), *out.stride(), **kwargs, **extra)


@plan_cache
def _dq_plan(geom: Geometry, is_query: bool, launch: str, dtype: torch.dtype, cfg: LaunchConfig,
             rows: int, frames: bool = False, unaligned: bool = False) -> tuple[int, dict]:
    """(tokens per program, constexprs and launch options) of a dq pass launch, planned once per shape
    (``frames``: frame-causal, ``configs.frame_launch``; ``unaligned``: head dims not multiples of 16)."""
    block_n, opts = cfg.tokens_per_program(launch), cfg.options(launch)
    if frames:
        block_n, opts = frame_launch(cfg, launch, dtype, unaligned)
    return block_n, dict(**geom.constexprs(is_query), ROWS=rows, BLOCK_N=block_n, BLOCK_D=cfg.block_d,
                         BLOCK_DV=cfg.block_dv, **dot_precision(launch, dtype).constexprs(), **opts)


def _row_weights(do, o, den, rs, rz, cfg: LaunchConfig, grid: tuple, den_floor: float, eps: float,
                 pack: Packing | None = None, factor: torch.Tensor | None = None) -> None:
    """rs = 1 / den, rz = -(dO . o) / den (0 where the floor is active) into rs, rz: the row weights of a
    backward that wants no dq (the dq pass computes them itself). den_floor, eps scaled like den (packed:
    times factor[i] for sequence i)."""
    launch_kernel(row_weights_kernel, grid,
        do, o, den, rs, rz, do.shape[1], do.shape[2], do.shape[-1], den_floor, eps, *do.stride(), *o.stride(),
        BLOCK_N=cfg.block_n, BLOCK_DV=cfg.block_dv, ACC=dot_precision("bwd_row_weights", do.dtype).acc,
        **cfg.options("bwd_row_weights"), **varlen_kwargs(pack, factor))


def _key_pass(k, v, dS, dz, dk, dv, geom: Geometry, cfg: LaunchConfig, key_scale: float, key_offset: int = 0,
              pack: Packing | None = None, factor: torch.Tensor | None = None, frames: Slots | None = None) -> None:
    """dk = key_scale * phi'(k) * sum_m P_m (dS_m v + dz_m) and dv = key_scale * sum_m P_m dS_m^T phi(k)
    (where not None) in one launch (keys.py); token i of k sits at sequence position ``key_offset + i``.
    Packed (``pack``): factor[i] multiplies key_scale for sequence i. ``frames`` (frame-causal, frames.py): dS
    [BH, n_slots, F, D, Dv], dz [BH, n_slots, F, D], each key reading its slot's."""
    B, H, N, D = k.shape
    Dv = v.shape[-1]
    block_n, resident, d_tiles, dv_tiles, kwargs = _key_plan(geom, k.dtype, D, Dv, cfg, dk is not None,
                                                             dv is not None, frames is not None)
    rows = B * H if pack is None else pack.n_seqs * H
    n_blocks = cdiv(N if pack is None else pack.max_length(False), block_n)
    extra = varlen_kwargs(pack, factor)
    if frames is not None:
        n_blocks = frames.token_programs(block_n)
        extra = frames.token_kwargs(block_n)
    if resident:
        # Persistent programs, each walking its head's token blocks with the dS tiles on chip.
        grid = (resident_programs(n_blocks, rows, k.device, kwargs["num_warps"]), rows, 1)
    else:
        # Program j writes dk's D tile j and dv's Dv tile j: as many programs per token block as the
        # gradients asked for have tiles.
        grid = (n_blocks, rows, max(d_tiles if dk is not None else 1, dv_tiles if dv is not None else 1))
    dk_out, dv_out = k if dk is None else dk, v if dv is None else dv
    launch_kernel(key_pass_kernel, grid,
                  k, v, dS, dz, dk_out, dv_out, H, N, D, Dv, geom.n_prefix - key_offset, *geom.k_sizes, key_scale,
                  *k.stride(), *v.stride(), *dk_out.stride(), *dv_out.stride(), **kwargs, **extra)


@plan_cache
def _key_plan(geom: Geometry, dtype: torch.dtype, D: int, Dv: int, cfg: LaunchConfig, need_dk: bool,
              need_dv: bool, frames: bool = False) -> tuple[int, bool, int, int, dict]:
    """(tokens per program block, resident form, D tiles, Dv tiles, constexprs and launch options) of a key
    pass launch. The resident form (keys.py) where ``configs.resident_states`` says, with
    ``configs.resident_options``' blocks and warps; else (and for frame-causal launches, ``frames``) the
    streaming form at ``cfg``'s."""
    d_tiles, dv_tiles = cdiv(D, cfg.block_d), cdiv(Dv, cfg.block_dv)
    resident = not frames and resident_states("bwd_keys", dtype, geom.n_feat, D, Dv, cfg)
    if resident:
        opts = resident_options(cfg, "bwd_keys", geom.n_feat, dtype, bool(D % 16 or Dv % 16))
    else:
        opts = dict(BLOCK_N=cfg.tokens_per_program("bwd_keys"), **cfg.options("bwd_keys"))
    consts = geom.constexprs(False)
    del consts["IS_QUERY"]  # the kernel is the key side's
    kwargs = dict(**consts, NEED_DK=need_dk, NEED_DV=need_dv, ONE_TILE=max(d_tiles, dv_tiles) == 1,
                  BLOCK_D=cfg.block_d, BLOCK_DV=cfg.block_dv, **dot_precision("bwd_keys", dtype).constexprs(),
                  RESIDENT=resident, **opts)
    return opts["BLOCK_N"], resident, d_tiles, dv_tiles, kwargs


def _clamped_row_weights(do, q, den, S, z, rs, rz, geom: Geometry, cfg: LaunchConfig, eps: float,
                         den_floor: float, clamp: tuple[float, float], s_k: float,
                         query_offset: int = 0, frames: Slots | None = None) -> torch.Tensor:
    """The clamped backward's row weights (clamp.py): recomputes the unclamped numerator from the
    clamped states (one output pass), fills rs = 1 and rz = c / s_k, and returns g / s_k [B, H, Nq, Dv]
    in dO's dtype, to be used in place of dO."""
    B, H, Nq, _ = q.shape
    Dv = do.shape[-1]
    num = torch.empty(B, H, Nq, Dv, dtype=den.dtype, device=q.device)
    output_pass(q, S, z, num, geom, True, cfg, "fwd_output", None, tok_offset=query_offset, frames=frames)
    g = torch.empty(B, H, Nq, Dv, dtype=clamped_grad_dtype(do.dtype), device=q.device)
    launch_kernel(clamped_row_weights_kernel, (cdiv(Nq, cfg.block_n), B * H),
        do, num, den, g, rs, rz, H, Nq, Dv, den_floor * s_k, eps * s_k, clamp[0], clamp[1], s_k,
        *do.stride(), *g.stride(), BLOCK_N=cfg.block_n, BLOCK_DV=cfg.block_dv,
        ACC=dot_precision("bwd_row_weights", q.dtype).acc,
        **cfg.options("bwd_row_weights"))
    return g
