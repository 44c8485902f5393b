"""Streaming frame-causal vicinity attention: a constant-memory state cache, one frame (or a few) per step.

A frame-causal call (``causal="frames"``) lets frame t see frames <= t, so its outputs for frames
0 .. t do not depend on later frames: a stream can compute them as the frames arrive. The cache holds
per (batch element, head) the states (S, z) of every key seen so far (F x D x Dv + F x D floats, unscaled
and unclamped), the next frame's index and the grid; each :meth:`FrameCache.step` runs the window of the
new frames with those states as its ``init`` (:mod:`.frames`) in O(frame) time and memory, and keeps its
``carry``. Outputs equal the whole frame-causal call's, frame by frame.

The time axis' angle divides by the grid's frame count T (theta = (pi/2) t / T): a cache serves a stream
of at most T frames, the grid it was made for.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..common.custom_ops import autocast_disabled, autocast_inputs
from ..common.overflow import check_overflow, checks_overflow
from ..common.spec import VicinitySpec
from ..common.validation import LAYOUTS, check_frame_grids, check_option, check_options, check_qkv, normalize_grid


class FrameCache:
    """The state cache of one frame-causal stream (frames along the first axis of ``grid``).

    Args:
        grid: the stream's query grid (T, ...) with 2 or 3 axes: T is the most frames it can take.
        kv_grid: key / value grid with the same T (default ``grid``).
        variant, feature_map, eps, den_floor, clamp, num_prefix_tokens, layout, backend: as for
            :func:`vicinity_attn.vicinity_attention` (the options of the frame-causal call the stream
            reproduces). Prefix tokens, if any, come in front of the first step's frames; they see only
            each other, and every later token sees them.

    Attributes:
        spec: the call's :class:`~vicinity_attn.common.spec.VicinitySpec` (``causal="frames"``).
        frame: the index of the next frame (0 for a fresh cache).
        states: None before the first step, else (S [B, H, F, D, Dv], z [B, H, F, D]) in float32 (float64
            for float64 inputs): the states of every key seen so far (the reference backend keeps the keys
            and values instead: its memory grows with the stream).
    """

    def __init__(self, grid: int | Sequence[int], kv_grid: int | Sequence[int] | None = None, *,
                 variant: str = "sum", feature_map: str = "relu", eps: float = 1e-4, den_floor: float = 0.0,
                 clamp: tuple[float, float] | None = None, num_prefix_tokens: int = 0, layout: str = "bhnd",
                 backend: str = "auto") -> None:
        options = check_options(variant=variant, feature_map=feature_map, eps=eps, den_floor=den_floor, clamp=clamp,
                                num_prefix_tokens=num_prefix_tokens, backend=backend, causal="frames")
        grid = normalize_grid(grid, "grid")
        kv_grid = grid if kv_grid is None else normalize_grid(kv_grid, "kv_grid")
        if len(kv_grid) != len(grid):
            raise ValueError(f"kv_grid must have as many axes as grid, got {kv_grid} for grid {grid}")
        check_frame_grids(grid, kv_grid)
        self.spec = VicinitySpec(grid=grid, kv_grid=kv_grid, **options)
        self.layout = check_option(layout, "layout", LAYOUTS)
        self.backend = backend
        self.reset()

    def reset(self) -> None:
        """Forget the stream: the next step is frame 0 again."""
        self.frame = 0
        self.states: tuple[torch.Tensor, torch.Tensor] | None = None
        self._past: tuple[torch.Tensor, torch.Tensor] | None = None      # the reference's keys and values
        self._shape: tuple | None = None

    @property
    def n_frames(self) -> int:
        """T: the most frames this cache can take (the grid's first axis)."""
        return self.spec.n_frames

    def __repr__(self) -> str:
        return (f"FrameCache(grid={self.spec.grid}, kv_grid={self.spec.kv_grid}, frame={self.frame}/"
                f"{self.n_frames}, backend={self.backend!r})")

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The outputs of the next frames, and the cache moved past them.

        q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv] (layout "bhnd"; [B, N, H, D] for "bnhd"): the
        grid tokens of n >= 1 whole frames (``prod(grid[1:])`` query and ``prod(kv_grid[1:])`` key tokens
        each), preceded on the first step by the ``num_prefix_tokens`` prefix tokens. Returns o like
        ``vicinity_attention(..., causal="frames")`` gives for those tokens. Inference only: autograd does
        not run through the cache (a ValueError where it would be asked to; train with the whole call).
        """
        from ..functional import resolve_backend
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise ValueError("FrameCache.step is for inference and does not record gradients: run it under "
                             "torch.no_grad() or torch.inference_mode(), or train with "
                             "vicinity_attention(..., causal='frames') over the whole clip")
        q4, k4, v4 = check_qkv(q, k, v, self.layout)
        B, H, Nq, D = q4.shape
        Dv = v4.shape[-1]
        name = resolve_backend(self.backend, q4.device, q4.dtype)
        shape = (B, H, D, Dv, q4.dtype, q4.device, name)
        if self._shape is not None and shape != self._shape:
            raise ValueError(f"this stream's steps take (B, H, D, Dv, dtype, device, backend) = {self._shape}, "
                             f"got {shape}: one cache per stream (call reset() to start another)")
        n = self._frames_of(Nq, k4.shape[2])
        q4, k4, v4 = autocast_inputs(q4, k4, v4)
        with autocast_disabled(q4.device):
            o = self._run(name, q4, k4, v4, n)
        self._shape = shape
        self.frame += n
        return o.transpose(1, 2) if self.layout == "bnhd" else o

    def _frames_of(self, n_queries: int, n_keys: int) -> int:
        """The number of whole frames a step's tokens hold (ValueError otherwise, or past the grid's end)."""
        spec, start = self.spec, self.frame
        if start >= spec.n_frames:
            raise ValueError(f"the stream has reached the grid's {spec.n_frames} frames (grid {spec.grid}): the "
                             "time angle divides by that count, so the cache takes no more frames; make a cache "
                             "with more frames, or reset() it")
        from .frames import window_frames
        return window_frames(spec, start, n_queries, n_keys)

    def _run(self, name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int) -> torch.Tensor:
        if name == "reference":
            return self._reference(q, k, v, n)
        if name == "triton":
            from .triton_backend import check_triton_inputs
            from .triton_frames import window_forward
            check_triton_inputs(q, k, v)
        elif name == "torch":
            from .frames import window_forward
        else:
            raise ValueError(f"unknown backend {name!r}")
        o, _, _, _, carry = window_forward(q, k, v, self.spec, self.frame, self.states)
        if checks_overflow(o):
            check_overflow("forward", (o,), (q, k, v), self.spec)
        self.states = carry
        return o

    def _reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int) -> torch.Tensor:
        """The quadratic reference over the whole grid: every key so far, the frames not yet seen as zeros
        (the causal mask hides them from these queries), these queries between zero rows; their rows."""
        from .reference import reference_vicinity_attention
        spec = self.spec
        if self._past is not None:
            k, v = torch.cat([self._past[0], k], dim=2), torch.cat([self._past[1], v], dim=2)
        self._past = (k, v)
        P = spec.num_prefix_tokens
        B, H, _, D = q.shape
        seen_q = (P if self.frame else 0) + self.frame * math.prod(spec.grid[1:])
        total_q = P + math.prod(spec.grid)
        rows = torch.cat([q.new_zeros(B, H, seen_q, D), q, q.new_zeros(B, H, total_q - seen_q - q.shape[2], D)], 2)
        total_k = P + math.prod(spec.kv_grid)
        pad = total_k - k.shape[2]
        keys = torch.cat([k, k.new_zeros(B, H, pad, D)], 2)
        values = torch.cat([v, v.new_zeros(B, H, pad, v.shape[-1])], 2)
        o = reference_vicinity_attention(rows, keys, values, spec)
        return o[:, :, seen_q:seen_q + q.shape[2]]
