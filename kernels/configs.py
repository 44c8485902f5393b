"""Launch configurations: a small fixed set for GPUs, one fixed config under the interpreter.

No autotuning: the states are tiny (F x D x Dv) and every kernel streams the tokens once, so block
sizes follow from the head dims alone. Head tiles are powers of two in {16, 32, 64} (16 is the
smallest tl.dot operand; larger heads loop over / grid over 64-wide tiles), which keeps every
accumulator at most 64 x 64 fp32 and leaves registers free (the compile gate checks zero spills).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton.language as tl

HEAD_BLOCKS = (16, 32, 64)
GPU_BLOCK_N = 64
INTERPRET_BLOCK_N = 16
GPU_NUM_WARPS = 4
GPU_NUM_STAGES = 2
# Enough (chunk, head, feature, tile) programs to fill ~2 waves of an H100 (132 SMs) without
# making the partial-state buffers (n_chunks x F x D x Dv) large next to k and v.
GPU_TARGET_PROGRAMS = 256
INTERPRET_BLOCKS_PER_CHUNK = 2


def interpreting() -> bool:
    """True when kernels run in the Triton interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def head_block(dim: int) -> int:
    """The power-of-two tile (16, 32 or 64) used for a head dim of ``dim`` (1..256)."""
    return max(HEAD_BLOCKS[0], min(HEAD_BLOCKS[-1], triton_next_pow2(dim)))


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes and launch options shared by all kernels of one call."""

    block_n: int
    block_d: int
    block_dv: int
    num_warps: int
    num_stages: int


def pick_config(d: int, dv: int) -> LaunchConfig:
    """The config for head dims d (q/k) and dv (v); the same function serves GPU and interpreter."""
    if interpreting():
        return LaunchConfig(INTERPRET_BLOCK_N, head_block(d), head_block(dv), num_warps=1, num_stages=1)
    return LaunchConfig(GPU_BLOCK_N, head_block(d), head_block(dv), GPU_NUM_WARPS, GPU_NUM_STAGES)


def all_gpu_configs() -> list[LaunchConfig]:
    """Every config ``pick_config`` can return on a GPU (what the compile gate builds)."""
    return [LaunchConfig(GPU_BLOCK_N, bd, bdv, GPU_NUM_WARPS, GPU_NUM_STAGES)
            for bd in HEAD_BLOCKS for bdv in HEAD_BLOCKS]


@dataclass(frozen=True)
class Precision:
    """Dtypes handed to the kernels as constexprs."""

    acc: tl.dtype    # states, reductions, position features
    dot: tl.dtype    # tl.dot operand dtype
    prec: str        # tl.dot input_precision


TORCH_TO_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
               torch.float64: tl.float64}


def pick_precision(dtype: torch.dtype, interpret: bool | None = None) -> Precision:
    """fp16 / bf16: tensor-core dots in the input dtype, fp32 accumulation. fp32: dots as "tf32x3"
    (three TF32 tensor-core products, about fp32-accurate; plain TF32 would lose ~3 digits).
    fp64: fp64 everywhere. Under the interpreter dots run in fp32 (its bf16 dot is wrong)."""
    interpret = interpreting() if interpret is None else interpret
    if dtype == torch.float64:
        return Precision(tl.float64, tl.float64, "ieee")
    if interpret:
        return Precision(tl.float32, tl.float32, "ieee")
    if dtype == torch.float32:
        return Precision(tl.float32, tl.float32, "tf32x3")
    return Precision(tl.float32, TORCH_TO_TL[dtype], "tf32")


@dataclass(frozen=True)
class ChunkPlan:
    """How the token axis of a state pass is split: n_chunks chunks of blocks_per_chunk blocks."""

    n_chunks: int
    blocks_per_chunk: int


def chunk_plan(n_tokens: int, block_n: int, programs_per_chunk: int) -> ChunkPlan:
    """Split ``n_tokens`` into chunks so that chunks x programs_per_chunk roughly fills the GPU.

    Depends only on shapes (not on the device), so results are bitwise reproducible everywhere.
    """
    n_blocks = max(1, math.ceil(n_tokens / block_n))
    if interpreting():
        per_chunk = INTERPRET_BLOCKS_PER_CHUNK
    else:
        wanted = max(1, math.ceil(GPU_TARGET_PROGRAMS / max(1, programs_per_chunk)))
        per_chunk = max(1, math.ceil(n_blocks / wanted))
    per_chunk = min(per_chunk, n_blocks)
    return ChunkPlan(math.ceil(n_blocks / per_chunk), per_chunk)


def pow2_scale(n: int) -> float:
    """2^-ceil(log2 n): scales the states by about 1/n, exactly representable in every float dtype,
    so that states stay O(1) (fp16 tensor-core operands cannot overflow at N = 2^20)."""
    return math.ldexp(1.0, -max(0, (max(1, n) - 1).bit_length()))
