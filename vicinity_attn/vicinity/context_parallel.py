"""Context parallelism: one sequence's tokens split over the ranks of a ``torch.distributed`` group.

Every rank holds a contiguous shard of the queries and a contiguous shard of the keys / values (shards
in rank order, any lengths, queries and keys cut at different places; prefix tokens are the first
tokens of the whole sequence). Vicinity attention's whole cross-token state is F x D x Dv + F x D
numbers per head, so a call costs

    forward:   local states S, z over the local keys -> ONE all-reduce (sum) of S and z (one buffer)
               -> local outputs from the summed states (floor, eps and clamp act on the sums)
    backward:  local dq and the local queries' share of dS, dz -> ONE all-reduce (sum)
               -> local dk, dv from the summed dS, dz

plus one small all-gather of the shard lengths per call (seven integers per rank: the lengths and a
fingerprint of the call, so that ranks whose calls differ in shapes, dtype, grids, options or overflow-check
mode all raise the same ValueError instead of computing garbage or failing in a collective), from which every
rank takes its
global token offsets (the position features are the whole sequence's), unless the caller passes them
(``token_offsets``: no exchange, no fingerprint, and no check that the shards add up; on NCCL the exchange
also reads the lengths back to the host, a synchronisation per call). Outputs and
gradients equal the single-process call's up to the order of floating-point sums.

Every rank of the group must make the same calls in the same order, and run backward whenever one
does (as with DistributedDataParallel): the backward always takes part in its all-reduce, whichever
gradients this rank needs. Determinism: the summed states are those of the group's all-reduce; the
backends here add a rank's tokens in a fixed order, so results are run-to-run reproducible exactly
when the all-reduce is. With gloo on CPU and a fixed world size the tests see every call repeat
bitwise and the summed states bitwise identical on every rank; NCCL was not tried (its summation
order may depend on the algorithm and protocol it picks). Not bitwise equal to the single-process
call: that sums all tokens in one order, these per shard and then over ranks.

Overflow (``vicinity_attn.common.overflow``): where the mode checks, each all-reduce carries one more
number, the count of ranks whose inputs hold a NaN or inf. Summed states that are not finite although
every rank's inputs are raise the same OverflowError on every rank; a rank's own output or gradients that
are not finite although every rank's inputs are raise it on that rank (the other ranks' results are finite).

Not traced by torch.compile (a graph break) and not under torch.func transforms: the collectives run
eagerly inside an ``autograd.Function``.
"""
from __future__ import annotations

import hashlib
import math

import torch
import torch.distributed as dist

from ..common.overflow import all_finite, checks_overflow, overflow_check, raise_overflow
from ..common.spec import TokenShard, VicinitySpec
from ..common.validation import check_shard_counts


def _pieces(backend: str):
    """The backend module with ``states`` / ``output`` / ``query_backward`` / ``key_backward``."""
    if backend == "torch":
        from . import torch_shards
        return torch_shards
    if backend == "triton":
        from . import triton_shards
        return triton_shards
    raise ValueError(f"backend={backend!r} does not support context parallelism (group=...): use 'torch', "
                     "'triton' or 'auto'")


def _collective_device(group, like: torch.Tensor) -> torch.device:
    """Where the small length exchange runs: CUDA for NCCL (which takes only CUDA tensors), else CPU."""
    if dist.get_backend(group) == "nccl":
        return like.device if like.is_cuda else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_lengths(lengths: list[int], group, like: torch.Tensor) -> list[list[int]]:
    """Every rank's ``lengths`` (a few ints, the same count on every rank), in group-rank order: one
    small all-gather."""
    device = _collective_device(group, like)
    mine = torch.tensor(lengths, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    return torch.stack(gathered).tolist()


def call_fingerprint(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: VicinitySpec, backend: str) -> list[int]:
    """What every rank's call must agree on, as small ints: batch, heads, head dims, the dtype, and a
    63-bit hash of the backend, grids, options and overflow-check mode (identical on every rank: no
    per-process salt)."""
    described = repr((backend, str(q.dtype), spec.grid, spec.kv_grid, sorted(spec.options().items()),
                      overflow_check()))
    digest = int.from_bytes(hashlib.blake2b(described.encode(), digest_size=8).digest(), "little") >> 1
    return [q.shape[0], q.shape[1], q.shape[3], v.shape[3], digest]


FINGERPRINT_FIELDS = ("batch size", "number of heads", "head dim of q and k", "head dim of v",
                      "backend, dtype, grid, kv_grid, options or overflow-check mode")


def check_same_call(fingerprints: list[list[int]]) -> None:
    """The same ValueError on every rank (all ranks see the same table) where the ranks' calls differ."""
    for i, name in enumerate(FINGERPRINT_FIELDS):
        values = [f[i] for f in fingerprints]
        if len(set(values)) > 1:
            shown = values if i < len(FINGERPRINT_FIELDS) - 1 else [f"#{v % 10**6:06d}" for v in values]
            raise ValueError(f"context parallelism (group=...): the ranks' calls differ in {name} "
                             f"(per rank: {shown}); every rank must make the same call on its own shard")


def exchange_shards(n_queries: int, n_keys: int, group, like: torch.Tensor,
                    fingerprint: list[int] = ()) -> tuple[TokenShard, list[list[int]]]:
    """One all-gather of every rank's (queries, keys) shard lengths and the call's ``fingerprint``
    (:func:`call_fingerprint`; a ValueError on every rank where they differ): this rank's
    :class:`TokenShard` and the table [[n_q, n_k] per rank] in group-rank order."""
    rows = gather_lengths([n_queries, n_keys, *fingerprint], group, like)
    check_same_call([r[2:] for r in rows])
    table = [r[:2] for r in rows]
    before = table[:dist.get_rank(group)]
    shard = TokenShard(q_offset=sum(r[0] for r in before), k_offset=sum(r[1] for r in before),
                       n_queries=sum(r[0] for r in table), n_keys=sum(r[1] for r in table))
    return shard, table


def all_reduce_states(S: torch.Tensor, z: torch.Tensor, group,
                      flag: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(S, z, flag) summed over the group's ranks, in ONE all-reduce of a buffer holding all three (the
    one-element ``flag`` rides along when given: every rank must give one or none)."""
    parts = [S.reshape(-1), z.reshape(-1)] + ([] if flag is None else [flag.reshape(1).to(S.dtype)])
    buffer = torch.cat(parts)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    n_s, n_z = S.numel(), z.numel()
    summed = None if flag is None else buffer[n_s + n_z:]
    return buffer[:n_s].view(S.shape), buffer[n_s:n_s + n_z].view(z.shape), summed


def _non_finite_ranks(tensors) -> torch.Tensor:
    """1 where any of ``tensors`` holds a NaN or inf, else 0 (a one-element tensor: summed over ranks)."""
    bad = torch.zeros((), dtype=torch.float32, device=tensors[0].device)
    for t in tensors:
        bad = torch.maximum(bad, (~t.isfinite()).any().to(bad.dtype))
    return bad


class _OverflowCheck:
    """Whether this call checks for overflow (``common.overflow``), and the checks over ranks (module
    docstring): every decision reads only what the all-reduce made identical on every rank."""

    def __init__(self, spec: VicinitySpec, like: torch.Tensor):
        self.on = spec.feature_map != "identity" and checks_overflow(like)

    def flag(self, inputs) -> torch.Tensor:
        # Always sent (a rank that does not check sends 0), so that every rank's buffer has one layout.
        if not self.on:
            return torch.zeros((), dtype=torch.float32, device=inputs[0].device)
        return _non_finite_ranks(inputs)

    def states(self, stage: str, summed_flag: torch.Tensor, states, inputs) -> bool:
        """Whether every rank's inputs were finite (then the results are checked); raises, on every rank,
        where the summed ``states`` are not finite."""
        if not self.on or float(summed_flag) != 0:
            return False
        if not all_finite(states):
            raise_overflow(stage, inputs, inputs[-1].dtype, " in the states summed over the ranks")
        return True

    @staticmethod
    def local(stage: str, results, inputs) -> None:
        if not all_finite(results):
            raise_overflow(stage, inputs, inputs[-1].dtype, " in this rank's results")


class _AllReduceSum(torch.autograd.Function):
    """y = sum over the group's ranks of x (every rank gets y); the gradient of a sum that every rank
    uses is the sum of the ranks' gradients: backward all-reduces too."""

    @staticmethod
    def forward(ctx, x, group):
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        ctx.group = group
        return y

    @staticmethod
    def backward(ctx, dy):
        dx = dy.clone()
        dist.all_reduce(dx, op=dist.ReduceOp.SUM, group=ctx.group)
        return dx, None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """The sum of x over the group's ranks, differentiable (e.g. the VVT layer's SE-gate token mean)."""
    return _AllReduceSum.apply(x, group)


class _ContextParallelAttention(torch.autograd.Function):
    """o of the local queries; backward: dq, dk, dv of the local tokens (module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, pieces, spec: VicinitySpec, shard: TokenShard, group):
        check = _OverflowCheck(spec, q)
        S, z = pieces.states(k, v, spec, shard)
        S, z, flag = all_reduce_states(S, z, group, check.flag((q, k, v)))
        finite_inputs = check.states("forward", flag, (S, z), (q, k, v))
        o, den, S = pieces.output(q, S, z, spec, shard)
        if finite_inputs:
            check.local("forward", (o,), (q, k, v))
        ctx.save_for_backward(q, k, v, o, den, S, z)
        ctx.pieces, ctx.spec, ctx.shard, ctx.group = pieces, spec, shard, group
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, den, S, z = ctx.saved_tensors
        need_dq, need_dk, need_dv = ctx.needs_input_grad[:3]
        check = _OverflowCheck(ctx.spec, q)
        dq, dS, dz = ctx.pieces.query_backward(do, q, o, den, S, z, ctx.spec, ctx.shard, need_dq)
        # Every rank takes part, whatever it needs.
        dS, dz, flag = all_reduce_states(dS, dz, ctx.group, check.flag((do, q, k, v)))
        finite_inputs = check.states("backward", flag, (dS, dz), (do, q, k, v))
        dk, dv = ctx.pieces.key_backward(k, v, S, dS, dz, ctx.spec, ctx.shard, need_dk, need_dv)
        if finite_inputs:
            check.local("backward", (dq, dk, dv), (do, q, k, v))
        return dq, dk, dv, None, None, None, None


def context_parallel_attention(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               spec: VicinitySpec, group, token_offsets: tuple[int, int] | None = None) -> torch.Tensor:
    """o [B, H, n_q, Dv] of this rank's queries: q [B, H, n_q, D], k [B, H, n_k, D], v [B, H, n_k, Dv]
    are this rank's shards of a sequence that ``spec`` describes whole; ``backend`` is "torch" or
    "triton" (validated by the caller, ``vicinity_attention(..., group=...)``). ``token_offsets``:
    this rank's (query, key) offsets as the caller knows them (validated by the caller), which spares
    the length exchange; None exchanges and checks the lengths. Differentiable."""
    pieces = _pieces(backend)
    if backend == "triton":
        from .triton_backend import check_triton_inputs
        check_triton_inputs(q, k, v)
    if token_offsets is None:
        shard, table = exchange_shards(q.shape[2], k.shape[2], group, q, call_fingerprint(q, k, v, spec, backend))
        check_shard_counts(table, spec)
    else:
        P = spec.num_prefix_tokens
        shard = TokenShard(q_offset=token_offsets[0], k_offset=token_offsets[1],
                           n_queries=P + math.prod(spec.grid), n_keys=P + math.prod(spec.kv_grid))
    return _ContextParallelAttention.apply(q, k, v, pieces, spec, shard, group)


# ----------------------------------------------------------------------------------------------------
# frame-causal calls: an exclusive scan of the ranks' states over frames
# ----------------------------------------------------------------------------------------------------

def _frames_module(backend: str):
    """The backend's window functions (:mod:`.frames` / :mod:`.triton_frames`)."""
    if backend == "torch":
        from . import frames
        return frames
    if backend == "triton":
        from . import triton_frames
        return triton_frames
    raise ValueError(f"backend={backend!r} does not support context parallelism (group=...): use 'torch', "
                     "'triton' or 'auto'")


def frame_spans(table: list[list[int]], spec: VicinitySpec) -> list[int]:
    """Each rank's first frame, from the shard table [[n_q, n_k] per rank] of a frame-causal call: every
    rank must hold whole frames, the same ones of q and of k, at least one (prefix tokens go with rank 0's
    first frames). Checked for all ranks on every rank, so that all raise the same ValueError."""
    P = spec.num_prefix_tokens
    per_q, per_k = math.prod(spec.grid[1:]), math.prod(spec.kv_grid[1:])
    starts, q_off, k_off = [], 0, 0
    for rank, (n_q, n_k) in enumerate(table):
        prefix = P if q_off == 0 else 0
        frame, rest = divmod(max(q_off - P, 0), per_q)
        n, rest_n = divmod(n_q - prefix, per_q)
        k_prefix = P if k_off == 0 else 0
        expected_k_off = 0 if q_off == 0 else P + frame * per_k
        if rest or rest_n or n < 1 or k_off != expected_k_off or n_k != k_prefix + n * per_k:
            raise ValueError(
                f"causal='frames' with group=...: every rank must hold whole frames, the same frames of q and "
                f"of k (prefix tokens with the first frames), at least one; rank {rank} holds {n_q} query and "
                f"{n_k} key tokens at offsets {q_off} / {k_off} (frames of {per_q} query and {per_k} key "
                f"tokens, {P} prefix tokens; shard lengths per rank: {table})")
        starts.append(frame)
        q_off, k_off = q_off + n_q, k_off + n_k
    return starts


def _gather_states(S: torch.Tensor, z: torch.Tensor, flag: torch.Tensor, group) -> list[tuple]:
    """Every rank's (S, z, flag) in group-rank order: ONE all-gather of a buffer holding all three."""
    buffer = torch.cat([S.reshape(-1), z.reshape(-1), flag.reshape(1).to(S.dtype)])
    gathered = [torch.empty_like(buffer) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, buffer, group=group)
    n_s, n_z = S.numel(), z.numel()
    return [(b[:n_s].view(S.shape), b[n_s:n_s + n_z].view(z.shape), b[n_s + n_z:]) for b in gathered]


def _ordered_sum(pairs: list[tuple], like: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The sum of (S, z) pairs in list order (zeros for none): the scans' fixed order."""
    S, z = torch.zeros_like(like[0]), torch.zeros_like(like[1])
    for pair in pairs:
        S += pair[0]
        z += pair[1]
    return S, z


class _CausalContextParallelAttention(torch.autograd.Function):
    """Frame-causal o of the local queries (ranks hold spans of frames in rank order).

    forward:  local key totals -> ONE all-gather -> init = sum of the earlier ranks' totals (exclusive
              scan, in rank order) -> the local window from init
    backward: local query side (dq, and init_grad = dLoss/dinit) -> ONE all-gather -> carry_grad = sum of
              the later ranks' init_grad -> the local key side (dk, dv)"""

    @staticmethod
    def forward(ctx, q, k, v, window, spec: VicinitySpec, start: int, group):
        check = _OverflowCheck(spec, q)
        totals = window.window_key_totals(k, v, spec, start)
        rows = _gather_states(*totals, check.flag((q, k, v)), group)
        rank = dist.get_rank(group)
        init = _ordered_sum([r[:2] for r in rows[:rank]], totals) if rank else None
        flag = sum(r[2] for r in rows)
        finite_inputs = check.states("forward", flag, _ordered_sum([r[:2] for r in rows], totals), (q, k, v))
        o, den, S, z, _ = window.window_forward(q, k, v, spec, start, init)
        if finite_inputs:
            check.local("forward", (o,), (q, k, v))
        ctx.save_for_backward(q, k, v, o, den, S, z)
        ctx.window, ctx.spec, ctx.start, ctx.group = window, spec, start, group
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, den, S, z = ctx.saved_tensors
        need_dq, need_dk, need_dv = ctx.needs_input_grad[:3]
        check = _OverflowCheck(ctx.spec, q)
        dq, dpre, init_grad = ctx.window.window_query_backward(do, q, o, den, S, z, ctx.spec, ctx.start, need_dq)
        # Every rank takes part, whatever it needs.
        rows = _gather_states(*init_grad, check.flag((do, q, k, v)), ctx.group)
        rank = dist.get_rank(ctx.group)
        later = [r[:2] for r in rows[rank + 1:]]
        carry_grad = _ordered_sum(later, init_grad) if later else None
        flag = sum(r[2] for r in rows)
        finite_inputs = check.states("backward", flag, _ordered_sum([r[:2] for r in rows], init_grad),
                                     (do, q, k, v))
        dk, dv = ctx.window.window_key_backward(k, v, dpre, ctx.spec, ctx.start, carry_grad, need_dk, need_dv)
        if finite_inputs:
            check.local("backward", (dq, dk, dv), (do, q, k, v))
        return dq, dk, dv, None, None, None, None


def causal_context_parallel_attention(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                      spec: VicinitySpec, group,
                                      token_offsets: tuple[int, int] | None = None) -> torch.Tensor:
    """:func:`context_parallel_attention` of a frame-causal call: every rank holds whole frames (the same of q
    and k, in rank order; :func:`frame_spans`). Costs one all-gather of the ranks' F x D x Dv + F x D states
    per direction (world size x the states in memory), besides the length exchange."""
    window = _frames_module(backend)
    if backend == "triton":
        from .triton_backend import check_triton_inputs
        check_triton_inputs(q, k, v)
    if token_offsets is None:
        shard, table = exchange_shards(q.shape[2], k.shape[2], group, q, call_fingerprint(q, k, v, spec, backend))
        check_shard_counts(table, spec)
        start = frame_spans(table, spec)[dist.get_rank(group)]
    else:
        per_q = math.prod(spec.grid[1:])
        P = spec.num_prefix_tokens
        start = max(token_offsets[0] - P, 0) // per_q
        expected = (0, 0) if start == 0 else (P + start * per_q, P + start * math.prod(spec.kv_grid[1:]))
        if tuple(token_offsets) != expected:
            raise ValueError(f"causal='frames' with group=...: token_offsets {tuple(token_offsets)} must be the start "
                             f"of a whole frame of q and of k (the same frame), e.g. {expected}")
    return _CausalContextParallelAttention.apply(q, k, v, window, spec, start, group)
