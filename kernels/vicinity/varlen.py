"""Packed variable-length calls ("varlen"): the per-sequence table the kernels read.

A varlen call packs S sequences one after another (q [Tq, H, D], k [Tk, H, D], v [Tk, H, Dv]); the
launchers see them as one batch entry, [1, H, T, E] views, and launch every pass once for the whole
pack with VARLEN=True. A program's (sequence, head) pair is its "bh" index (seq * H + head, the states
S [S * H, F, D, Dv] are indexed by it as by batch * H + head in a dense call); it reads its
sequence's window from ``seq_ptr``:

    seq [S, SEQ_COLS] int32:  q start, q length, q grid sizes (3, padded with 1s),
                              k start, k length, k grid sizes (3)

Tokens are addressed relative to the window's start (so position features see sequence-local
indices), per-token buffers (den and the row weights, [H, Tq]) at row h * Tq + start. Programs the
grid holds past a sequence's end (the token axis is sized by the longest sequence) exit at once.
The power-of-two state scale is per sequence (``pow2_scale`` of its own length): each launch that
needs one takes a per-sequence factor table (ACC dtype, [S]) built here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from ..runtime import cdiv
from .configs import pow2_scale

SEQ_COLS = tl.constexpr(10)
KEY_COLS = tl.constexpr(5)     # the key side's columns start here


@triton.jit
def sequence_window(seq_ptr, seq, IS_QUERY: tl.constexpr, RELOAD: tl.constexpr = False):
    """(start, length, grid_0, grid_1, grid_2) of sequence ``seq`` on the query or the key side (int32: the
    launchers check that every token offset within the pack fits). RELOAD: volatile loads, which the compiler
    does not hoist out of a loop (a re-read inside a loop then costs no registers across it)."""
    if IS_QUERY:
        entry = seq_ptr + seq * SEQ_COLS
    else:
        entry = seq_ptr + seq * SEQ_COLS + KEY_COLS
    return (tl.load(entry, volatile=RELOAD), tl.load(entry + 1, volatile=RELOAD), tl.load(entry + 2, volatile=RELOAD),
            tl.load(entry + 3, volatile=RELOAD), tl.load(entry + 4, volatile=RELOAD))


@triton.jit
def token_block(H, N, grid_0, grid_1, grid_2, seq_ptr, BLOCK_N: tl.constexpr, IS_QUERY: tl.constexpr,
                VARLEN: tl.constexpr):
    """Where a per-token kernel's program works, from its program ids (axis 0: token block, axis 1: bh):
    (bh, b, h, offs_n, mask_n, start, active, grid_0, grid_1, grid_2). Dense: batch b and head h (int64) of
    bh, tokens offs_n (mask_n: < N) from start 0, the grid sizes as given, active True. Packed (VARLEN): sequence
    bh // H's window: tokens relative to its start, mask_n < its length, its grid sizes (b = bh // H);
    active False when the block lies past the sequence's end: the caller returns at once."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    start = 0
    n_seq = N
    if VARLEN:
        start, n_seq, grid_0, grid_1, grid_2 = sequence_window(seq_ptr, bh // H, IS_QUERY)
    return bh, b, h, offs_n, offs_n < n_seq, start, pid_n * BLOCK_N < n_seq, grid_0, grid_1, grid_2


@dataclass(frozen=True)
class Packing:
    """The host side of a packed call: lengths and grids per sequence, and the table on the device.

    The small per-sequence tables the launches take (factors, chunk counts) are built once per Packing
    and kept: a Packing built once per spec (the library caches it) costs no host-to-device copy
    on later calls."""

    q_lengths: tuple[int, ...]
    k_lengths: tuple[int, ...]
    table: torch.Tensor          # int32 [S, SEQ_COLS] on the tensors' device
    _tables: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def _kept(self, key: tuple, values: list, dtype: torch.dtype) -> torch.Tensor:
        if key not in self._tables:
            self._tables[key] = torch.tensor(values, dtype=dtype, device=self.table.device)
        return self._tables[key]

    @classmethod
    def build(cls, grids, kv_grids, n_prefix: int, device: torch.device) -> Packing:
        pad = lambda g: tuple(g) + (1,) * (3 - len(g))  # noqa: E731
        q_len = tuple(n_prefix + math.prod(g) for g in grids)
        k_len = tuple(n_prefix + math.prod(g) for g in kv_grids)
        rows, q0, k0 = [], 0, 0
        for nq, nk, g, kg in zip(q_len, k_len, grids, kv_grids):
            rows.append([q0, nq, *pad(g), k0, nk, *pad(kg)])
            q0, k0 = q0 + nq, k0 + nk
        return cls(q_len, k_len, torch.tensor(rows, dtype=torch.int32, device=device))

    @property
    def n_seqs(self) -> int:
        return len(self.q_lengths)

    def lengths(self, is_query: bool) -> tuple[int, ...]:
        return self.q_lengths if is_query else self.k_lengths

    def max_length(self, is_query: bool) -> int:
        return max(self.lengths(is_query))

    def scales(self, is_query: bool) -> list[float]:
        """The per-sequence power-of-two state scales (what a dense call on each sequence would use)."""
        return [pow2_scale(n) for n in self.lengths(is_query)]

    def factors(self, values: list[float], dtype: torch.dtype) -> torch.Tensor:
        """A per-sequence factor table [S] for a launch (powers of two: exact in any float dtype)."""
        return self._kept(("factors", tuple(values), dtype), values, dtype)

    def chunk_counts(self, is_query: bool, block_n: int, blocks_per_chunk: int) -> torch.Tensor:
        """int32 [S]: how many chunks of ``blocks_per_chunk`` token blocks each sequence's state pass has."""
        counts = [cdiv(cdiv(n, block_n), blocks_per_chunk) for n in self.lengths(is_query)]
        return self._kept(("chunks", is_query, block_n, blocks_per_chunk), counts, torch.int32)
