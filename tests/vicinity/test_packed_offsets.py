"""Packed (varlen) calls past int32: the (sequence, head) rows are addressed in int64, and the size guard
bounds every product that stays int32, checked from sizes alone (nothing of that size is allocated)."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from vicinity_attn.common.spec import VarlenSpec
from vicinity_attn.kernels.vicinity import Packing
from vicinity_attn.kernels.vicinity.clamp import clamped_row_weights_kernel
from vicinity_attn.vicinity.triton_varlen import check_packed_sizes, check_triton_varlen_inputs


def test_guard_allows_sequences_times_heads_times_tokens_past_int32():
    # 4096 sequences x 8 heads x 65536 tokens = 2^31: the int64 row addressing covers it.
    check_packed_sizes(4096, 8, 2 ** 16, 2 ** 16, 64, 64)
    grids = ((16,),) * 4096
    spec = VarlenSpec(grids=grids, kv_grids=grids)
    q = torch.empty(2 ** 16, 8, 64, device="meta")
    check_triton_varlen_inputs(q, q, q, spec)


@pytest.mark.parametrize("sizes, match", [
    ((2, 8, 2 ** 22, 16, 64, 64), r"packed q .* 4194304 \* 8 \* 64"),
    ((2, 8, 16, 2 ** 22, 64, 64), r"packed k .* 4194304 \* 8 \* 64"),
    ((2, 8, 16, 2 ** 21, 16, 128), r"packed v .* 2097152 \* 8 \* 128"),
    ((2, 8, 2 ** 21, 16, 16, 128), r"packed o .* 2097152 \* 8 \* 128"),
    ((8192, 8, 16, 16, 64, 64), r"sequences \* heads < 65536"),
])
def test_guard_names_the_sizes(sizes, match):
    with pytest.raises(ValueError, match=match):
        check_packed_sizes(*sizes)
    # One below each int32 limit passes.
    S, H, Tq, Tk, D, Dv = sizes
    if S * H < 65536:
        fit = lambda t, w: min(t, (2 ** 31 - 1) // (H * w))  # noqa: E731
        check_packed_sizes(S, H, fit(Tq, max(D, Dv)), fit(Tk, max(D, Dv)), D, Dv)


def test_clamped_row_weights_address_rows_past_int32():
    # 512 sequences, only the last one holding tokens (the others' programs exit at once): its numerator
    # rows sit at (sequence * H + head) * T * Dv = 511 * 16417 * 256 > 2^31 elements, which int32 wrapped.
    # The buffers stay small (T = 16417 tokens). The interpreter computes these offsets wider than a GPU
    # does, so this pins the packed row addressing at large (sequence, head) indices, not its int width.
    S, H, T, Dv, block_n = 512, 1, 16417, 256, 512
    pack = Packing.build(((0,),) * (S - 1) + ((T,),), ((0,),) * (S - 1) + ((T,),), 0, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    do = torch.randn(1, H, T, Dv, generator=gen)
    num = torch.randn(1, H, T, Dv, generator=gen)
    den = torch.rand(H, T, generator=gen) + 0.5
    rs, rz = torch.full((H, T), float("nan")), torch.full((H, T), float("nan"))
    g = torch.full_like(do, float("nan"))
    ones = pack.factors([1.0] * S, torch.float32)
    clamped_row_weights_kernel[(triton.cdiv(T, block_n), S * H)](
        do, num, den, g, rs, rz, H, T, Dv, 0.0, 0.0, 1e-30, 1e30, 1.0, *do.stride(), *g.stride(),
        BLOCK_N=block_n, BLOCK_DV=Dv, ACC=tl.float32, seq_ptr=pack.table, factor_ptr=ones, VARLEN=True)
    # Bounds that clamp nothing: g = dO / den, rs = 1, rz = -(dO . n) / den^2.
    torch.testing.assert_close(g[0, 0], do[0, 0] / den[0, :, None])
    torch.testing.assert_close(rs[0], torch.ones(T))
    torch.testing.assert_close(rz[0], -(do[0, 0] * num[0, 0]).sum(-1) / den[0] ** 2, rtol=1e-5, atol=1e-5)
