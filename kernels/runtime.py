"""What every operation's launchers share: interpreter detection and the dtypes handed to kernels."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton.language as tl


def interpreting() -> bool:
    """True when kernels run in the Triton interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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


