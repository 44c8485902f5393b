"""Frame-causal calls (``causal="frames"``): where a token block lies among the frames, and the scan over slots.

Frames are the first grid axis. A launch holds the tokens of ``n_slots`` *slots* one after another: slot 0 is
the prefix tokens (``slot0_len`` of them: the spec's prefix tokens in a window that starts at frame 0, none
otherwise), slot 1 + f the ``frame_len`` grid tokens of the window's local frame f. States are kept per slot,
[BH, n_slots, F, D, Dv] (dS, z, dz likewise): the slot a query reads (forward, dq) holds the states of the
keys of its slot and of every slot before it; the slot a key reads (the key pass) holds the state gradients
of the queries of its slot and of every slot after it.

- The state pass (state.py, FRAMES) gives each program one slot (its "chunk"): it walks that slot's token
  blocks, masked to the slot, and writes the slot's own states (no election, nothing summed across programs).
- ``slot_scan_kernel`` turns those per-slot states into what the per-token passes read: the inclusive prefix
  over slots in slot order (the forward, from ``init``; the clamp per slot; the running sum, unclamped and
  unscaled, is the carry), the clamp mask per slot with the sum over slots (the backward's query side:
  dpre and init_grad), or the suffix over slots in reverse slot order (the key side, from ``carry_grad``).
  One program per (element tile, bh) walks the slots in a fixed order: no atomics, bitwise reproducible.
- The per-token passes (output.py, queries.py's dq pass, keys.py; FRAMES) take their program's token block
  from ``frame_block``: axis 0 of their grid is slot * blocks_per_slot + block, a block never spans two
  slots (a slot's last block is masked), and the states are read at row bh * n_slots + slot.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..fast_launch import launch_kernel
from ..runtime import cdiv, launch_jit
from .clamp import abs_clamp


@triton.jit
def frame_span(slot, slot0_len, frame_len):
    """(lo, hi): the tokens [lo, hi) of ``slot`` among the launch's tokens."""
    hi = slot0_len + slot * frame_len
    lo = tl.where(slot > 0, hi - frame_len, 0)
    return lo, hi


@triton.jit
def frame_block(H, slot0_len, frame_len, blocks_per_slot, BLOCK_N: tl.constexpr):
    """Where a per-token program of a frame-causal launch works (axis 0: slot * blocks_per_slot + block,
    axis 1: bh): (bh, b, h, offs_n, mask_n, slot, lo, active). The slot is a window of the launch's tokens
    from token lo, as a packed sequence is (varlen.py): offs_n are relative to lo (multiples of BLOCK_N
    apart: wide loads), mask_n keeps the block inside the slot; the caller moves its token pointers, row
    offsets and position offset (n_prefix - lo) to lo. active is False when the block starts past the
    slot's end (the caller returns at once)."""
    pid = tl.program_id(0)
    slot = pid // blocks_per_slot
    lo, hi = frame_span(slot, slot0_len, frame_len)
    n0 = (pid % blocks_per_slot) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    return bh, b, h, offs_n, offs_n < hi - lo, slot, lo, n0 < hi - lo


@launch_jit
def slot_scan_kernel(
    # pointers: per-slot values in, results out (may be the same buffer), the start value, the total, the
    # clamped states whose clamp mask is applied (MASK), a copy of the results in another dtype (COPY)
    part_ptr, out_ptr, add_ptr, total_ptr, mask_ptr, copy_ptr,
    # sizes (runtime, never specialised) and scalars
    n_slots, n_elems, scale, add_scale, total_scale, lo, hi, mask_scale,
    # constexprs: the scan's form
    BLOCK: tl.constexpr, REVERSE: tl.constexpr, CUMULATIVE: tl.constexpr, HAS_ADD: tl.constexpr,
    CLAMP: tl.constexpr, MASK: tl.constexpr, OUT: tl.constexpr, TOTAL: tl.constexpr, COPY: tl.constexpr,
):
    """Grid (cdiv(n_elems, BLOCK), BH). part, out, mask, copy [BH, n_slots, n_elems]; add, total [BH, n_elems]
    (all contiguous; part, out, add, total, mask in the accumulation dtype).

    Walks the slots in order 0, 1, ... (REVERSE: n_slots - 1, ..., 0) with run = add_scale * add (HAS_ADD;
    else 0): val = part[s] (MASK: 0 where the clamp mask of mask[s] is 0, i.e. unless lo < |mask[s]| / mask_scale
    < hi, tested as |mask[s]| against lo * mask_scale: how the forward's scan stored a clamped state, so that a
    state clamped onto a bound compares equal to it whatever precision the bounds arrive in),
    run += val, res = run (CUMULATIVE) or val; CLAMP: res = C(res) with the bounds lo, hi; out[s] = scale * res
    (OUT; COPY: also into copy, its dtype). TOTAL: total = total_scale * run at the end.
    Elementwise within a (bh, element): out may be part (read before written)."""
    bh = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elems
    if HAS_ADD:
        run = tl.load(add_ptr + bh * n_elems + offs, mask=mask, other=0.0) * add_scale
    else:
        run = tl.zeros((BLOCK,), part_ptr.dtype.element_ty)
    for i in range(n_slots):
        if REVERSE:
            s = n_slots - 1 - i
        else:
            s = i
        row = (bh * n_slots + s) * n_elems
        val = tl.load(part_ptr + row + offs, mask=mask, other=0.0)
        if MASK:
            a = tl.abs(tl.load(mask_ptr + row + offs, mask=mask, other=0.0))
            # The bounds in a's dtype first, then scaled: the arithmetic of the forward's clamped, scaled store.
            lo_s = (tl.zeros_like(a) + lo) * mask_scale
            hi_s = (tl.zeros_like(a) + hi) * mask_scale
            val = tl.where((a > lo_s) & (a < hi_s), val, 0.0)
        run += val
        if CUMULATIVE:
            res = run
        else:
            res = val
        if CLAMP:
            res = abs_clamp(res, lo, hi)
        if OUT:
            tl.store(out_ptr + row + offs, res * scale, mask=mask)
        if COPY:
            tl.store(copy_ptr + row + offs, (res * scale).to(copy_ptr.dtype.element_ty), mask=mask)
    if TOTAL:
        tl.store(total_ptr + bh * n_elems + offs, run * total_scale, mask=mask)


class Slots(NamedTuple):
    """The host side of a frame-causal launch over one side's tokens: ``n_slots`` slots (the window's frames
    + 1), ``slot0_len`` tokens in slot 0 (prefix tokens), ``frame_len`` in each frame."""

    n_slots: int
    slot0_len: int
    frame_len: int

    def blocks_per_slot(self, block_n: int) -> int:
        return max(1, cdiv(max(self.slot0_len, self.frame_len), block_n))

    def token_kwargs(self, block_n: int) -> dict:
        """The extra arguments of a per-token pass (output, dq, key pass) with BLOCK_N = block_n."""
        return dict(n_slots=self.n_slots, slot0_len=self.slot0_len, frame_len=self.frame_len,
                    blocks_per_slot=self.blocks_per_slot(block_n), FRAMES=True)

    def token_programs(self, block_n: int) -> int:
        """Axis 0 of a per-token pass's grid."""
        return self.n_slots * self.blocks_per_slot(block_n)


SCAN_BLOCK = 1024
SCAN_WARPS = 4


def scan_slots(part: torch.Tensor, out: torch.Tensor | None = None, *, add: torch.Tensor | None = None,
               total: torch.Tensor | None = None, mask: torch.Tensor | None = None, copy: torch.Tensor | None = None,
               scale: float = 1.0, add_scale: float = 1.0, total_scale: float = 1.0,
               bounds: tuple[float, float] | None = None, reverse: bool = False, cumulative: bool = True,
               clamp: bool = False, mask_scale: float = 1.0) -> None:
    """One ``slot_scan_kernel`` launch over part [BH, n_slots, ...] (contiguous; out, mask, copy alike; add,
    total [BH, ...] with the trailing size of part's): see the kernel. ``bounds``: (lo, hi) of the clamp
    (``clamp``) or of the mask (``mask``, whose values are scaled by ``mask_scale``)."""
    BH, n_slots = part.shape[:2]
    n_elems = part[0, 0].numel()
    assert part.is_contiguous()
    for t in (out, mask, copy):
        assert t is None or (t.is_contiguous() and t.shape == part.shape)
    for t in (add, total):
        assert t is None or (t.is_contiguous() and t.numel() == BH * n_elems and t.dtype == part.dtype)
    lo, hi = bounds or (0.0, 0.0)
    launch_kernel(slot_scan_kernel, (cdiv(n_elems, SCAN_BLOCK), BH),
                  part, part if out is None else out, part if add is None else add,
                  part if total is None else total, part if mask is None else mask, part if copy is None else copy,
                  n_slots, n_elems, scale, add_scale, total_scale, lo, hi, mask_scale, BLOCK=SCAN_BLOCK,
                  REVERSE=reverse,
                  CUMULATIVE=cumulative, HAS_ADD=add is not None, CLAMP=clamp, MASK=mask is not None,
                  OUT=out is not None, TOTAL=total is not None, COPY=copy is not None, num_warps=SCAN_WARPS)
