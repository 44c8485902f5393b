"""Argument checking for the public API: every bad call fails here, with the argument named."""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from .feature_maps import FEATURE_MAPS
from .positions import VARIANTS
from .spec import VarlenSpec, VicinitySpec

LAYOUTS = ("bhnd", "bnhd")
BACKENDS = ("auto", "triton", "torch", "reference")
CAUSAL_MODES = ("frames",)
MAX_AXES = 3
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def normalize_grid(grid: int | Sequence[int], name: str = "grid") -> tuple[int, ...]:
    """A grid as a tuple of 1 to 3 positive Python ints; an int means a 1-d grid."""
    if type(grid) is tuple and 1 <= len(grid) <= MAX_AXES and all(type(s) is int and s > 0 for s in grid):
        return grid    # the common case, without the ABC checks below (host time of eager calls)
    if isinstance(grid, torch.Tensor):
        grid = grid.tolist()
    if isinstance(grid, numbers.Integral) and not isinstance(grid, bool):
        grid = (grid,)
    if not isinstance(grid, (tuple, list, torch.Size)):
        raise TypeError(f"{name} must be an int or a sequence of 1 to {MAX_AXES} ints, got {type(grid).__name__}")
    out = []
    for size in grid:
        if isinstance(size, bool) or not isinstance(size, numbers.Integral):
            raise TypeError(f"{name} must contain ints, got {grid!r}")
        if size <= 0:
            raise ValueError(f"{name} sizes must be positive, got {tuple(grid)}")
        # A SymInt (a dynamic size under torch.compile) stays symbolic: int() would specialise it.
        out.append(size if isinstance(size, torch.SymInt) else int(size))
    if not 1 <= len(out) <= MAX_AXES:
        raise ValueError(f"{name} must have 1 to {MAX_AXES} axes, got {len(out)}: {tuple(grid)}")
    return tuple(out)


def tokens_match(n_tokens: int, num_prefix_tokens: int, sizes: Sequence[int]) -> bool:
    """Whether n_tokens == num_prefix_tokens + prod(sizes), for sizes >= 1.

    With symbolic sizes (torch.compile, dynamic shapes) it is asked as "prod(sizes[1:]) divides the grid
    tokens, sizes[0] times": a guard with a floor division, which the shape environment keeps as it is.
    The plain equality would make it rewrite the tensor's token count as the product of the grid sizes,
    int arguments whose symbols are not known to be positive, and Inductor then fails on every stride
    built from them ("cannot determine truth value of Relational")."""
    sizes = tuple(sizes)
    if not any(isinstance(n, torch.SymInt) for n in (n_tokens, *sizes)):
        return n_tokens == num_prefix_tokens + math.prod(sizes)
    grid_tokens, inner = n_tokens - num_prefix_tokens, math.prod(sizes[1:])
    return bool(grid_tokens % inner == 0) and bool(grid_tokens // inner == sizes[0])


def check_option(value: object, name: str, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def check_dense(t: torch.Tensor, name: str) -> None:
    """A plain strided tensor: sparse (COO, CSR, ...), mkldnn and nested tensors have no strides the
    backends could index (they fail deep inside, or give wrong answers, without this check)."""
    if t.is_nested:
        raise TypeError(f"{name} must be a dense (strided) tensor, got a nested tensor")
    if t.layout != torch.strided:
        kind = str(t.layout).replace("torch.", "").lstrip("_")
        raise TypeError(f"{name} must be a dense (strided) tensor, got a {kind} tensor (layout {t.layout}); "
                        f"convert it with .to_dense() first")


def check_tensor(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_dense(t, name)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {t.dtype}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-d, got {t.dim()}-d with shape {tuple(t.shape)}")
    return t


def _is_real(x: object) -> bool:
    kind = type(x)
    return kind is float or kind is int or (kind is not bool and isinstance(x, numbers.Real))


def check_normaliser(eps: object, den_floor: object = 0.0) -> tuple[float, float]:
    """(eps, den_floor) of den_i = max(sum_j phi(q_i).phi(k_j) w(i,j), den_floor) + eps: both finite
    and >= 0, and not both 0 (den would be 0 on rows whose features are all 0)."""
    # Comparisons rather than math.isfinite: they also trace when torch.compile makes eps symbolic.
    if not _is_real(den_floor) or not 0 <= den_floor < math.inf:
        raise ValueError(f"den_floor must be a finite number >= 0, got {den_floor!r}")
    if not _is_real(eps) or not 0 <= eps < math.inf or (eps == 0 and den_floor == 0):
        raise ValueError(f"eps must be a positive finite number, or 0 when den_floor > 0; got eps = {eps!r} "
                         f"with den_floor = {den_floor!r}")
    return check_representable(float(eps), "eps"), check_representable(float(den_floor), "den_floor")


def check_eps(eps: object) -> float:
    """A positive finite eps (the normaliser without a floor)."""
    return check_normaliser(eps, 0.0)[0]


def check_clamp(clamp: object) -> tuple[float, float] | None:
    """None, or (min_mag, max_mag) with 0 <= min_mag <= max_mag, min_mag finite (max_mag may be inf)."""
    if clamp is None:
        return None
    if not isinstance(clamp, (tuple, list)) or len(clamp) != 2 or not all(_is_real(c) for c in clamp):
        raise ValueError(f"clamp must be None or a pair (min_mag, max_mag) of numbers, got {clamp!r}")
    lo, hi = clamp
    if not (0 <= lo < math.inf and lo <= hi):
        raise ValueError(f"clamp must satisfy 0 <= min_mag <= max_mag with min_mag finite, got {tuple(clamp)!r}")
    lo, hi = check_representable(float(lo), "clamp min_mag"), float(hi)
    return lo, hi if hi == math.inf else check_representable(hi, "clamp max_mag")


# The smallest power-of-two state scale of the triton kernels (2^-ceil(log2 Nk), Nk < 2^31; see
# kernels/vicinity/configs.pow2_scale): the constants that scale with the states must stay normal there.
MIN_STATE_SCALE = 2.0 ** -31


def check_representable(value: float, name: str) -> float:
    """Reject a constant the backends' arithmetic cannot hold (eps, den_floor, a clamp bound): nonzero, it
    must be a normal float32 number even after the kernels' state scaling (by as little as 2^-31), and
    finite in float32. float32 for every input dtype: the backends compute in float32 for half and single
    inputs, and the triton kernels take these constants as float32 scalars whatever the inputs. A
    subnormal or zero eps would make rows whose features are all 0 come out 0 / 0 = NaN (the answer is 0);
    a GPU flushes subnormals to zero. (One bound for every sequence length, so that torch.compile need
    not specialise on it.)"""
    info = torch.finfo(torch.float32)
    lo_limit = info.tiny / MIN_STATE_SCALE
    if value == 0:
        return value
    if value < lo_limit:
        raise ValueError(f"{name} = {value!r} is too small for torch.float32 arithmetic: it must be 0 or at least "
                         f"{lo_limit:.3g} (the smallest normal float32, {info.tiny:.3g}, over the kernels' "
                         f"smallest state scale 2^-31)")
    if value > info.max:
        raise ValueError(f"{name} = {value!r} overflows torch.float32 (largest finite {info.max:.3g})")
    return value


def check_prefix(num_prefix_tokens: object) -> int:
    if type(num_prefix_tokens) is int and num_prefix_tokens >= 0:
        return num_prefix_tokens
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, numbers.Integral):
        raise TypeError(f"num_prefix_tokens must be an int, got {type(num_prefix_tokens).__name__}")
    if num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
    return int(num_prefix_tokens)


def check_positive_int(value: object, name: str) -> int:
    """A positive int (a SymInt, i.e. a dynamic size under torch.compile, is accepted as it is)."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_probability(value: object, name: str) -> float:
    """A dropout probability: a real number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (a dropout probability), got {value!r}")
    return float(value)


def check_layer_input(x: object, H: object, W: object, channels: int, channels_name: str,
                      num_prefix_tokens: int = 0, sharded: bool = False) -> torch.Tensor:
    """The input of a layer's ``forward(x, H, W)``: x [B, num_prefix_tokens + H*W, channels]; with
    ``sharded`` (context parallelism) x holds one rank's tokens, checked against H*W by the op."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a 3-d tensor [B, N, C], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    check_dense(x, "x")
    check_positive_int(H, "H")
    check_positive_int(W, "W")
    if x.shape[2] != channels:
        raise ValueError(f"x must have {channels} channels ({channels_name}), got {x.shape[2]}")
    P = num_prefix_tokens
    if not sharded and not tokens_match(x.shape[1], P, (H, W)):
        raise ValueError(f"H * W (+ {P} prefix tokens) must equal the number of tokens: "
                         f"{H} * {W} + {P} != {x.shape[1]}")
    return x


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The q / k / v checks every attention call shares (each a dense 4-d floating tensor; one dtype, one
    device; shared batch and head sizes; k and v with one token count; q and k with one head dim, every
    head dim >= 1), for a ``layout`` already checked; returns q, k, v as [B, H, N, D] views."""
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        check_tensor(t, name)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    if layout == "bnhd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    dims = "[B, H, N, D]" if layout == "bhnd" else "[B, N, H, D]"
    (B, H, _, D), (Bk, Hk, Nk, Dk), (Bv, Hv, Nv, Dv) = q.shape, k.shape, v.shape
    if (Bk, Hk) != (B, H) or (Bv, Hv) != (B, H):
        raise ValueError(f"q, k and v must share batch and head sizes (layout {layout!r}: {dims}); got "
                         f"(B, H) = {(B, H)} for q, {(Bk, Hk)} for k, {(Bv, Hv)} for v")
    if Nv != Nk:
        raise ValueError(f"k and v must have the same number of tokens, got {Nk} and {Nv}")
    if D < 1 or Dv < 1:
        raise ValueError(f"head dims must be at least 1, got D = {D} for q/k and Dv = {Dv} for v")
    if Dk != D:
        raise ValueError(f"q and k must have the same head dim, got {D} and {Dk}")
    return q, k, v


def check_options(*, variant: object, feature_map: object, eps: object, den_floor: object, clamp: object,
                  num_prefix_tokens: object, backend: object, causal: object = None) -> dict:
    """Check the options a dense and a packed call share; returns them normalised, as the keyword
    arguments of a spec (``spec.CallOptions``)."""
    check_option(backend, "backend", BACKENDS)
    variant = check_option(variant, "variant", VARIANTS)
    feature_map = check_option(feature_map, "feature_map", FEATURE_MAPS)
    eps, den_floor = check_normaliser(eps, den_floor)
    if causal is not None and (not isinstance(causal, str) or causal not in CAUSAL_MODES):
        raise ValueError(f"causal must be None or one of {CAUSAL_MODES}, got {causal!r}")
    return dict(variant=variant, feature_map=feature_map, eps=eps, den_floor=den_floor, clamp=check_clamp(clamp),
                num_prefix_tokens=check_prefix(num_prefix_tokens), causal=causal)


def check_frame_grids(grid: tuple[int, ...], kv_grid: tuple[int, ...], grid_name: str = "grid",
                      kv_name: str = "kv_grid") -> None:
    """A frame-causal call's grids: 2 or 3 axes (frames first), the same number of frames on both."""
    if len(grid) < 2:
        raise ValueError(f"causal='frames' needs a 2-d or 3-d {grid_name} with frames along its first axis, got "
                         f"{grid_name} {grid}: token-causal attention over a 1-d sequence is another algorithm "
                         "(not supported)")
    if kv_grid[0] != grid[0]:
        raise ValueError(f"causal='frames': {kv_name} {kv_grid} must have as many frames (first axis) as "
                         f"{grid_name} {grid}")


# Options (and grids) of recent calls that passed the checks, with what the checks made of them: a layer
# calls with the same options every step. Only plain Python values are keys (no tensors, no symbolic sizes),
# each with its type.
_KNOWN_OPTIONS: dict = {}
_PLAIN_TYPES = (int, float, str, type(None))


def _typed_key(values: tuple) -> tuple | None:
    """``values`` with each value's type beside it (1, 1.0 and True are equal as dict keys, yet not equally
    valid options), or None when one is not a plain int / float / str / None or a tuple of them."""
    key = []
    for x in values:
        t = type(x)
        if t is tuple:
            if not all(type(y) in _PLAIN_TYPES for y in x):
                return None
            key.append((t, tuple((type(y), y) for y in x)))
        elif t in _PLAIN_TYPES:
            key.append((t, x))
        else:
            return None
    return tuple(key)


def validate_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid, kv_grid, *, variant: str,
                  feature_map: str, eps: float, layout: str, backend: str,
                  num_prefix_tokens: int = 0, den_floor: float = 0.0,
                  clamp: tuple[float, float] | None = None, causal: str | None = None,
                  sharded: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, VicinitySpec]:
    """Check a ``vicinity_attention`` call and return q, k, v as [B, H, N, D] views and the spec.
    ``sharded``: q, k, v are one rank's shards (context parallelism), so their token counts are checked
    against the grids later, summed over ranks (:func:`check_shard_counts`)."""
    # Not while tracing: torch.compile would guard on the cache's contents and recompile whenever it grows.
    key = None if torch.compiler.is_compiling() else _typed_key(
        (grid, kv_grid, variant, feature_map, eps, layout, backend, num_prefix_tokens, den_floor, clamp, causal))
    known = None if key is None else _KNOWN_OPTIONS.get(key)
    if known is None:
        layout = check_option(layout, "layout", LAYOUTS)
        options = check_options(variant=variant, feature_map=feature_map, eps=eps, den_floor=den_floor, clamp=clamp,
                                num_prefix_tokens=num_prefix_tokens, backend=backend, causal=causal)
        grid = normalize_grid(grid, "grid")
        kv_grid = grid if kv_grid is None else normalize_grid(kv_grid, "kv_grid")
        if len(kv_grid) != len(grid):
            raise ValueError(f"kv_grid must have as many axes as grid, got {kv_grid} for grid {grid}")
        if options["causal"] is not None:
            check_frame_grids(grid, kv_grid)
        known = (layout, options, grid, kv_grid)
        if key is not None:
            if len(_KNOWN_OPTIONS) >= 1024:
                _KNOWN_OPTIONS.clear()
            _KNOWN_OPTIONS[key] = known
    layout, options, grid, kv_grid = known
    n_prefix = options["num_prefix_tokens"]
    q, k, v = check_qkv(q, k, v, layout)
    Nq, Nk = q.shape[2], k.shape[2]
    if not sharded and not tokens_match(Nq, n_prefix, grid):
        raise ValueError(f"grid {grid} has {math.prod(grid)} tokens (+ {n_prefix} prefix tokens) "
                         f"but q has {Nq} tokens")
    if not sharded and not tokens_match(Nk, n_prefix, kv_grid):
        name = "kv_grid" if kv_grid is not grid else "grid (used as kv_grid)"
        raise ValueError(f"{name} {kv_grid} has {math.prod(kv_grid)} tokens (+ {n_prefix} prefix tokens) "
                         f"but k has {Nk} tokens")
    spec = VicinitySpec(grid=grid, kv_grid=kv_grid, **options)
    return q, k, v, spec


def check_group(group: object, backend: str) -> None:
    """``group`` of ``vicinity_attention`` (context parallelism): a process group of an initialised
    ``torch.distributed``, with a backend that can run the context-parallel pieces."""
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("group was given but torch.distributed is not initialised: call "
                           "torch.distributed.init_process_group first (or pass group=None)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup (e.g. torch.distributed.group.WORLD or "
                        f"one from torch.distributed.new_group), got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError("group does not contain this process (torch.distributed.get_rank(group) is -1)")
    if backend == "reference":
        raise ValueError("backend='reference' does not support context parallelism (group=...): use 'torch', "
                         "'triton' or 'auto'")


def check_token_offsets(token_offsets: object, n_queries: int, n_keys: int, spec: VicinitySpec) -> tuple[int, int]:
    """``token_offsets`` of ``vicinity_attention`` (context parallelism): (query offset, key offset) of this
    rank's shards, ints >= 0 with the shards inside the whole sequence that the grids describe."""
    if (not isinstance(token_offsets, (tuple, list)) or len(token_offsets) != 2
            or any(isinstance(o, bool) or not isinstance(o, numbers.Integral) or o < 0 for o in token_offsets)):
        raise ValueError(f"token_offsets must be a pair (q_offset, k_offset) of ints >= 0, got {token_offsets!r}")
    P = spec.num_prefix_tokens
    for offset, n, total, side in ((token_offsets[0], n_queries, P + math.prod(spec.grid), "q"),
                                   (token_offsets[1], n_keys, P + math.prod(spec.kv_grid), "k")):
        if offset + n > total:
            raise ValueError(f"token_offsets: this rank's {side} shard (offset {offset}, {n} tokens) ends past the "
                             f"whole sequence's {total} tokens (grid, kv_grid and num_prefix_tokens)")
    return int(token_offsets[0]), int(token_offsets[1])


def check_shard_counts(table: list[list[int]], spec: VicinitySpec) -> None:
    """Context parallelism: the ranks' shard lengths [[n_q, n_k] per rank] must add up to the grids'
    token counts (``num_prefix_tokens + prod(grid)`` queries, ``num_prefix_tokens + prod(kv_grid)`` keys)."""
    n_q, n_k = sum(r[0] for r in table), sum(r[1] for r in table)
    P = spec.num_prefix_tokens
    if P + math.prod(spec.grid) != n_q:
        raise ValueError(f"grid {spec.grid} has {math.prod(spec.grid)} tokens (+ {P} prefix tokens) but the "
                         f"q shards of the group's ranks have {[r[0] for r in table]} tokens, {n_q} in all "
                         "(with group=..., grid describes the whole sequence)")
    if P + math.prod(spec.kv_grid) != n_k:
        raise ValueError(f"kv_grid {spec.kv_grid} has {math.prod(spec.kv_grid)} tokens (+ {P} prefix tokens) but the "
                         f"k shards of the group's ranks have {[r[1] for r in table]} tokens, {n_k} in all "
                         "(with group=..., kv_grid describes the whole sequence)")


def check_sr_shards(lengths: list[int], num_prefix_tokens: int, H: int, W: int, sr_ratio: int) -> None:
    """Context parallelism with spatially reduced keys (``sr_ratio > 1``): each rank reduces its own grid
    tokens with the sr_ratio x sr_ratio convolution, so every rank's grid tokens (``lengths``: every rank's
    token count, prefix tokens first on the first ranks) must start on a whole multiple of sr_ratio rows
    and end on one (or at the end of the grid). Checked for all ranks on every rank (all raise alike)."""
    block = sr_ratio * W
    offset = 0
    for rank, n in enumerate(lengths):
        g0 = max(offset, num_prefix_tokens) - num_prefix_tokens
        g1 = max(offset + n, num_prefix_tokens) - num_prefix_tokens
        if g0 % block or (g1 % block and g1 != H * W):
            raise ValueError(f"with group=... and sr_ratio={sr_ratio}, every rank's shard of grid tokens must start "
                             f"and end on whole multiples of sr_ratio rows (sr_ratio * W = {block} tokens) or at "
                             f"the end of the grid; rank {rank} holds grid tokens {g0}..{g1 - 1} of {H}x{W}")
        offset += n


def check_topk(topk: object, nk: int) -> int:
    """``topk`` of ``knn_attention``: an int with 1 <= topk <= Nk (a SymInt is accepted as it is)."""
    if isinstance(topk, bool) or not isinstance(topk, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"topk must be an int, got {type(topk).__name__}")
    if not 1 <= topk <= nk:
        raise ValueError(f"topk must satisfy 1 <= topk <= Nk = {nk} (the number of keys), got {topk}")
    return topk if isinstance(topk, torch.SymInt) else int(topk)


def check_scale(scale: object, head_dim: int) -> float:
    """``scale`` of ``knn_attention``: a finite real number; None means head_dim ** -0.5."""
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not -math.inf < scale < math.inf:
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    return float(scale)


def validate_knn_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: int, *, scale: float | None,
                      layout: str, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, float]:
    """Check a ``knn_attention`` call; returns q, k, v as [B, H, N, D] views, topk and the resolved scale."""
    layout = check_option(layout, "layout", LAYOUTS)
    check_option(backend, "backend", BACKENDS)
    q, k, v = check_qkv(q, k, v, layout)
    Nk, D = k.shape[2], q.shape[-1]
    topk = check_topk(topk, Nk)
    return q, k, v, topk, check_scale(scale, D)


# ----------------------------------------------------------------------------------------------------
# vicinity_attention_varlen: packed sequences of different grids
# ----------------------------------------------------------------------------------------------------

def check_packed_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q, k, v of a varlen call: 3-d [T, H, D] tensors, then the checks every call shares (:func:`check_qkv`,
    on the pack as one batch entry)."""
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if isinstance(t, torch.Tensor) and t.dim() != 3:
            raise ValueError(f"{name} must be 3-d [T, H, D] (tokens of all sequences packed), got {t.dim()}-d "
                             f"with shape {tuple(t.shape)}")
    check_qkv(*(t.unsqueeze(0) if isinstance(t, torch.Tensor) else t for t in (q, k, v)), "bnhd")


def normalize_grids(grids: object, name: str, n_axes: int | None = None) -> tuple[tuple[int, ...], ...]:
    """One grid per sequence (each as :func:`normalize_grid`), all with the same number of axes."""
    if isinstance(grids, torch.Tensor):
        grids = grids.tolist()
    if not isinstance(grids, (tuple, list)):
        raise TypeError(f"{name} must be a list with one grid per sequence, got {type(grids).__name__}")
    if len(grids) == 0:
        raise ValueError(f"{name} must hold at least one grid (one per sequence), got none")
    out = tuple(normalize_grid(g, f"{name}[{i}]") for i, g in enumerate(grids))
    n_axes = len(out[0]) if n_axes is None else n_axes
    for i, g in enumerate(out):
        if len(g) != n_axes:
            raise ValueError(f"every grid of a varlen call must have the same number of axes: {name}[{i}] = {g} "
                             f"has {len(g)}, grids[0] has {n_axes}")
    return out


def check_cu_seqlens(cu: object, name: str, expected: list[int], total: int, device: torch.device,
                     grids_name: str, n_prefix: int, host_check: bool = True) -> None:
    """cu_seqlens: int32 [S + 1] on q's device, 0 first, strictly increasing, last == the packed token count,
    and each sequence as long as its grid says (``expected``: the offsets the grids give). The values are
    read back to the host for a clear error, unless ``host_check`` is False (or nothing can be read:
    tracing, meta): then the device asserts the agreement without a read."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (int32, [number of sequences + 1]), got {type(cu).__name__}")
    check_dense(cu, name)
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be an int32 tensor (FlashAttention's convention), got {cu.dtype}")
    if cu.dim() != 1:
        raise ValueError(f"{name} must be 1-d [number of sequences + 1], got shape {tuple(cu.shape)}")
    if cu.shape[0] != len(expected):
        raise ValueError(f"{name} must have len({grids_name}) + 1 = {len(expected)} entries (one more than the "
                         f"number of sequences), got {cu.shape[0]}")
    if cu.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {cu.device}")
    if not host_check or torch.compiler.is_compiling() or cu.device.type == "meta":
        # No values to read while tracing (or on meta); the offsets come from the grids, so the graph
        # asserts the agreement instead (checked when the compiled code runs).
        torch._assert_async((cu == torch.tensor(expected, dtype=torch.int32, device=cu.device)).all(),
                            f"{name} disagrees with the offsets {grids_name} give")
        return
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    for i in range(len(values) - 1):
        if values[i + 1] <= values[i]:
            raise ValueError(f"{name} must be strictly increasing (every sequence has at least one grid token; "
                             f"zero-length sequences are not allowed), got {name}[{i}] = {values[i]} and "
                             f"{name}[{i + 1}] = {values[i + 1]}")
    if values[-1] != total:
        raise ValueError(f"{name}[-1] must equal the number of packed tokens {total}, got {values[-1]}")
    for i in range(len(values) - 1):
        got, want = values[i + 1] - values[i], expected[i + 1] - expected[i]
        if got != want:
            raise ValueError(f"{grids_name}[{i}] has {want - n_prefix} tokens (+ {n_prefix} prefix tokens) but "
                             f"{name} gives sequence {i} {got} tokens")


def validate_varlen_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, grids, kv_grids, *, variant: str, feature_map: str,
                         eps: float, backend: str, num_prefix_tokens: int = 0, den_floor: float = 0.0,
                         clamp: tuple[float, float] | None = None, host_check: bool = True,
                         causal: str | None = None) -> VarlenSpec:
    """Check a ``vicinity_attention_varlen`` call and return its spec."""
    options = check_options(variant=variant, feature_map=feature_map, eps=eps, den_floor=den_floor, clamp=clamp,
                            num_prefix_tokens=num_prefix_tokens, backend=backend, causal=causal)
    n_prefix = options["num_prefix_tokens"]
    check_packed_qkv(q, k, v)
    Tq, Tk = q.shape[0], k.shape[0]
    grids = normalize_grids(grids, "grids")
    if kv_grids is None:
        kv_grids, kv_name = grids, "grids (used as kv_grids)"
    else:
        kv_grids, kv_name = normalize_grids(kv_grids, "kv_grids", len(grids[0])), "kv_grids"
        if len(kv_grids) != len(grids):
            raise ValueError(f"kv_grids must hold one grid per sequence like grids: {len(kv_grids)} != {len(grids)}")
    if options["causal"] is not None:
        for i, (g, kg) in enumerate(zip(grids, kv_grids)):
            check_frame_grids(g, kg, f"grids[{i}]", f"kv_grids[{i}]")
    spec = VarlenSpec(grids=grids, kv_grids=kv_grids, **options)
    if not isinstance(host_check, bool):
        raise TypeError(f"check_cu_seqlens_on_host must be a bool, got {type(host_check).__name__}")
    check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", spec.offsets("query"), Tq, q.device, "grids", n_prefix, host_check)
    check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", spec.offsets("key"), Tk, q.device, kv_name, n_prefix, host_check)
    return spec
