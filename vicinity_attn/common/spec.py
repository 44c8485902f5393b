"""The validated description of one vicinity-attention call, handed to every backend."""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

from .positions import feature_count


@dataclass(frozen=True, kw_only=True)
class CallOptions:
    """The options of a call, shared by dense and packed calls (and by every sequence of a packed one).

    ``den_floor``: the normaliser is max(sum_j phi(q_i).phi(k_j) w(i,j), den_floor) + eps (L2ViT's
    floor; 0 = none). ``clamp``: None, or (min_mag, max_mag) for the authors' VVT magnitude clamp on
    the states, the inverse normaliser, the numerator and the output. Each sequence is
    ``num_prefix_tokens`` prefix tokens followed by its grid tokens. ``causal``: None (bidirectional), or
    "frames": frame-causal along the first grid axis (a grid token of frame t attends to the prefix
    tokens and to the grid tokens of frames <= t; a prefix token attends to the prefix tokens only).
    """

    variant: str = "sum"
    feature_map: str = "relu"
    eps: float = 1e-4
    num_prefix_tokens: int = 0
    den_floor: float = 0.0
    clamp: tuple[float, float] | None = None
    causal: str | None = None

    def options(self) -> dict:
        """The option fields as keyword arguments (to build another spec with the same options)."""
        return {name: getattr(self, name) for name in OPTION_FIELDS}

    @property
    def n_features(self) -> int:
        """F, the number of position features per token."""
        return feature_count(self.n_axes, self.variant, self.num_prefix_tokens > 0)


# The option fields' names, read once here (torch.compile traces options(), not dataclasses.fields).
OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(CallOptions))


@dataclass(frozen=True)
class VicinitySpec(CallOptions):
    """Everything about a call except the tensors: the options and the grids.

    ``grid`` / ``kv_grid``: 1 to 3 positive ints; the query / key sequence is
    ``num_prefix_tokens`` prefix tokens followed by ``prod(grid)`` / ``prod(kv_grid)`` grid tokens.
    """

    grid: tuple[int, ...]
    kv_grid: tuple[int, ...]

    @property
    def n_axes(self) -> int:
        return len(self.grid)

    @property
    def n_frames(self) -> int:
        """Frames of a frame-causal call: the size of the first grid axis (query and key grids share it)."""
        return self.grid[0]


@dataclass(frozen=True)
class VarlenSpec(CallOptions):
    """A packed call of ``vicinity_attention_varlen``: one query grid and one key grid per sequence, and
    the options every sequence shares. Sequence i has ``num_prefix_tokens + prod(grids[i])`` query tokens
    and ``num_prefix_tokens + prod(kv_grids[i])`` key tokens, packed in sequence order (FlashAttention's
    layout); the offsets follow from the grids alone (``cu_seqlens`` is checked against them)."""

    grids: tuple[tuple[int, ...], ...]
    kv_grids: tuple[tuple[int, ...], ...]

    @property
    def n_seqs(self) -> int:
        return len(self.grids)

    @property
    def n_axes(self) -> int:
        return len(self.grids[0])

    def sequence(self, i: int) -> VicinitySpec:
        """The dense spec of sequence i alone."""
        return VicinitySpec(grid=self.grids[i], kv_grid=self.kv_grids[i], **self.options())

    def lengths(self, side: str) -> list[int]:
        """Tokens per sequence on ``side`` ("query" or "key")."""
        grids = self.grids if side == "query" else self.kv_grids
        return [self.num_prefix_tokens + math.prod(g) for g in grids]

    def offsets(self, side: str) -> list[int]:
        """cu_seqlens of ``side`` as Python ints: [0, n_0, n_0 + n_1, ...] (S + 1 entries)."""
        return [0, *itertools.accumulate(self.lengths(side))]

    def groups(self) -> list[list[int]]:
        """Sequence indices grouped by equal (grid, kv_grid), in order of first appearance: the sequences
        of a group have the same shapes and can run as one batched dense call."""
        by_grids: dict[tuple, list[int]] = {}
        for i, key in enumerate(zip(self.grids, self.kv_grids)):
            by_grids.setdefault(key, []).append(i)
        return list(by_grids.values())


@dataclass(frozen=True)
class TokenShard:
    """Where one rank's tokens sit in the whole sequence, under context parallelism: its queries are
    positions ``q_offset ..`` of ``n_queries``, its keys / values positions ``k_offset ..`` of ``n_keys``
    (prefix tokens first, then the grid tokens in row-major order)."""

    q_offset: int
    k_offset: int
    n_queries: int
    n_keys: int
