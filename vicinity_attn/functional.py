"""The public functional API and backend dispatch."""
from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from .common.custom_ops import autocast_disabled, autocast_inputs
from .common.spec import VicinitySpec
from .common.validation import check_group, check_token_offsets, validate_call, validate_knn_call, validate_varlen_call
from .knn.ops import custom_op_knn_attention
from .knn.reference import reference_knn_attention
from .vicinity.ops import custom_op_attention
from .vicinity.stream import FrameCache
from .vicinity.varlen import varlen_attention


def triton_available() -> bool:
    """True when the triton backend can be imported (kernels present and triton importable)."""
    # Eager: once imported, nothing to try again (not while tracing: the import below changes sys.modules,
    # on which torch.compile would guard).
    if not torch.compiler.is_compiling() and "vicinity_attn.vicinity.triton_backend" in sys.modules:
        return True
    try:
        from .vicinity import triton_backend  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The concrete backend "auto" stands for on ``device`` for inputs of ``dtype``: triton on CUDA when
    importable, else torch; float64 always goes to torch (the triton kernels run float64 only in the
    Triton interpreter, never on a GPU)."""
    if backend != "auto":
        return backend
    if device.type == "cuda" and dtype != torch.float64 and triton_available():
        return "triton"
    return "torch"


def _run_backend(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: VicinitySpec) -> torch.Tensor:
    """o [B, H, Nq, Dv] from the backend ``name``: the reference directly (plain autograd), the linear
    backends through their custom ops (:mod:`.ops`), which torch.compile traces without a graph break."""
    if name == "reference":
        from .vicinity.reference import reference_vicinity_attention
        return reference_vicinity_attention(q, k, v, spec)
    if name == "triton" and not triton_available():
        try:
            from .vicinity import triton_backend  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(f"backend='triton' is not available: {exc}") from exc
    if name not in ("torch", "triton"):
        raise ValueError(f"unknown backend {name!r}")
    return custom_op_attention(name, q, k, v, spec)


def vicinity_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       grid: int | Sequence[int], kv_grid: int | Sequence[int] | None = None, *,
                       variant: str = "sum", feature_map: str = "relu", eps: float = 1e-4,
                       layout: str = "bhnd", backend: str = "auto",
                       num_prefix_tokens: int = 0, den_floor: float = 0.0,
                       clamp: tuple[float, float] | None = None,
                       group: torch.distributed.ProcessGroup | None = None,
                       token_offsets: tuple[int, int] | None = None,
                       causal: str | None = None) -> torch.Tensor:
    """Vicinity attention (Sun et al., arXiv 2206.10552), linear in the number of tokens.

    o_i = sum_j phi(q_i).phi(k_j) w(i,j) v_j / den_i,
    den_i = max(sum_j phi(q_i).phi(k_j) w(i,j), den_floor) + eps,
    where w(i, j) = sum over grid axes a of cos(theta_a(i) - theta_a(j)) ("sum"), the product over
    axes ("product") or 1 ("none"), theta_a = (pi/2) * coord_a / size_a. ``den_floor = 0`` is VVT's
    normaliser; L2ViT (arXiv 2501.16182) uses variant "none", den_floor = 100, eps = 0.

    Args:
        q: [B, H, Nq, D] (layout "bhnd") or [B, Nq, H, D] ("bnhd"); float16/bfloat16/float32/float64.
        k: [B, H, Nk, D] or [B, Nk, H, D], same dtype and device as q.
        v: [B, H, Nk, Dv] or [B, Nk, H, Dv]; Dv may differ from D.
        grid: query grid, 1 to 3 positive ints (an int is a 1-d grid), row-major token order;
            ``num_prefix_tokens + prod(grid) == Nq``.
        kv_grid: key/value grid with as many axes as ``grid`` (default ``grid``);
            ``num_prefix_tokens + prod(kv_grid) == Nk``.
        variant: "sum" (paper default), "product" or "none" (plain linear attention).
        feature_map: "relu" (paper), "elu1" (elu(x) + 1) or "identity" (phi(x) = x: q and k are already
            the caller's features, e.g. a focused or hand-applied map). Identity features should be
            non-negative; nothing checks their values: with negative features the normaliser can reach 0
            or change sign, and the output is then whatever that division gives (inf / NaN at 0).
        eps: constant added to the normaliser; >= 0, and > 0 when ``den_floor`` is 0.
        den_floor: lower bound of the normaliser before eps is added (>= 0; 0 = no floor). Where
            the floor is active the normaliser is a constant and carries no gradient.
            Nonzero eps, den_floor and clamp bounds must lie in [2.5e-29, 3.4e38]: normal float32
            numbers even after the triton kernels' state scaling (down to 2^-31), for every dtype.
        clamp: None, or (min_mag, max_mag): the VVT authors' magnitude clamp (``abs_clamp``: |x|
            into [min_mag, max_mag], sign kept, zeros stay 0), applied elementwise to the states
            S_m = sum_j P_m(j) phi(k_j) v_j^T, to 1/den_i, to the numerator sum_m P_m(i) phi(q_i)^T S_m
            and to the output; gradients are 0 where a value was clamped. Their setting is
            (1e-4, 1e4). Backends "torch", "triton" and "reference" (feature form, O(N F D)).
        layout: "bhnd" or "bnhd", for inputs and output alike.
        backend: "auto" (triton on CUDA when available, else torch; torch for float64), "triton"
            (CUDA float16/bfloat16/float32; CPU tensors and float64 only under TRITON_INTERPRET=1),
            "torch" (linear, pure PyTorch, any device) or "reference" (quadratic; small N only).
        num_prefix_tokens: class/register tokens in front of the grid tokens of both q and k; a
            prefix token weighs 1 against every token and every token weighs 1 against it.
        group: None, or a ``torch.distributed`` process group for context parallelism: q, k, v are
            then this rank's contiguous shards of one sequence (shards in group-rank order, any
            lengths, q and k cut anywhere; prefix tokens are the whole sequence's first tokens) and
            ``grid`` / ``kv_grid`` describe the whole sequence; the output is this rank's rows. Costs
            one all-gather of the shard lengths and one all-reduce of the states (F x D x Dv + F x D
            per head) forward, one all-reduce of their gradients backward; every rank of the group
            must make the call (and its backward). Backends "torch" and "triton"
            (:mod:`vicinity_attn.vicinity.context_parallel`; README, "Context parallelism").
        token_offsets: with ``group``, optionally this rank's (q offset, k offset) in the whole
            sequence, when the caller knows them: the call then skips the length exchange (and the
            check that all ranks' shards add up to the grids; each shard is still checked to lie
            inside the sequence). None exchanges the lengths.
        causal: None (bidirectional) or "frames": frame-causal along the first grid axis (video: a 2-d
            or 3-d grid with frames first; ``kv_grid`` must have as many frames). A grid token of frame t
            attends to the prefix tokens and to the grid tokens of frames <= t, bidirectionally within a
            frame; a prefix token attends to the prefix tokens only. Angles are those of the whole grid.
            See docs/video.md, also for streaming one frame at a time with a state cache.

    Returns:
        o: [B, H, Nq, Dv] or [B, Nq, H, Dv] (as ``layout``), q's dtype and device (under
        ``torch.autocast`` for q's device: the autocast dtype, unless q is float64).
        Differentiable with respect to q, k and v for every backend. The "torch" and "triton"
        backends run as ``torch.library`` custom ops (:mod:`vicinity_attn.vicinity.ops`), so
        ``torch.compile(fullgraph=True)`` traces through them.
    """
    q4, k4, v4, spec = validate_call(q, k, v, grid, kv_grid, variant=variant, feature_map=feature_map,
                                     eps=eps, layout=layout, backend=backend,
                                     num_prefix_tokens=num_prefix_tokens, den_floor=den_floor, clamp=clamp,
                                     causal=causal, sharded=group is not None)
    name = resolve_backend(backend, q.device, q.dtype)
    if group is not None:
        return _context_parallel(name, q4, k4, v4, spec, group, layout, token_offsets)
    if token_offsets is not None:
        raise ValueError("token_offsets is for context parallelism: pass group=... with it (or leave it None)")
    # Under torch.autocast the op runs in the autocast dtype (the backends still accumulate in fp32).
    q4, k4, v4 = autocast_inputs(q4, k4, v4)
    if q4.shape[0] == 0 or q4.shape[1] == 0:
        # Empty batch: nothing to compute, but keep the graph so autograd still works.
        out = q4.new_zeros(*q4.shape[:3], v4.shape[-1]) + 0 * (q4.sum() + k4.sum() + v4.sum())
    else:
        with autocast_disabled(q4.device):
            out = _run_backend(name, q4, k4, v4, spec)
    return out.transpose(1, 2) if layout == "bnhd" else out


def _context_parallel(name: str, q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, spec: VicinitySpec, group,
                      layout: str, token_offsets: tuple[int, int] | None) -> torch.Tensor:
    """``vicinity_attention`` with ``group``: this rank's rows of the whole sequence's output."""
    from .vicinity.context_parallel import causal_context_parallel_attention, context_parallel_attention
    check_group(group, name)
    if token_offsets is not None:
        token_offsets = check_token_offsets(token_offsets, q4.shape[2], k4.shape[2], spec)
    q4, k4, v4 = autocast_inputs(q4, k4, v4)
    with autocast_disabled(q4.device):
        run = causal_context_parallel_attention if spec.causal is not None else context_parallel_attention
        out = run(name, q4, k4, v4, spec, group, token_offsets)
    return out.transpose(1, 2) if layout == "bnhd" else out


def vicinity_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                              cu_seqlens_k: torch.Tensor, grids: Sequence[int | Sequence[int]],
                              kv_grids: Sequence[int | Sequence[int]] | None = None, *, variant: str = "sum",
                              feature_map: str = "relu", eps: float = 1e-4, den_floor: float = 0.0,
                              backend: str = "auto", num_prefix_tokens: int = 0,
                              clamp: tuple[float, float] | None = None,
                              check_cu_seqlens_on_host: bool = True, causal: str | None = None) -> torch.Tensor:
    """Vicinity attention over a pack of sequences of different grids (e.g. images of different sizes).

    The tokens of S sequences lie one after another (FlashAttention's packed "varlen" layout);
    sequence i attends only within itself, with its own query grid ``grids[i]`` and key grid
    ``kv_grids[i]``. The result equals ``vicinity_attention`` called on each sequence alone (layout
    "bnhd", batch 1), forward and gradients, on every backend.

    Args:
        q: [Tq, H, D], k: [Tk, H, D], v: [Tk, H, Dv]: the packed sequences (any strides), one dtype
            (float16/bfloat16/float32/float64) and device.
        cu_seqlens_q, cu_seqlens_k: int32 [S + 1] on q's device: sequence i holds query tokens
            ``cu_seqlens_q[i]:cu_seqlens_q[i + 1]`` and key/value tokens ``cu_seqlens_k[i]:cu_seqlens_k[i + 1]``;
            0 first, strictly increasing (no zero-length sequences: every sequence has a grid of at
            least one token), last entry Tq / Tk. Checked against the grids (which alone fix the
            offsets), reading the S + 1 values back from the device in eager mode; under
            torch.compile, or with ``check_cu_seqlens_on_host=False``, the check is a device-side
            assertion instead (no read).
        grids: S query grids, each 1 to 3 positive ints (an int is a 1-d grid), all with the same
            number of axes; ``num_prefix_tokens + prod(grids[i])`` is sequence i's query length.
        kv_grids: S key grids with as many axes (default ``grids``).
        variant, feature_map, eps, den_floor, clamp, causal: as for ``vicinity_attention``, shared by all
            sequences (with ``causal="frames"`` each sequence has its own frames: the first axis of its grids).
        backend: "auto" (triton on CUDA when available, else torch; torch for float64), "triton" (the
            whole pack in one kernel launch per pass), "torch" (one batched call per group of sequences
            with equal grids) or "reference" (one quadratic call per sequence).
        num_prefix_tokens: class/register tokens at the front of every sequence (q and k alike).
        check_cu_seqlens_on_host: True (default) reads cu_seqlens back to check them with a clear
            error: one device-to-host read per call, which CUDA graphs cannot capture. False checks
            them on the device instead (a mismatch fails asynchronously with a device-side assertion):
            the call then reads nothing back, and the triton backend is CUDA-graph safe once a pack of
            these grids has been seen (its per-sequence table is built once per set of grids).

    Returns:
        o: [Tq, H, Dv], q's dtype and device (the autocast dtype under ``torch.autocast``, unless
        q is float64); differentiable with respect to q, k and v.
    """
    spec = validate_varlen_call(q, k, v, cu_seqlens_q, cu_seqlens_k, grids, kv_grids, variant=variant,
                                feature_map=feature_map, eps=eps, backend=backend,
                                num_prefix_tokens=num_prefix_tokens, den_floor=den_floor, clamp=clamp,
                                host_check=check_cu_seqlens_on_host, causal=causal)
    name = resolve_backend(backend, q.device, q.dtype)
    if name == "triton" and not triton_available():
        from .vicinity import triton_backend  # noqa: F401  (raises the ImportError's reason)
    q, k, v = autocast_inputs(q, k, v)
    if q.shape[1] == 0:
        # No heads: nothing to compute, but keep the graph so autograd still works.
        return q.new_zeros(q.shape[0], 0, v.shape[-1]) + 0 * (q.sum() + k.sum() + v.sum())
    with autocast_disabled(q.device):
        return varlen_attention(name, q, k, v, spec)


def vicinity_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: FrameCache) -> torch.Tensor:
    """The next frames of a frame-causal stream: ``cache.step(q, k, v)`` (:class:`FrameCache`).

    q, k, v hold the grid tokens of n >= 1 whole frames (the prefix tokens in front on the first step),
    in the cache's layout; the result equals the rows of these frames in
    ``vicinity_attention(..., causal="frames")`` over the whole clip, computed in O(frames) time and memory
    from the states the cache holds, which then move past these frames. Inference only (no autograd
    through the cache). See docs/video.md.
    """
    if not isinstance(cache, FrameCache):
        raise TypeError(f"cache must be a vicinity_attn.FrameCache, got {type(cache).__name__}")
    return cache.step(q, k, v)


def knn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: int, *, scale: float | None = None,
                  layout: str = "bhnd", backend: str = "auto") -> torch.Tensor:
    """k-NN attention (Wang et al., KVT): softmax attention where each query keeps its topk largest scores.

    s_ij = scale * q_i . k_j; row i keeps the s_ij >= tau_i, tau_i the topk-th largest score of the
    row, and o_i = sum_j softmax_j(s_ij | kept) v_j. Ties: the authors' code (``torch.topk`` + a
    scattered mask, the "reference" backend) keeps exactly topk entries, choosing arbitrarily among
    scores tied with tau_i; "torch" and "triton" keep every tied entry. With continuous inputs ties
    have probability 0 and all backends agree.

    Args:
        q: [B, H, Nq, D] (layout "bhnd") or [B, Nq, H, D] ("bnhd"); float16/bfloat16/float32/float64.
        k: [B, H, Nk, D] or [B, Nk, H, D], same dtype and device as q (Nk may differ from Nq).
        v: [B, H, Nk, Dv] or [B, Nk, H, Dv]; Dv may differ from D.
        topk: keys kept per query, 1 <= topk <= Nk (topk = Nk is plain softmax attention).
        scale: score scale; None means D ** -0.5.
        layout: "bhnd" or "bnhd", for inputs and output alike.
        backend: "auto" (triton on CUDA when available, else torch; torch for float64), "triton" (fused kernels: CUDA,
            or CPU under TRITON_INTERPRET=1), "torch" (blocks of query rows, any device) or
            "reference" (dense, the authors' formulation; small N only). "torch" and "triton" hold
            at most a block of rows of scores and save only q, k, v, o and two floats per query row.

    Returns:
        o: [B, H, Nq, Dv] or [B, Nq, H, Dv] (as ``layout``), q's dtype and device (under
        ``torch.autocast``: the autocast dtype, unless q is float64); differentiable in q, k, v.
    """
    q4, k4, v4, topk, scale = validate_knn_call(q, k, v, topk, scale=scale, layout=layout, backend=backend)
    name = backend
    if backend == "auto":
        # float64 goes to torch, as for vicinity_attention: the compile gate builds no fp64 k-NN kernels.
        cuda_kernels = q.device.type == "cuda" and q.dtype != torch.float64
        name = "triton" if cuda_kernels and knn_triton_available() else "torch"
    q4, k4, v4 = autocast_inputs(q4, k4, v4)
    if q4.numel() == 0 or v4.shape[-1] == 0:
        # Nothing to compute (empty batch, heads or queries), but keep the graph for autograd.
        out = q4.new_zeros(*q4.shape[:3], v4.shape[-1]) + 0 * (q4.sum() + k4.sum() + v4.sum())
    else:
        with autocast_disabled(q4.device):
            if name == "reference":
                out = reference_knn_attention(q4, k4, v4, topk, scale)
            else:
                if name == "triton" and not knn_triton_available():
                    from .knn import triton_backend as knn_triton  # noqa: F401  (raises the ImportError's reason)
                out = custom_op_knn_attention(name, q4, k4, v4, topk, scale)
    return out.transpose(1, 2) if layout == "bnhd" else out


def knn_triton_available() -> bool:
    """True when the k-NN triton backend can be imported."""
    try:
        from .knn import triton_backend as knn_triton  # noqa: F401
    except ImportError:
        return False
    return True
