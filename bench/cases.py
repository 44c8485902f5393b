"""Benchmark cases (shapes) and the presets that list them."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp64": torch.float64, "float64": torch.float64}


@dataclass(frozen=True)
class Case:
    """One problem shape: queries and keys on the same square-or-not 2-d grid, layout [B, H, N, D]."""

    grid: tuple[int, ...]
    batch: int
    heads: int
    dim: int
    dim_v: int
    label: str = ""

    @property
    def n(self) -> int:
        """Tokens per sequence, prod(grid)."""
        return math.prod(self.grid)

    @property
    def grid_text(self) -> str:
        return "x".join(str(s) for s in self.grid)

    @property
    def name(self) -> str:
        """A short readable name, e.g. ``56x56 B1 H1 D48``."""
        base = f"{self.grid_text} B{self.batch} H{self.heads} D{self.dim}"
        if self.dim_v != self.dim:
            base += f" Dv{self.dim_v}"
        return f"{self.label}: {base}" if self.label else base

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(n=self.n, name=self.name)
        return d


# Square grids of the default sweep: N = 196 ... 50176.
SQUARE_SIDES = (14, 28, 56, 112, 224)
# Attention shapes of the Vicinity Vision Transformer stages (tokens, heads, head dim); the 7x7
# stage (8 heads of 64) is the last one of VVT-medium-style configurations.
VVT_STAGES = (("stage1", (56, 56), 1, 48), ("stage2", (28, 28), 2, 40),
              ("stage3", (14, 14), 5, 32), ("stage4", (7, 7), 8, 64))
# The quick preset: small enough to finish in under two minutes on a 2-core CPU, and it includes
# 112x112, the size the CPU performance targets (bench.targets) are stated at.
QUICK_SIDES = (28, 56, 112)

PRESETS = ("square", "vvt", "quick")


def parse_grids(text: str) -> list[tuple[int, ...]]:
    """"14,28,56" (square sides) or "56x56,32x64" (explicit grids) -> list of grids."""
    grids = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            sizes = tuple(int(s) for s in item.split("x"))
        except ValueError:
            raise ValueError(f"grid {item!r} is not a side like 56 or a grid like 56x56 or 32x64") from None
        if len(sizes) == 1:
            sizes = (sizes[0], sizes[0])
        if any(s <= 0 for s in sizes):
            raise ValueError(f"grid sizes must be positive, got {item!r}")
        grids.append(sizes)
    if not grids:
        raise ValueError(f"no grid in {text!r}")
    return grids


def build_cases(preset: str, *, grids: Sequence[tuple[int, ...]] | None = None, batch: int | None = None,
                heads: int | None = None, dim: int | None = None, dim_v: int | None = None) -> list[Case]:
    """The cases of ``preset``; explicit options override the preset's values."""
    if preset == "vvt" and grids is None:
        return [Case(g, batch or 1, heads or h, dim or d, dim_v or dim or d, label=name)
                for name, g, h, d in VVT_STAGES]
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    if grids is None:
        sides = QUICK_SIDES if preset == "quick" else SQUARE_SIDES
        grids = [(s, s) for s in sides]
    b, h, d = batch or 1, heads or 4, dim or 64
    return [Case(tuple(g), b, h, d, dim_v or d) for g in grids]
