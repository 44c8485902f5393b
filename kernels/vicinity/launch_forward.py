"""Forward launcher: state pass over the keys (its chunk reduction inside: state.py), output pass over the queries.

The launchers also serve packed variable-length calls (``pack``, see varlen.py): the tensors are then
[1, H, T, E] views of the packed [T, H, E] ones, one launch covers all sequences, and the power-of-two
scales are per sequence (``factor`` tables) instead of one float.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..fast_launch import launch_kernel
from ..runtime import Precision, cdiv, election_counters, next_power_of_2, plan_cache, sm_count, target_arch
from .clamp import state_clamp_kernel
from .configs import (
    HEAD_BLOCKS,
    RESIDENT_TOKEN_STAGES,
    ChunkPlan,
    LaunchConfig,
    StateTiles,
    chunk_plan,
    dot_precision,
    frame_launch,
    pick_config,
    pow2_scale,
    resident_options,
    resident_programs,
    resident_query_features,
    resident_states,
    state_operand_dtype,
    state_tiles,
)
from .frames import Slots
from .geometry import Geometry
from .output import output_pass_kernel
from .queries import query_pass_kernel
from .state import state_partial_kernel
from .varlen import Packing

REDUCE_BLOCK = 1024
REDUCE_WARPS = 4
FUSED_QUERY_MIN_ARCH = 90


def _acc_torch_dtype(prec: Precision) -> torch.dtype:
    return torch.float64 if prec.acc.primitive_bitwidth == 64 else torch.float32


def varlen_kwargs(pack: Packing | None, factor: torch.Tensor | None) -> dict:
    """The extra kernel arguments of a packed launch (none for a dense one: the kernels' defaults)."""
    return {} if pack is None else dict(seq_ptr=pack.table, factor_ptr=factor, VARLEN=True)


@dataclass(frozen=True)
class QueryGradient:
    """What the fused query pass (queries.py) needs besides q and dO: dq [B, H, N, D] to fill, the
    forward's S [BH, F, D, Dv] and z [BH, F, D], den [BH, N], and den_floor, eps scaled like den."""

    out: torch.Tensor
    S: torch.Tensor
    z: torch.Tensor
    den: torch.Tensor
    den_floor: float
    eps: float


@plan_cache
def fused_query_pass(D: int, Dv: int, dtype: torch.dtype, n_feat: int) -> bool:
    """Whether the backward's query pass runs as one launch (dq and the state gradients: queries.py) for
    head dims D (q) and Dv (dO), inputs of ``dtype`` and F = n_feat: on sm_90 and newer (and in the
    interpreter), for head dims that are multiples of 16 and fit one tile of the state pass (whose dot
    precision the dq dots share), and not for fp32 inputs. Everything else keeps the dq pass and the
    state pass, because the fused program holds the stacked dS accumulator beside the dq tile: on sm_80
    and with unaligned head dims (scalar tile accesses) it spills, and fp32 (TF32x3 state tiles: one tile
    only for D <= 16) loads its states in 32-bit pieces."""
    arch = target_arch()
    if arch is not None and arch < FUSED_QUERY_MIN_ARCH:
        return False
    if dtype == torch.float32 or D % 16 or Dv % 16:
        return False
    tiles = state_tiles(n_feat, D, Dv, dtype, "bwd_state")
    return (D <= tiles.block_d and Dv <= tiles.block_dv
            and dot_precision("bwd_state", dtype) == dot_precision("bwd_dq", dtype))


def fused_query_options(tiles: StateTiles, dtype: torch.dtype, n_feat: int) -> dict:
    """Launch options and form of the fused query pass for inputs of ``dtype`` and F = n_feat: the state
    pass's options, with 8 warps at 64-wide head tiles (at 4, which the state pass takes for F <= 2, it
    spills); RESIDENT (the features whose state tiles stay on chip: ``configs.resident_query_features``)
    and the token loop's pipelining depth."""
    opts = tiles.options()
    if tiles.block_d >= HEAD_BLOCKS[-1]:
        opts["num_warps"] = max(opts["num_warps"], 8)
    elif tiles.block_d == tiles.block_dv == HEAD_BLOCKS[0] and tiles.max_registers is not None:
        # 16 x 16 state tiles (fp32: S, dq's operand) load one element a thread at 8 warps: 4 take 64-bit loads.
        opts["num_warps"] = 4
    resident = resident_query_features(dtype, n_feat, tiles)
    if resident:
        # The token loop is pipelined only where it is innermost: every feature resident.
        stages = RESIDENT_TOKEN_STAGES if resident == n_feat and tiles.max_registers is not None else 1
        opts.update(RESIDENT=resident, TOKEN_STAGES=stages)
    return opts


@dataclass(frozen=True)
class StatePlan:
    """What a state pass launch needs besides its tensors, planned once per shape (:func:`state_plan`):
    the dtype of S and z, the programs per chunk and chunk plan, and the launch's constexprs and options."""

    acc_dtype: torch.dtype
    n_tiles: int            # D tiles x Dv tiles
    block_n: int
    chunks: ChunkPlan
    kwargs: dict            # constexprs and launch options (never mutated: launches only read it)


@plan_cache
def state_plan(geom: Geometry, is_query: bool, launch: str, dtype: torch.dtype, D: int, Dv: int, n_tokens: int,
               lead: int, fused: bool, row_weights: bool, sms: int) -> StatePlan:
    """The :class:`StatePlan` of a state pass over ``n_tokens`` tokens (the longest sequence when packed) of
    ``lead`` (sequence, head) pairs on a device of ``sms`` SMs; ``fused``: the backward's fused query pass
    (queries.py)."""
    prec = dot_precision(launch, dtype)
    tiles = state_tiles(geom.n_feat, D, Dv, dtype, launch)
    n_tiles = cdiv(D, tiles.block_d) * cdiv(Dv, tiles.block_dv)
    kwargs = dict(**geom.constexprs(is_query), BLOCK_N=tiles.block_n, BLOCK_D=tiles.block_d, BLOCK_DV=tiles.block_dv,
                  **prec.constexprs(), F_PAD=next_power_of_2(geom.n_feat), Z_COLS=16)
    if fused:
        kwargs.update(fused_query_options(tiles, dtype, geom.n_feat))
    else:
        kwargs.update(ROW_WEIGHTS=row_weights, **tiles.options())
    return StatePlan(_acc_torch_dtype(prec), n_tiles, tiles.block_n,
                     chunk_plan(n_tokens, tiles.block_n, lead * n_tiles, sms), kwargs)


def compute_states(x: torch.Tensor, y: torch.Tensor, geom: Geometry, is_query: bool, scale: float,
                   launch: str, rs: torch.Tensor | None = None,
                   rz: torch.Tensor | None = None, tok_offset: int = 0, pack: Packing | None = None,
                   factor: torch.Tensor | None = None, s_copy: torch.Tensor | None = None,
                   dq: QueryGradient | None = None, frames: Slots | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """S [BH, F, D, Dv] = scale * sum_t P(t) (rs_t phi(x_t)) y_t^T and z [BH, F, D] = scale * sum_t P(t) rz_t phi(x_t).

    x [B, H, N, D], y [B, H, N, Dv] strided; rs, rz [BH, N] row weights (both 1 when None). ACC dtype.
    ``s_copy`` (shaped like S, another dtype: see ``state_operand_dtype``): S is also written into it,
    rounded once from the ACC values by the kernel that writes S.
    Token t of x sits at position ``tok_offset + t`` of its sequence (a shard of a longer sequence:
    context parallelism); P is that position's feature.
    ``launch`` ("fwd_state" / "bwd_state") picks the dot precision. One program computes all F states
    of its (chunk, head, D tile, Dv tile). Packed (``pack``): BH = S * H, rs, rz [H, T], and sequence
    i's states are scaled by scale * factor[i].
    ``dq`` (the backward over the queries, x = q, y = dO, dense calls whose head dims fit one state tile:
    ``fused_query_pass``): the programs also compute dq and the row weights themselves (queries.py), and
    rs, rz are not given.
    ``frames`` (a frame-causal launch, frames.py): the states of each slot's own tokens, S [BH, n_slots, F, D,
    Dv] and z [BH, n_slots, F, D] (one program per slot, no chunk reduction; dense, without ``dq``).
    """
    B, H, N, D = x.shape
    Dv = y.shape[-1]
    F = geom.n_feat
    lead = B * H if pack is None else pack.n_seqs * H
    row_weights = rs is not None
    sp = state_plan(geom, is_query, launch, x.dtype, D, Dv, N if pack is None else pack.max_length(is_query), lead,
                    dq is not None, row_weights, sm_count(x.device))
    if frames is not None:
        return _slot_states(x, y, geom, is_query, scale, rs, rz, tok_offset, sp, frames)
    plan = sp.chunks
    n_s, n_z = lead * F * D * Dv, lead * F * D
    S = torch.empty(lead, F, D, Dv, dtype=sp.acc_dtype, device=x.device)
    assert s_copy is None or (s_copy.shape == S.shape and s_copy.is_contiguous())
    copy = {} if s_copy is None else dict(s_copy_ptr=s_copy, COPY=True)
    z = torch.empty(lead, F, D, dtype=sp.acc_dtype, device=x.device)
    # One chunk: each program scales and writes its states. Several: each writes its chunk's partials
    # (S and z of a chunk side by side, one row of ``parts``) and the last program of its group sums
    # them (state.py's finish_states), elected on one of the kept, self-re-arming counters.
    chunked = plan.n_chunks > 1
    groups = lead * (1 if dq is not None else sp.n_tiles)
    if chunked:
        parts = torch.empty(plan.n_chunks, n_s + n_z, dtype=sp.acc_dtype, device=x.device)
        s_part, z_part = parts[0, :n_s], parts[0, n_s:]
        counters = election_counters(x.device, groups)
    else:
        s_part, z_part, counters = S, z, S   # never read (CHUNKED=False): any pointer will do
    sizes = geom.q_sizes if is_query else geom.k_sizes
    if not row_weights:
        rs = rz = S  # never read (ROW_WEIGHTS=False); any pointer will do
    packed = {}
    if pack is not None:
        chunks = pack.chunk_counts(is_query, sp.block_n, plan.blocks_per_chunk)
        packed = dict(varlen_kwargs(pack, factor), chunks_ptr=chunks)
    if dq is not None:
        assert pack is None and sp.n_tiles == 1 and not row_weights
        launch_kernel(query_pass_kernel, (lead, plan.n_chunks),
                      x, y, dq.S, dq.z, dq.den, dq.out, S, z, s_part, z_part, counters, H, N, D, Dv,
                      geom.n_prefix - tok_offset, *sizes, plan.blocks_per_chunk, plan.n_chunks, n_s + n_z, scale,
                      dq.den_floor, dq.eps, *x.stride(), *y.stride(), *dq.out.stride(), **sp.kwargs, CHUNKED=chunked,
                      **copy)
    else:
        launch_kernel(state_partial_kernel, (groups, plan.n_chunks),
                      x, y, rs, rz, S, z, s_part, z_part, counters, H, N, D, Dv, geom.n_prefix - tok_offset, *sizes,
                      plan.blocks_per_chunk, plan.n_chunks, n_s + n_z, scale, *x.stride(), *y.stride(), **sp.kwargs,
                      CHUNKED=chunked, **packed, **copy)
    return S, z


def _slot_states(x: torch.Tensor, y: torch.Tensor, geom: Geometry, is_query: bool, scale: float,
                 rs: torch.Tensor | None, rz: torch.Tensor | None, tok_offset: int, sp: StatePlan,
                 frames: Slots) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`compute_states` of a frame-causal launch: grid (groups, slots), each program its slot's states."""
    B, H, N, D = x.shape
    Dv = y.shape[-1]
    F = geom.n_feat
    S = torch.empty(B * H, frames.n_slots, F, D, Dv, dtype=sp.acc_dtype, device=x.device)
    z = torch.empty(B * H, frames.n_slots, F, D, dtype=sp.acc_dtype, device=x.device)
    row_weights = rs is not None
    if not row_weights:
        rs = rz = S  # never read (ROW_WEIGHTS=False)
    sizes = geom.q_sizes if is_query else geom.k_sizes
    # s_part, z_part, count: never read (CHUNKED=False); blocks_per_chunk, part_stride: unused.
    launch_kernel(state_partial_kernel, (B * H * sp.n_tiles, frames.n_slots),
                  x, y, rs, rz, S, z, S, z, S, H, N, D, Dv, geom.n_prefix - tok_offset, *sizes, 1, frames.n_slots,
                  0, scale, *x.stride(), *y.stride(), **sp.kwargs, CHUNKED=False, slot0_len=frames.slot0_len,
                  frame_len=frames.frame_len, FRAMES=True)
    return S, z


@plan_cache
def output_plan(geom: Geometry, is_query: bool, launch: str, dtype: torch.dtype, cfg: LaunchConfig,
                with_den: bool, clamp: bool, D: int, Dv: int, frames: bool = False) -> tuple[int, bool, dict]:
    """(tokens per program block, resident form, constexprs and launch options) of an output pass launch,
    planned once per shape. The resident form (output.py) where ``configs.resident_states`` says, with
    ``configs.resident_options``' blocks and warps; else the streaming form at ``cfg``'s (frame-causal launches,
    ``frames``: at ``configs.frame_launch``'s)."""
    resident = not frames and resident_states(launch, dtype, geom.n_feat, D, Dv, cfg)
    if resident:
        opts = resident_options(cfg, launch, geom.n_feat, dtype, bool(D % 16 or Dv % 16))
    elif frames:
        block_n, frame_opts = frame_launch(cfg, launch, dtype, bool(D % 16 or Dv % 16), with_den and clamp)
        opts = dict(BLOCK_N=block_n, **frame_opts)
    else:
        opts = dict(BLOCK_N=cfg.tokens_per_program(launch), **cfg.options(launch))
    kwargs = dict(**geom.constexprs(is_query), WITH_DEN=with_den, CLAMP=with_den and clamp, BLOCK_D=cfg.block_d,
                  BLOCK_DV=cfg.block_dv, **dot_precision(launch, dtype).constexprs(), RESIDENT=resident, **opts)
    return opts["BLOCK_N"], resident, kwargs


def output_pass(x: torch.Tensor, states: torch.Tensor, z: torch.Tensor, out: torch.Tensor, geom: Geometry,
               is_query: bool, cfg: LaunchConfig, launch: str, eps: float | None,
               out_scale: float = 1.0, den_floor: float = 0.0,
               clamp: tuple[float, float] | None = None, state_scale: float = 1.0,
               tok_offset: int = 0, pack: Packing | None = None,
               factor: torch.Tensor | None = None, frames: Slots | None = None) -> torch.Tensor | None:
    """out = out_scale * sum_m P_m phi(x) M_m, divided by den = max(sum_m P_m phi(x).z_m, den_floor) + eps
    when eps is given (then den [BH, N] is returned; eps, den_floor scaled like the states). With
    ``clamp`` (and eps), out = C(C(num) C(1/den)) on the values unscaled by ``state_scale`` (clamp.py).
    x [B, H, N, D], out [B, H, N, Dv] strided; token i of x sits at sequence position ``tok_offset + i``.
    ``launch`` ("fwd_output") picks the dot precision and launch options. Packed (``pack``):
    den is [H, T]; factor[i] multiplies eps, den_floor and state_scale (with eps) or out_scale
    (without) for sequence i. ``frames`` (frame-causal, frames.py): states [BH, n_slots, F, D, Dv], z [BH,
    n_slots, F, D], each token reading its slot's."""
    B, H, N, D = x.shape
    Dv = out.shape[-1]
    with_den = eps is not None
    den = torch.empty(B * H, N, dtype=z.dtype, device=x.device) if with_den else z   # z: ACC (states may be a copy)
    sizes = geom.q_sizes if is_query else geom.k_sizes
    block_n, resident, kwargs = output_plan(geom, is_query, launch, x.dtype, cfg, with_den, clamp is not None, D, Dv,
                                            frames is not None)
    rows, dv_tiles = (B * H if pack is None else pack.n_seqs * H), cdiv(Dv, cfg.block_dv)
    n_blocks = cdiv(N if pack is None else pack.max_length(is_query), block_n)
    extra = varlen_kwargs(pack, factor)
    if frames is not None:
        n_blocks = frames.token_programs(block_n)
        extra = frames.token_kwargs(block_n)
    # Resident: persistent programs, each walking its head's token blocks; streaming: one per token block.
    grid = (resident_programs(n_blocks, rows * dv_tiles, x.device, kwargs["num_warps"]) if resident else n_blocks,
            rows, dv_tiles)
    launch_kernel(output_pass_kernel, grid,
                  x, states, z, out, den, H, N, D, Dv, geom.n_prefix - tok_offset, *sizes, eps if with_den else 0.0,
                  out_scale, den_floor, *(clamp or (0.0, 0.0)), state_scale, *x.stride(), *out.stride(), **kwargs,
                  **extra)
    return den if with_den else None


def vicinity_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, geom: Geometry,
                     eps: float, den_floor: float = 0.0, clamp: tuple[float, float] | None = None,
                     pack: Packing | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fills o [B, H, Nq, Dv] (strided, q's dtype) and returns (den [BH, Nq], S [BH, F, D, Dv], z [BH, F, D]).

    S, z and den are stored scaled by s = 2^-ceil(log2 Nk) (eps too), which leaves o unchanged and
    keeps them O(1): fp16 tensor-core operands built from them cannot overflow however long the
    sequence. They are in fp32 (fp64 for fp64 inputs; S in bf16 where :func:`saved_state_dtype` says).
    den = max(sum, den_floor) + eps (den_floor scaled too). With ``clamp`` = (lo, hi) the VVT clamps apply
    (clamp.py): S is stored clamped.
    The two passes are :func:`forward_states` and :func:`forward_output` (context parallelism sums
    the states of every rank's keys between them).

    Packed (``pack``, varlen.py): q, k, v, o are [1, H, T, E] views of the packed tensors, den is
    [H, Tq], S and z [S * H, ...], and each sequence is scaled by the s of its own length.
    """
    assert q.dim() == k.dim() == v.dim() == o.dim() == 4
    if pack is not None:
        return _packed_forward(q, k, v, o, geom, eps, den_floor, clamp, pack)
    S_op = operand_copy("fwd_output", q.dtype, (k.shape[0] * k.shape[1], geom.n_feat, q.shape[-1], v.shape[-1]),
                        q.device, clamp)
    S, z = forward_states(k, v, geom, s_copy=S_op)
    den = forward_output(q, S, z, o, geom, eps, den_floor, clamp, n_keys=k.shape[2], S_operand=S_op)
    return den, S if S_op is None else S_op, z


@plan_cache
def saved_state_dtype(dtype: torch.dtype, D: int, Dv: int, clamp: tuple[float, float] | None,
                      acc_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the S that :func:`vicinity_forward` returns for inputs of ``dtype``, head dims D, Dv
    (``acc_dtype``: the accumulation dtype of its other states). Where the forward makes a copy of S in
    the output pass's dot operand dtype (``operand_copy``: bf16 inputs on a GPU, 64-wide head tiles, no
    clamp), it returns that copy: the backward uses S only as the dq dots' operand, which rounds it
    to the same dtype (``state_operand_dtype`` of "bwd_dq" is the same), and only the clamped backward,
    which gets no copy, reads S otherwise. Half the bytes saved, and the dq pass reads half from L2."""
    op_dtype = _copy_dtype("fwd_output", dtype, D, Dv, clamp)
    if op_dtype is None:
        return acc_dtype
    assert state_operand_dtype("bwd_dq", dtype) == op_dtype
    return op_dtype


def operand_copy(launch: str, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device,
                 clamp: tuple[float, float] | None) -> torch.Tensor | None:
    """An empty tensor of ``shape`` ([BH, F, D, Dv]) for states in ``launch``'s dot operand dtype, for
    inputs of ``dtype``: the output pass's S or the key pass's dS, when that dtype is 16-bit (bf16 inputs
    on a GPU, see ``state_operand_dtype``) and no clamp changes the states after they are written (the
    forward's S clamp, the backward's dS mask); else None. Only for 64-wide head tiles: the L2 reads it
    halves matter there, while narrower bf16 tile rows (32 / 64 bytes) load in 32-bit pieces or spill."""
    op_dtype = _copy_dtype(launch, dtype, shape[2], shape[3], clamp)
    return None if op_dtype is None else torch.empty(shape, dtype=op_dtype, device=device)


def _copy_dtype(launch: str, dtype: torch.dtype, D: int, Dv: int,
                clamp: tuple[float, float] | None) -> torch.dtype | None:
    """The dtype of ``operand_copy``'s copy for head dims D, Dv, or None where no copy is made."""
    op_dtype = state_operand_dtype(launch, dtype)
    if op_dtype is None or clamp is not None or pick_config(D, Dv, dtype).block_d < HEAD_BLOCKS[-1]:
        return None
    return op_dtype


def forward_states(k: torch.Tensor, v: torch.Tensor, geom: Geometry, n_keys: int | None = None,
                   key_offset: int = 0, s_copy: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The state pass: (S [BH, F, D, Dv], z [BH, F, D]) over the keys k [B, H, n, D], v [B, H, n, Dv],
    which sit at positions key_offset .. key_offset + n - 1 of a sequence of ``n_keys`` keys (default:
    k is the whole sequence). Scaled by 2^-ceil(log2 n_keys): shards of one sequence share that scale,
    so their states add up to the whole sequence's. ``s_copy``: see :func:`compute_states`."""
    assert k.shape[-1] <= 256 and v.shape[-1] <= 256
    scale = pow2_scale(k.shape[2] if n_keys is None else n_keys)
    return compute_states(k, v, geom, False, scale, "fwd_state", tok_offset=key_offset, s_copy=s_copy)


def forward_output(q: torch.Tensor, S: torch.Tensor, z: torch.Tensor, o: torch.Tensor, geom: Geometry, eps: float,
                   den_floor: float, clamp: tuple[float, float] | None, n_keys: int,
                   query_offset: int = 0, S_operand: torch.Tensor | None = None) -> torch.Tensor:
    """The output pass: fills o [B, H, n, Dv] for the queries q [B, H, n, D] at sequence positions
    query_offset .. query_offset + n - 1 from the states of all ``n_keys`` keys (scaled as
    :func:`forward_states` scales them; clamped here in place when ``clamp`` is given) and returns den
    [BH, n]. ``S_operand``: S in the output pass's dot operand dtype (no clamp), read instead of S."""
    cfg = pick_config(q.shape[-1], o.shape[-1], q.dtype, n_feat=geom.n_feat)
    scale = pow2_scale(n_keys)
    if clamp is not None:
        clamp_states(S, clamp, scale)
    return output_pass(q, S if S_operand is None else S_operand, z, o, geom, True, cfg, "fwd_output", eps * scale,
                      den_floor=den_floor * scale, clamp=clamp, state_scale=scale, tok_offset=query_offset)


def _packed_forward(q, k, v, o, geom: Geometry, eps: float, den_floor: float, clamp,
                    pack: Packing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`vicinity_forward` of a packed call: the same passes, per-sequence scales s_k."""
    assert q.shape[-1] <= 256 and v.shape[-1] <= 256
    cfg = pick_config(q.shape[-1], v.shape[-1], q.dtype)
    s_k = pack.factors(pack.scales(False), _acc_torch_dtype(dot_precision("fwd_state", q.dtype)))
    S_op = operand_copy("fwd_output", q.dtype, (pack.n_seqs * q.shape[1], geom.n_feat, q.shape[-1], v.shape[-1]),
                        q.device, clamp)
    S, z = compute_states(k, v, geom, False, 1.0, "fwd_state", pack=pack, factor=s_k, s_copy=S_op)
    if clamp is not None:
        clamp_states(S, clamp, 1.0, pack, s_k)
    den = output_pass(q, S if S_op is None else S_op, z, o, geom, True, cfg, "fwd_output", eps, den_floor=den_floor,
                     clamp=clamp, pack=pack, factor=s_k)
    return den, S if S_op is None else S_op, z   # see saved_state_dtype


def clamp_states(S: torch.Tensor, clamp: tuple[float, float], scale: float, pack: Packing | None = None,
                 factor: torch.Tensor | None = None) -> None:
    """S = C(S) in place, S [BH, F, D, Dv] contiguous stored scaled by ``scale`` (bounds scaled alike;
    packed: also by factor[i] for sequence i's states)."""
    n = S.numel()
    packed = {} if pack is None else dict(factor_ptr=factor, rows_per_seq=n // pack.n_seqs, VARLEN=True)
    launch_kernel(state_clamp_kernel, (cdiv(n, REDUCE_BLOCK),), S, n, clamp[0] * scale, clamp[1] * scale,
           BLOCK=REDUCE_BLOCK, num_warps=REDUCE_WARPS, **packed)
