"""Launch configurations: a small fixed set for GPUs, one fixed config under the interpreter.

No autotuning: the states are tiny (F x D x Dv) and every kernel streams the tokens once, so block
sizes follow from the head dims alone. Head tiles are powers of two in {16, 32, 64} (16 is the
smallest tl.dot operand; larger heads loop over / grid over 64-wide tiles), which keeps every
accumulator at most 64 x 64 fp32 and leaves registers free (the compile gate checks zero spills).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import triton.language as tl

from ..runtime import (
    DEFAULT_SM_COUNT,
    Precision,
    interpreting,
    next_power_of_2,
    pick_precision,
    plan_cache,
    sm_count,
    target_arch,
)

HEAD_BLOCKS = (16, 32, 64)
GPU_BLOCK_N = 64
INTERPRET_BLOCK_N = 16
GPU_NUM_WARPS = 4
GPU_NUM_STAGES = 2
# An explicit .maxnreg of 255 (the hardware limit) for the per-token passes: left without one, ptxas
# sometimes settles on fewer registers than they need and spills. The state passes (StateTiles) take
# the same budget.
GPU_MAX_REGISTERS = 255
REGISTER_BUDGET_LAUNCHES = ("fwd_output", "bwd_dq", "bwd_keys")
# Head dims that are not multiples of 16 cannot be proven uniform: every tile access is a scalar
# load / store with its own 64-bit address and mask, which costs registers. Such heads use 32-wide
# tiles at 8 warps, the one shape where their per-token passes do not spill (D=40 pads to 64 either
# way). fp32 (32-wide tiles already) keeps 4 warps: it fits there.
UNALIGNED_TILE = 32
UNALIGNED_NUM_WARPS = 8
# The forward output pass and the dq pass reload every F state tile (from L2) for each token tile: 128
# tokens per program halve that traffic. Only for 16-bit inputs with head dims that are multiples of 16
# and few features (launch -> at most F): with more features, TF32 or unaligned tiles the wider
# programs spill. The key pass (two accumulators) takes 128 for bf16 heads of one tile on sm_90+ only
# (elsewhere it spills, see pick_config).
WIDE_BLOCK_N = 128
# Past this many features, fp32 output passes of unaligned heads take a quarter of the tokens, and their dq passes
# 8 warps (compile gate).
FP32_UNALIGNED_MAX_FEATURES = 4
WIDE_MAX_FEATURES = {"fwd_output": 8, "bwd_dq": 4, "bwd_keys": 4}   # bwd_keys: bf16 on sm_90+ only (pick_config)
# State pass chunking: enough (chunk, head, tile) programs for one per SM of the device (the state
# programs hold all F states: 8-warp ones run 1 CTA per SM; a fixed count would run a second wave on a
# GPU with fewer SMs), each chunk at least MIN_BLOCKS_PER_CHUNK token blocks, since every chunk's program
# writes an F x D x Dv partial (64 KB at F = 4, D = Dv = 64) that the elected program reads back: more
# chunks only pay when they fill idle SMs with enough tokens each. The SM count is the device's
# (runtime.sm_count: DEFAULT_SM_COUNT = 132, an H100 SXM's, under the interpreter and the compile gate).
MIN_BLOCKS_PER_CHUNK = 8
INTERPRET_BLOCKS_PER_CHUNK = 2


def head_block(dim: int) -> int:
    """The power-of-two tile (16, 32 or 64) used for a head dim of ``dim`` (1..256)."""
    return max(HEAD_BLOCKS[0], min(HEAD_BLOCKS[-1], next_power_of_2(dim)))


@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes and launch options shared by all kernels of one call."""

    block_n: int
    block_d: int
    block_dv: int
    num_warps: int
    num_stages: int
    max_registers: int | None = None  # ptxas register budget (.maxnreg); None under the interpreter
    block_n_of: tuple = ()  # ((launch, tokens per program), ...): BLOCK_N where not block_n (pick_config)
    warps_of: tuple = ()    # ((launch, warps), ...): num_warps where not num_warps (pick_config)

    def tokens_per_program(self, launch: str) -> int:
        """BLOCK_N of ``launch`` (one of LAUNCHES): ``block_n`` unless ``block_n_of`` names the launch."""
        assert launch in LAUNCHES, launch
        return dict(self.block_n_of).get(launch, self.block_n)

    def options(self, launch: str) -> dict:
        """The launch options (num_warps, num_stages, maxnreg) of ``launch`` (one of LAUNCHES)."""
        assert launch in LAUNCHES, launch
        opts = dict(num_warps=dict(self.warps_of).get(launch, self.num_warps), num_stages=self.num_stages)
        if self.max_registers is not None and launch in REGISTER_BUDGET_LAUNCHES:
            opts["maxnreg"] = self.max_registers
        return opts


@plan_cache
def pick_config(d: int, dv: int, dtype: torch.dtype, n_feat: int | None = None) -> LaunchConfig:
    """The config for head dims d (q/k), dv (v) and input dtype; serves GPU and interpreter alike.
    ``n_feat``: the number of position features F, where the caller knows it (the forward output and
    dq passes take more tokens per program for few features; None: as for many)."""
    # One tile for both head dims: few GPU configs in all (the compile gate builds each), at the
    # price of padding the smaller of D / Dv when they differ a lot (rare: VVT uses D == Dv).
    if interpreting():  # no register limit there; fewer, larger programs run faster
        tile = head_block(max(d, dv))
        return LaunchConfig(INTERPRET_BLOCK_N, tile, tile, num_warps=1, num_stages=1)
    cfg = gpu_config(min(head_block(max(d, dv)), max_tile(dtype)))
    unaligned = bool(d % 16 or dv % 16)
    if unaligned and dtype in (torch.float16, torch.bfloat16) and cfg.block_d >= UNALIGNED_TILE:
        cfg = dataclasses.replace(gpu_config(UNALIGNED_TILE), num_warps=UNALIGNED_NUM_WARPS)
    if dtype == torch.float32:
        # fp32 (tf32x3 dots, 32-bit accesses): no software pipelining; pipelined, the state passes
        # spill, and with 1 stage they take fewer registers and fewer instructions per iteration.
        cfg = dataclasses.replace(cfg, num_stages=1)
        tokens = {}
        if unaligned:
            # Already at 32-wide tiles: the per-token passes take 32 tokens instead (at 64 they spill).
            tokens = {launch: cfg.block_n // 2 for launch in REGISTER_BUDGET_LAUNCHES}
            if n_feat is None or n_feat > FP32_UNALIGNED_MAX_FEATURES:
                # With many features the output pass (a 3-d product: F = 8) spills at 32 tokens on sm_90a, and
                # the dq pass (a 3-d sum: F = 6) at 4 warps with 16 or 32 tokens (as the frame-causal one).
                tokens["fwd_output"] = cfg.block_n // 4
                cfg = dataclasses.replace(cfg, warps_of=(("bwd_dq", 8),))
        # The key pass holds two accumulators and runs two tf32x3 dots per feature: half as many tokens
        # again (a quarter for unaligned heads), where it fits without spills.
        tokens["bwd_keys"] = cfg.block_n // (4 if unaligned else 2)
        if n_feat is None or n_feat > 8:
            # F_PAD = 16 (a 3-d product with prefix tokens): half that again, at least 16 (at 32 it spills).
            tokens["bwd_keys"] = max(16, tokens["bwd_keys"] // 2)
        cfg = dataclasses.replace(cfg, block_n_of=tuple(tokens.items()))
    elif cfg.block_n >= 64 and (dtype == torch.float16 or unaligned):
        # The key pass at 32 tokens per program for fp16 (its dots take fp32 (TF32) operands, see
        # dot_operand_dtype) and for unaligned heads: at 64 they spill. Aligned bf16: 64.
        tokens = {"bwd_keys": cfg.block_n // 2}
        if dtype == torch.bfloat16:
            # The dq pass of unaligned bf16 heads takes 32 tokens: at 64 it spills on sm_80.
            tokens["bwd_dq"] = cfg.block_n // 2
        cfg = dataclasses.replace(cfg, block_n_of=tuple(tokens.items()))
    if dtype in (torch.float16, torch.bfloat16) and not unaligned and n_feat is not None:
        tokens = {launch: WIDE_BLOCK_N for launch, most in WIDE_MAX_FEATURES.items() if n_feat <= most}
        if n_feat > WIDE_MAX_FEATURES["fwd_output"]:
            # The dq pass holds the per-axis position values (all three axes of a 3-d product) across its
            # feature loop: with that many features it takes half the tokens, or it spills.
            tokens["bwd_dq"] = cfg.block_n // 2
        if dtype == torch.float16 or max(d, dv) > cfg.block_d:
            # fp16: TF32 dots (see above). Heads past one tile (the key pass loops over the other tiles):
            # at 128 tokens it spills.
            tokens.pop("bwd_keys", None)
        arch = target_arch()
        if arch is not None and arch < 90:
            # sm_80: the key pass stays at 64 tokens (at 128 it spills). The dq pass (no fused query pass
            # there) reads the forward's bf16 S (saved_state_dtype) at 64 tokens, the S bytes per token
            # that 128 tokens read in fp32, and at 128 it spills.
            tokens.pop("bwd_keys", None)
            if dtype == torch.bfloat16 and cfg.block_d == HEAD_BLOCKS[-1]:
                tokens.pop("bwd_dq", None)
        cfg = dataclasses.replace(cfg, block_n_of=cfg.block_n_of + tuple(tokens.items()))
    return cfg


# Frame-causal per-token passes (FRAMES, frames.py: the output pass, the clamped backward's numerator and the dq
# pass; streaming form). Their slot bookkeeping costs registers, and where the dots take fp32 operands (fp16's
# TF32, fp32's TF32x3) the dense tokens per program spill (compile gate: fp16 D64 output pass on sm_80, fp32
# output and dq passes of unaligned heads on sm_90a): those take half the dense tokens (at least 16). bf16 keeps
# the dense count: at half of it the clamped numerator spilled on sm_80 (84 B under triton 3.9, 80 B under 3.6)
# and the 3-d product output pass with prefix tokens on sm_90a (8 B under 3.6); only its clamped forward output
# (the C(C(num) C(1/den)) epilogue) takes half, at the dense 128 it spills on sm_80 under 3.6. The dq pass of
# unaligned fp32 heads (already at 32 tokens, see pick_config) spills at 4 warps with 16 or 32 tokens: it takes
# 32 tokens at 8 warps (as many warps per SM, 238-248 registers).
FRAME_HALF_DTYPES = (torch.float16, torch.float32)
FRAME_UNALIGNED_FP32_DQ_WARPS = 8


def frame_launch(cfg: LaunchConfig, launch: str, dtype: torch.dtype, unaligned: bool,
                 clamp: bool = False) -> tuple[int, dict]:
    """(BLOCK_N, launch options) of the frame-causal streaming pass ``launch`` ("fwd_output": the output pass,
    with its den where ``clamp`` says it takes the clamped epilogue, or the numerator; "bwd_dq") under ``cfg``
    for inputs of ``dtype`` (``unaligned``: head dims not multiples of 16). See FRAME_HALF_DTYPES."""
    tokens, opts = cfg.tokens_per_program(launch), cfg.options(launch)
    if cfg.max_registers is None:    # the interpreter: nothing to fit
        return max(16, tokens // 2), opts
    if launch == "bwd_dq" and dtype == torch.float32 and unaligned:
        return tokens, dict(opts, num_warps=FRAME_UNALIGNED_FP32_DQ_WARPS)
    if dtype in FRAME_HALF_DTYPES or (launch == "fwd_output" and clamp):
        return max(16, tokens // 2), opts
    return tokens, opts


def clamped_packed_config(cfg: LaunchConfig) -> LaunchConfig:
    """``cfg`` for a packed backward with the VVT clamp, whose dq pass reads the row weights clamp.py
    computed: on a GPU that pass takes half the tokens (at the full count it spills on sm_80; the dq
    pass that computes its own row weights does not)."""
    if cfg.max_registers is None:    # the interpreter: nothing to fit
        return cfg
    return dataclasses.replace(cfg, block_n_of=cfg.block_n_of + (("bwd_dq", cfg.tokens_per_program("bwd_dq") // 2),))


def max_tile(dtype: torch.dtype) -> int:
    """fp32 inputs run their dots as tf32x3 (three products per dot): at 64-wide tiles that spills
    on sm_80, so fp32 (and fp64) heads use 32-wide tiles."""
    return HEAD_BLOCKS[-1] if dtype in (torch.float16, torch.bfloat16) else 32


def gpu_tiles(dtype: torch.dtype) -> list[int]:
    """Every head tile ``pick_config`` can choose on a GPU for ``dtype`` (what the compile gate builds)."""
    return [t for t in HEAD_BLOCKS if t <= max_tile(dtype)]


def gpu_config(tile: int) -> LaunchConfig:
    """The GPU launch config for a head tile.

    Every per-token pass takes the same warps: with 4 at 64-wide tiles the widest variants spill; with
    8 and the 255-register budget (maxnreg) they fit.
    """
    return LaunchConfig(GPU_BLOCK_N, tile, tile, gpu_num_warps(tile), gpu_num_stages(tile),
                        max_registers=GPU_MAX_REGISTERS)


def gpu_num_stages(tile: int) -> int:
    """Software-pipelining depth. With 64-wide tiles, 2 stages make ptxas spill a few bytes around the
    feature loop on sm_80 (1 and 3 do not); 3 stages also prefetch further along the token loop of
    the state pass, for 40 KB of shared memory."""
    return 3 if tile >= 64 else GPU_NUM_STAGES


def gpu_num_warps(tile: int) -> int:
    """8 warps for 64-wide head tiles: with 4, the 64 x 64 fp32 accumulator plus the fp32 feature
    tile and the prefetched state tile exceed 255 registers on sm_80 and spill."""
    return 8 if tile >= 64 else GPU_NUM_WARPS


# The resident form of the output and key passes (output.py, keys.py): a persistent program keeps its F
# state tiles (converted to the dot operand dtype) on chip across its token loop. Taken on sm_90+ for
# 16-bit inputs whose head dims fit one tile, while the F tiles take at most RESIDENT_STATE_BYTES of the
# launch (bf16 64-wide tiles: F <= 8 in the output pass, F <= 4 in the key pass, which holds two
# accumulators and the tiles twice), and not for fp16's TF32 dots (4-byte tiles) in the key pass or at
# 64-wide tiles: past these the compile gate shows spills. Elsewhere (sm_80, whose mma.sync would hold
# the F tiles in registers; fp32 / fp64; wider heads) the streaming form. Under the interpreter every
# one-tile head takes it, so the tests run it.
RESIDENT_MIN_ARCH = 90
RESIDENT_STATE_BYTES = {"fwd_output": 64 * 1024, "bwd_keys": 32 * 1024}
# Tokens per block, token-loop stages and warps of the resident passes on a GPU, from the compile gate:
# the output pass at 4 warps (two CTAs an SM) for few features (RESIDENT_FEW_FEATURES) or narrow head tiles
# of 16-bit operands, else 8 (at 4, 64-wide tiles and fp16's TF32 tiles of many features spill); the key
# pass, with two accumulators and the phi and v tiles, at the streaming config's warps (8 for 64-wide and
# unaligned heads: at 4 they spill; 4 for narrow aligned ones, whose 16-wide dS tiles would load in 32-bit
# pieces at 8), but 8 for 32-wide tiles past RESIDENT_FEW_FEATURES features (at 4, the F unscaled products
# beside the two accumulators spill 16-248 bytes); unaligned heads with many features take the streaming key
# pass.
RESIDENT_BLOCK_N = 64
RESIDENT_TOKEN_STAGES = 2
RESIDENT_FEW_FEATURES = 4
# Programs per (head, Dv tile): one wave of the CTAs an SM holds. The resident passes take up to 255
# registers a thread, so an SM's 64K registers hold 8 of their warps: two CTAs of 4 warps, one of 8.
RESIDENT_WARPS_PER_SM = 8
# Tests only: a fixed number of programs per (head, Dv tile) instead of the device's (None: the device's).
PROGRAMS_PER_HEAD: int | None = None


def resident_programs(n_blocks: int, rows: int, device: torch.device, num_warps: int) -> int:
    """Programs per row (a (head, Dv tile) pair of the output pass, a head of the key pass) of a resident
    pass of ``num_warps`` warps over ``n_blocks`` token blocks: as many as fill one wave of ``device``
    (its SMs x the CTAs an SM holds, RESIDENT_WARPS_PER_SM) over all ``rows``, rounded down (a partial
    second wave would hold every program up), at least one and at most one per block
    (PROGRAMS_PER_HEAD, where set, instead). The results do not depend on the count: each token block
    is computed by one program, with the same operations whichever."""
    if PROGRAMS_PER_HEAD is not None:
        return max(1, min(n_blocks, PROGRAMS_PER_HEAD))
    wave = sm_count(device) * max(1, RESIDENT_WARPS_PER_SM // num_warps)
    return max(1, min(n_blocks, wave // max(1, rows)))


@plan_cache
def resident_states(launch: str, dtype: torch.dtype, n_feat: int, d: int, dv: int, cfg: LaunchConfig) -> bool:
    """Whether ``launch`` ("fwd_output" / "bwd_keys") takes the resident form for inputs of ``dtype``, F =
    n_feat, head dims d, dv under ``cfg`` (see RESIDENT_MIN_ARCH). The output pass needs D in one tile (Dv
    tiles are a grid axis), the key pass D and Dv (program j's dk tile contracts over all of Dv)."""
    if d > cfg.block_d or (launch == "bwd_keys" and dv > cfg.block_dv):
        return False
    if interpreting():
        return True
    arch = target_arch()
    if (arch is not None and arch < RESIDENT_MIN_ARCH) or dtype not in (torch.float16, torch.bfloat16):
        return False
    operand_bytes = 2 if dot_operand_dtype(launch, dtype) in (torch.float16, torch.bfloat16) else 4
    if operand_bytes == 4 and (launch == "bwd_keys" or cfg.block_d >= HEAD_BLOCKS[-1]):
        return False
    if launch == "bwd_keys" and (n_feat > 8 or ((d % 16 or dv % 16) and n_feat > RESIDENT_FEW_FEATURES)):
        return False    # (F = 10, or unaligned heads with a 3-d product's 8 features: it spills under triton 3.6)
    return n_feat * cfg.block_d * cfg.block_dv * operand_bytes <= RESIDENT_STATE_BYTES[launch]


def resident_options(cfg: LaunchConfig, launch: str, n_feat: int, dtype: torch.dtype, unaligned: bool) -> dict:
    """BLOCK_N, TOKEN_STAGES and the launch options of resident pass ``launch`` with F = n_feat, for inputs of
    ``dtype`` (``unaligned``: head dims not multiples of 16; see RESIDENT_BLOCK_N; ``cfg``'s blocks and options
    under the interpreter)."""
    if cfg.max_registers is None:
        return dict(BLOCK_N=cfg.block_n, TOKEN_STAGES=1, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if launch == "bwd_keys":
        warps = 8 if n_feat > RESIDENT_FEW_FEATURES and cfg.block_d > HEAD_BLOCKS[0] else cfg.num_warps
    else:
        wide_operands = dot_operand_dtype(launch, dtype) not in (torch.float16, torch.bfloat16)   # fp16's TF32
        wide = cfg.block_d >= HEAD_BLOCKS[-1] or (wide_operands and cfg.block_d > HEAD_BLOCKS[0])
        # (F_PAD = 16, a 3-d product with prefix tokens: 32-wide tiles spill at 4 warps; 16-wide ones load narrow at 8.
        # Unaligned heads in a 32-wide tile past F = 4: a 3-d sum spilled 8 B at 4 warps under triton 3.6.)
        many = n_feat > RESIDENT_FEW_FEATURES
        warps = 8 if ((many and (wide or (unaligned and cfg.block_d > HEAD_BLOCKS[0])))
                      or (n_feat > 8 and cfg.block_d > HEAD_BLOCKS[0])) else 4
    return dict(BLOCK_N=RESIDENT_BLOCK_N, TOKEN_STAGES=RESIDENT_TOKEN_STAGES, num_warps=warps,
                num_stages=RESIDENT_TOKEN_STAGES, maxnreg=cfg.max_registers)


# The resident form of the fused query pass (queries.py): the program keeps the dq state tiles S_m of
# its first features (in the dot operand dtype; shared memory on sm_90) and streams the rest from L2 as
# the streaming form does: at most RESIDENT_QUERY_MAX_FEATURES tiles of at most RESIDENT_QUERY_STATE_BYTES
# in all, and at 64-wide head tiles only for F <= RESIDENT_QUERY_WIDE_MAX_FEATURES. Past these, beside the
# stacked dS accumulator, the compile gate shows spills: at 64 x 64 bf16 tiles with F = 4 (a full
# 256 x 64 fp32 accumulator) even one resident tile spills under triton 3.6 for 2-d grids (3.9: two
# spill); bf16 32 x 32 tiles with F = 8 spill under 3.6 with all 8 resident, not with 4; 32-wide tiles
# hold all of F = 4, also fp16's 4-byte TF32 tiles. The z_m stay streamed: held in registers they
# spill. With every feature resident the token loop is innermost and is pipelined
# RESIDENT_TOKEN_STAGES deep.
RESIDENT_QUERY_STATE_BYTES = 16 * 1024
RESIDENT_QUERY_MAX_FEATURES = 4
RESIDENT_QUERY_WIDE_MAX_FEATURES = 2


@plan_cache
def resident_query_features(dtype: torch.dtype, n_feat: int, tiles: StateTiles) -> int:
    """How many of the F = n_feat dq state tiles the fused query pass for inputs of ``dtype``, at the
    state pass's ``tiles``, keeps on chip (see RESIDENT_QUERY_STATE_BYTES; 0: the streaming form). Under
    the interpreter all of them, so the tests run the resident form."""
    if interpreting():
        return n_feat
    operand_bytes = 2 if dot_operand_dtype("bwd_dq", dtype) in (torch.float16, torch.bfloat16) else 4
    tile_bytes = tiles.block_d * tiles.block_dv * operand_bytes
    fit = min(RESIDENT_QUERY_MAX_FEATURES, RESIDENT_QUERY_STATE_BYTES // tile_bytes)
    if max(tiles.block_d, tiles.block_dv) >= HEAD_BLOCKS[-1] and n_feat > RESIDENT_QUERY_WIDE_MAX_FEATURES:
        return 0
    return min(n_feat, fit)


# The state pass holds all F states of its (D tile, Dv tile) as one stacked fp32 accumulator
# [F_PAD * block_d, block_dv] (F_PAD: F rounded up to a power of two) and builds the stacked dot operand
# [block_n, F_PAD * block_d] every token block. Both are capped at STATE_ELEMENTS elements (64 fp32
# registers a thread at 8 warps) for 16-bit dot operands, half that for TF32 operands (twice the
# bytes) and an eighth for TF32x3 (fp32 inputs: the operand is also split in two, and a quarter
# spills); larger F take narrower tiles, then fewer tokens per block.
STATE_ELEMENTS = 16384
# 8 warps when the stacked operand / accumulator exceed 16 KB of operands (at 4 warps, TF32 operands of
# 8192 elements spill; 16-bit ones fit).
STATE_SMALL_BYTES = 16384
# fp32 token tiles of at most this many elements (16 x 16) take 4 warps (see state_tiles).
STATE_NARROW_TILE = 256


@dataclass(frozen=True)
class StateTiles:
    """Block sizes and launch options of a state pass (forward keys / backward queries)."""

    block_n: int
    block_d: int
    block_dv: int
    num_warps: int
    num_stages: int
    max_registers: int | None = None  # ptxas budget for packed (VARLEN) launches; None under the interpreter

    def options(self) -> dict:
        opts = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        if self.max_registers is not None:
            # Without a budget ptxas sometimes settles on 128 registers and spills; with it, no spills.
            opts["maxnreg"] = self.max_registers
        return opts


@plan_cache
def state_tiles(n_feat: int, d: int, dv: int, dtype: torch.dtype, launch: str) -> StateTiles:
    """The tiles of state pass ``launch`` ("fwd_state" / "bwd_state") for F = n_feat features, head dims
    d (x) and dv (y) and input dtype."""
    f_pad = next_power_of_2(n_feat)
    if interpreting():
        block_d = block_dv = head_block(max(d, dv))
        block_n = INTERPRET_BLOCK_N
    else:
        block_d = min(head_block(d), max_tile(dtype))
        block_dv = min(head_block(dv), max_tile(dtype))
        if (d % 16 or dv % 16) and dtype in (torch.float16, torch.bfloat16):
            # Unaligned heads (scalar accesses, 64-bit addresses per element): 32-wide tiles, as the
            # per-token passes take; at 64 the packed forward state pass spills on sm_80.
            block_d, block_dv = min(block_d, UNALIGNED_TILE), min(block_dv, UNALIGNED_TILE)
        # fp32 inputs (TF32x3: operands split in two): 32 tokens a block; at 64 some packed variants spill.
        block_n = GPU_BLOCK_N // 2 if dtype == torch.float32 else GPU_BLOCK_N
    operand_bytes = 2 if dot_operand_dtype(launch, dtype) in (torch.float16, torch.bfloat16) else 4
    limit = STATE_ELEMENTS * 2 // operand_bytes
    if dtype == torch.float32:
        limit //= 4                    # TF32x3: split operands
    smallest = HEAD_BLOCKS[0]
    while f_pad * block_d * max(block_dv, block_n) > limit:
        if block_d > smallest:
            block_d //= 2
        elif block_n > smallest and f_pad * block_d * block_n > limit:
            block_n //= 2
        elif block_dv > smallest:
            block_dv //= 2
        else:
            break
    if interpreting():
        return StateTiles(block_n, block_d, block_dv, num_warps=1, num_stages=1)
    # fp32 inputs: 8 warps and 2 stages (TF32x3 spills at 4 warps, and at 8 warps with 3 stages), unless the
    # token tiles are the smallest (STATE_NARROW_TILE: F_PAD >= 8, e.g. 3-d grids): a [16, 16] fp32 tile of x
    # or y is one element a thread at 8 warps, so every cp.async would move 32 bits (the compile gate's
    # wide_tiles); at 4 warps it is two (64-bit copies) and the stacked [F_PAD * 16, 16] accumulator fits.
    big = f_pad * block_d * max(block_dv, block_n) * operand_bytes > STATE_SMALL_BYTES or dtype == torch.float32
    if dtype == torch.float32 and block_n * min(block_d, block_dv) <= STATE_NARROW_TILE and f_pad <= 8:
        big = False     # (F_PAD = 16, a 3-d product with prefix tokens: at 4 warps the accumulators spill)
    stages = 2 if dtype == torch.float32 else 3
    if f_pad >= 16 and dtype == torch.float32:
        stages = 1      # (F_PAD = 16, a 3-d product with prefix tokens: with 2 stages the backward's spills)
    return StateTiles(block_n, block_d, block_dv, 8 if big else 4, num_stages=stages, max_registers=GPU_MAX_REGISTERS)


@dataclass(frozen=True)
class ChunkPlan:
    """How the token axis of a state pass is split: n_chunks chunks of blocks_per_chunk blocks."""

    n_chunks: int
    blocks_per_chunk: int


@plan_cache
def chunk_plan(n_tokens: int, block_n: int, programs_per_chunk: int, sms: int = DEFAULT_SM_COUNT) -> ChunkPlan:
    """Split ``n_tokens`` into chunks so that chunks x programs_per_chunk fills (at most) one wave of a
    GPU with ``sms`` SMs.

    Depends only on the shapes and the device's SM count (never on timing), so results are bitwise
    reproducible on every device of one model; devices with other SM counts may sum in other chunks.
    """
    n_blocks = max(1, math.ceil(n_tokens / block_n))
    if interpreting():
        per_chunk = INTERPRET_BLOCKS_PER_CHUNK
    else:
        wanted = max(1, sms // max(1, programs_per_chunk))   # at most one wave
        per_chunk = max(MIN_BLOCKS_PER_CHUNK, math.ceil(n_blocks / wanted))
    per_chunk = min(per_chunk, n_blocks)
    return ChunkPlan(math.ceil(n_blocks / per_chunk), per_chunk)


def pow2_scale(n: int) -> float:
    """2^-ceil(log2 n): scales the states by about 1/n, exactly representable in every float dtype,
    so that states stay O(1) (fp16 tensor-core operands cannot overflow at N = 2^20)."""
    return math.ldexp(1.0, -max(0, (max(1, n) - 1).bit_length()))


# The launches, by the names the compile gate uses for them.
LAUNCHES = ("fwd_state", "fwd_output", "bwd_row_weights", "bwd_dq", "bwd_state", "bwd_keys")
# Launches whose dot operands are bounded by the inputs: phi(k) P (|P| <= 1) against v.
INPUT_RANGE_DOTS = ("fwd_state",)


def dot_operand_dtype(launch: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a launch's dot takes its operands in, for inputs of ``dtype``.

    fp16 inputs: only the forward state pass multiplies operands bounded by the inputs. Every other
    dot has a state (S, z, dS: fp32, magnitudes set by sigma^2 and N, subnormal in fp16 for small
    inputs) or a row-weighted query (phi(q) / den: up to 1 / eps for a query that meets no key, past
    fp16's 65504) as an operand, so it runs in TF32: fp16's 10-bit mantissa with fp32's exponent range.
    bf16 (fp32's exponent range) and fp32 / fp64 keep their own dtype everywhere.
    """
    assert launch in LAUNCHES, launch
    if dtype == torch.float16 and launch not in INPUT_RANGE_DOTS:
        return torch.float32
    return dtype


@plan_cache
def state_operand_dtype(launch: str, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype ``launch``'s dots take the states (S, or dS for the key pass) in, for inputs of ``dtype``,
    when it is 16-bit (bf16 inputs on a GPU; the interpreter's emulated dots take fp32), else None.

    The launch that writes the states then also writes a copy in it (``compute_states``' s_copy): rounded
    once, as the dot would round each fp32 tile, so bitwise the same operand; the per-token pass reads
    every state tile (once per token block, from L2) in half the bytes and converts nothing."""
    dot = dot_precision(launch, dtype).dot
    return {tl.bfloat16: torch.bfloat16, tl.float16: torch.float16}.get(dot)


@plan_cache
def dot_precision(launch: str, dtype: torch.dtype, interpret: bool | None = None) -> Precision:
    """The dot precision (constexprs ACC, DOT, PREC) of ``launch`` for inputs of ``dtype``; under the
    interpreter its GPU emulation (see ``kernels/runtime.py``)."""
    return pick_precision(dtype, dot_operand_dtype(launch, dtype), interpret=interpret)
