"""Launch configurations of the k-NN kernels: a small fixed table for GPUs, one rule under the interpreter.

Every pass of one call uses the same (BLOCK_M, BLOCK_N, warps) and the same head-dim chunk: the mask
s >= tau is only exact if every pass computes each score with the same dot on the same tile shape as
the selection pass did.
One exception, the dk / dv pass's warps at 256-wide heads (``gpu_dkdv_warps``): there BLOCK_M = 16,
too few rows for Hopper's warpgroup MMA, so every pass's dots are the same mma.sync instruction
(HMMA.16816.F32 for fp16 / bf16, HMMA.1688.F32.TF32 for fp32, on sm_80 and sm_90a, read from the
SASS) and the warp count only says which warp computes which scores, each the same chain of K-steps
over the same head-dim chunks.
The whole head dim is one tile (D, Dv <= 256); the query / key tiles shrink as the head tile grows
(the backward's dk / dv accumulators and fp32's tf32x3 dots, three products per dot, set the limit;
the compile gate checks zero spills on sm_80 and sm_90a, under triton 3.9 and 3.6).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from ..runtime import interpreting, plan_cache

MIN_TILE = 16            # the smallest tl.dot operand size
INTERPRET_BLOCK_M = 16
INTERPRET_MAX_BLOCK_N = 64


@dataclass(frozen=True)
class KnnConfig:
    block_m: int       # query rows per tile
    block_n: int       # key rows per tile
    block_d: int       # q / k head dim, padded to a power of two
    block_dv: int      # v head dim, padded
    chunk: int         # head-dim chunk of the row dots (q.k, dO.v): the K of those tl.dots
    num_warps: int
    num_stages: int
    dkdv_num_warps: int        # the dk/dv pass: see gpu_dkdv_warps
    dkdv_num_stages: int = 1   # the dk/dv pass holds four [BLOCK_N, head] tiles: no room for prefetch
    # The register cap, stated: left to itself ptxas caps some of these kernels far below 255 (at 32
    # to 80 registers) and spills a few bytes there; the compile gate checks zero spills with it.
    maxnreg: int = 255


    def chunks(self) -> dict:
        """The row-dot chunking constexprs: BLOCK_K x N_K covers BLOCK_D, BLOCK_KV x N_KV covers BLOCK_DV."""
        k, kv = min(self.chunk, self.block_d), min(self.chunk, self.block_dv)
        return dict(BLOCK_K=k, N_K=self.block_d // k, BLOCK_KV=kv, N_KV=self.block_dv // kv)

    def row_on_chip(self, n_keys: int) -> bool:
        """True when a whole row of scores is one key tile (the selection pass then computes it once)."""
        return n_keys <= self.block_n


def head_tile(dim: int) -> int:
    return max(MIN_TILE, triton.next_power_of_2(dim))


def gpu_blocks(tile: int, dtype: torch.dtype, ragged: bool = False) -> tuple[int, int, int, int]:
    """(block_m, block_n, num_warps, num_stages) on a GPU for the larger head tile and the input dtype;
    ``ragged``: a head dim is not a multiple of 16 (its loads are scalar, with per-element masks)."""
    if dtype in (torch.float16, torch.bfloat16):
        # 8 warps at 64- and 128-wide heads: with 4, ptxas spills a few bytes in the dk / dv pass for
        # unaligned head dims (scalar loads with per-element addresses).
        if tile <= 32:
            return 64, 64, 4, 2
        if tile <= 64:
            # 32 keys a tile for ragged head dims (D = 40): at 64, the dq pass spills 8 bytes on sm_80
            # when the key count is a multiple of 16 (255 registers; 195-203 at 32 keys).
            return 64, (32 if ragged else 64), 8, 2
        if tile <= 128:
            return 32, 32, 8, 2
        return 16, 16, 4, 1
    # fp32: tf32x3 dots split every operand in two (hi / lo) and issue three products; 16 x 16 tiles
    # without prefetch (and 8 warps at 128-wide heads, where ptxas spills with 4) fit every pass in
    # 255 registers without spills.
    return 16, 16, (8 if tile == 128 else 4), 1


def gpu_dkdv_warps(tile: int, dtype: torch.dtype, num_warps: int) -> int:
    """Warps of the dk / dv pass on a GPU (the other passes use ``num_warps``): 8 at 256-wide heads,
    where its [16, 256] dk and dv accumulators and four [16, 256] operand tiles fill 4 warps'
    registers (with 4 it spills: fp16 / bf16 on sm_80, fp32 on sm_90a with unaligned strides, 8-20
    bytes); no other config changes its warps (see the module docstring for why 256 may)."""
    if tile == 256:
        return 8
    return num_warps


def gpu_chunk(tile: int, dtype: torch.dtype) -> int:
    """The head-dim chunk of the row dots: 64 for fp16 / bf16, except at 256-wide heads: the whole head,
    one chunk (its 16 x 16 tiles make a [16, 256] operand 16 registers a thread; in four 64-wide chunks
    the dk / dv pass spilled 16-44 bytes on sm_80, and sm_90a under triton 3.6, with unaligned strides,
    in two 128-wide ones the dq pass 48-84 bytes on sm_80 at ragged head dims such as 200); 32 for fp32
    (tf32x3 splits each operand in two)."""
    if dtype in (torch.float16, torch.bfloat16):
        return 256 if tile == 256 else 64
    return 32


def gpu_config(d: int, dv: int, dtype: torch.dtype) -> KnnConfig:
    bd, bdv = head_tile(d), head_tile(dv)
    tile = max(bd, bdv)
    bm, bn, warps, stages = gpu_blocks(tile, dtype, ragged=bool(d % 16 or dv % 16))
    return KnnConfig(bm, bn, bd, bdv, gpu_chunk(tile, dtype), warps, stages, gpu_dkdv_warps(tile, dtype, warps))


@plan_cache
def pick_config(d: int, dv: int, n_keys: int, dtype: torch.dtype) -> KnnConfig:
    """The config of one call (GPU table, or the interpreter's: few, large programs, the whole key row
    in one tile when it fits 64 keys)."""
    if interpreting():
        bn = min(INTERPRET_MAX_BLOCK_N, max(MIN_TILE, triton.next_power_of_2(n_keys)))
        bd, bdv = head_tile(d), head_tile(dv)
        return KnnConfig(INTERPRET_BLOCK_M, bn, bd, bdv, max(bd, bdv), num_warps=1, num_stages=1,
                         dkdv_num_warps=1)
    return gpu_config(d, dv, dtype)


def gpu_configs() -> list[tuple[torch.dtype, KnnConfig]]:
    """Every (dtype, config) a GPU launch can pick (what the compile gate builds): per dtype and head
    tile, D == Dv, a head dim that fills the tile and a ragged one (t - 8: not a multiple of 16)."""
    return [(dt, gpu_config(d, d, dt)) for dt in (torch.float16, torch.bfloat16, torch.float32)
            for t in (16, 32, 64, 128, 256) for d in (t, t - 8)]
