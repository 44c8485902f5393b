"""``VicinityVisionAttention``: the attention layer of the authors' Vicinity Vision Transformer.

This module reproduces the layer the authors released with the paper (Sun et al., "Vicinity
Vision Transformer", arXiv 2206.10552; code in OpenNLPLab/Vicinity-Vision-Transformer, class
``VicinityVisionAttention``) closely enough that their checkpoints load with ``strict=True`` and
give the same outputs. Where each piece comes from:

- **Projections** (their code; paper section 3, "vicinity attention"): ``q_proj``, ``k_proj`` and
  ``v_proj`` are biased ``Linear(embed_dim, embed_dim // fr_ratio)``; ``out_proj`` is a biased
  ``Linear(embed_dim // fr_ratio, embed_dim)``.
- **Feature reduction** ``fr_ratio`` (their code; the paper's "feature reduction" that shrinks the
  width the attention runs at, which matters because the expanded features are 4x wider): every
  head works at ``head_dim // fr_ratio`` channels instead of ``head_dim``.
- **Spatial reduction** ``sr_ratio`` (their code, borrowed from PVT): with ``sr_ratio > 1`` keys
  and values come from ``sr`` (a ``Conv2d`` with kernel = stride = ``sr_ratio``) followed by
  ``norm`` (``LayerNorm``), so the key grid is ``(H // sr_ratio, W // sr_ratio)`` and its angles
  use those sizes.
- **Vicinity weighting** (paper eq. for the 2-d decomposition; their ``get_index`` and the
  ``torch.cat([q*cos(a), q*sin(a), q*cos(b), q*sin(b)])`` expansion): relu features, row angle
  ``a = (pi/2) * row / H`` and column angle ``b = (pi/2) * col / W``; ``use_sum=True`` is the
  paper's sum of cosines (variant ``"sum"``), ``use_sum=False`` the product (``"product"``).
  No softmax, no 1/sqrt(d) scale, ``eps = 1e-4`` added to the normaliser.
- **Squeeze-excitation gate** (their code; not in the paper's equations): ``se_pool``
  averages the layer *input* over tokens, ``se_fc`` = Linear(C, C // se_reduction, no bias),
  ReLU, Linear(C // se_reduction, C, no bias), Sigmoid gives a per-channel gate, applied after
  the output projection as ``out = out + out * gate``.
- **Magnitude clamp** (their ``abs_clamp``, on whenever their ``self.clip`` is True, which is
  always): magnitudes are clamped into [1e-4, 1e4] keeping the sign (zeros stay zero) after the
  state ``kv = K_x^T V``, after the inverse normaliser ``1 / (Q_x . sum K_x + eps)``, after the
  numerator ``Q_x kv``, after the normalised output, after ``out_proj`` and after the SE step.
  It is a training stabiliser of theirs, not part of vicinity attention (README, "The math in short").

The attention goes through :func:`vicinity_attn.vicinity_attention` with ``clip`` on or off:
the four clamps inside the attention are the op's ``clamp=(1e-4, 1e4)`` option, which the "torch"
and "triton" backends (the fused kernels) run on their fast paths, and the "reference" backend in
the authors' expanded-feature form. The clamps after ``out_proj`` and the SE step are applied here.

Differences from their code, none of which changes a result where theirs runs: angles are
computed in float64 and cast (theirs are float32 whatever the input dtype); for half-precision
inputs the attention accumulates in float32 (theirs runs in the input dtype); the clamp's gradient
on the state S is taken as 0 where |S| is exactly 1e-4 or 1e4 (theirs passes it there); their unused
constructor arguments (kdim, vdim, dropout_rate, causal) are not accepted, and their
``linear=True`` mode (PVTv2 pooling, whose key grid their angle code does not match) is not
supported; with ``sr_ratio > 1`` their angle code needs H and W divisible by ``sr_ratio``, while
here the key grid is simply the Conv2d's output grid.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..common.process_group import HoldsProcessGroup
from ..common.validation import BACKENDS, check_layer_input, check_option, check_positive_int, check_sr_shards
from ..functional import vicinity_attention
from ..modules import spatial_reduction
from ..vicinity.reference import abs_clamp as reference_abs_clamp

CLAMP_MIN = 1e-4
CLAMP_MAX = 1e4
EPS = 1e-4


def abs_clamp(t: torch.Tensor, min_mag: float = CLAMP_MIN, max_mag: float = CLAMP_MAX) -> torch.Tensor:
    """Clamp magnitudes into [min_mag, max_mag] keeping the sign; zeros stay zero.

    Same values and gradients as the authors' ``abs_clamp`` (which works in place), out of place, NaN
    included (a NaN stays NaN and gets gradient 0). Computed by :class:`_AbsClamp`, which saves only t and
    computes the gradient as one select, where plain autograd over abs, clamp, sign and a product saves
    and computes four tensors the size of t (the layer clamps [B, N, C] twice per call). With min_mag <= 0
    (0 inside the range: autograd's product there is grad * 0, NaN for a non-finite grad) the authors'
    form runs as written, and so it does under torch.compile (which fuses it, and cannot trace a Function
    with a forward-mode rule).
    """
    if min_mag <= 0 or torch.compiler.is_compiling():
        return reference_abs_clamp(t, (min_mag, max_mag))
    return _AbsClamp.apply(t, min_mag, max_mag)


class _AbsClamp(torch.autograd.Function):
    """sign(t) * clamp(|t|, lo, hi) as clamp(t, -hi, hi) where |t| >= lo (exactly equal), lo * sign(t) below
    (0 at t = 0); derivative 1 where lo <= |t| <= hi, else 0 (autograd's for the authors' form when lo > 0:
    clamp passes its bounds, sign(t)^2 = 1 there, and a NaN fails every comparison)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        out = t.clamp(-hi, hi)
        return torch.where(t.abs() < lo, t.sign().mul_(lo), out)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        t, ctx.lo, ctx.hi = inputs
        ctx.save_for_backward(t)
        ctx.save_for_forward(t)

    @staticmethod
    def _passes(ctx, t: torch.Tensor) -> torch.Tensor:
        a = t.abs()
        return (a >= ctx.lo) & (a <= ctx.hi)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (t,) = ctx.saved_tensors
        return torch.where(_AbsClamp._passes(ctx, t), grad, 0.0), None, None

    @staticmethod
    def jvp(ctx, t_dot: torch.Tensor, _lo, _hi) -> torch.Tensor:
        (t,) = ctx.saved_tensors
        # Forward mode of the authors' product also carries clamp(|t|) * 0 from sign's zero tangent: NaN at t = NaN.
        return torch.where(t.isnan(), t, torch.where(_AbsClamp._passes(ctx, t), t_dot, 0.0))


class VicinityVisionAttention(HoldsProcessGroup, nn.Module):
    """The authors' VVT attention layer (see the module docstring), checkpoint-compatible.

    ``forward(x, H, W)``: x [B, H*W, embed_dim] (grid tokens row-major) -> [B, H*W, embed_dim],
    x's dtype.

    Args:
        embed_dim: channels C; ``embed_dim // num_heads`` must be divisible by ``fr_ratio``.
        num_heads: attention heads.
        sr_ratio: spatial-reduction factor for keys and values (1 = none).
        fr_ratio: feature-reduction factor; q, k, v are ``embed_dim // fr_ratio`` wide.
        se_reduction: squeeze-excitation bottleneck factor; must divide ``embed_dim``.
        use_sum: True for the sum-of-cosines weighting (paper default), False for the product.
        linear: must be False (their PVTv2-style pooling mode is not supported).
        clip: apply the authors' magnitude clamp (default True, as in their code). Also an
            attribute: set ``layer.clip = False`` to turn it off after construction.
        backend: backend for :func:`vicinity_attn.vicinity_attention` (every backend, clip on or off).
        group: None, or a ``torch.distributed`` process group for context parallelism: ``forward(x, H, W)``
            then takes this rank's contiguous shard of the H*W tokens and returns its rows. The SE gate's
            token mean is summed over the group (a differentiable all-reduce of B x C numbers); with
            ``sr_ratio > 1`` every rank's shard must be whole multiples of ``sr_ratio`` rows (checked),
            as for :class:`vicinity_attn.VicinityAttention`. Backends "torch" and "triton". The group is
            not state: ``copy.deepcopy`` shares it, pickling / ``torch.save`` stores None
            (:mod:`vicinity_attn.common.process_group`).
        device, dtype: factory arguments, as for ``torch.nn.Linear`` (every parameter created there).

    Parameter names and shapes (state-dict keys) are theirs: ``k_proj``, ``v_proj``, ``q_proj``,
    ``sr`` + ``norm`` (only when ``sr_ratio > 1``), ``out_proj``, ``se_fc.0``, ``se_fc.2``.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, sr_ratio: int = 1, fr_ratio: int = 1,
                 se_reduction: int = 2, use_sum: bool = True, linear: bool = False, clip: bool = True,
                 backend: str = "auto", group: torch.distributed.ProcessGroup | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for value, name in ((embed_dim, "embed_dim"), (num_heads, "num_heads"), (sr_ratio, "sr_ratio"),
                            (fr_ratio, "fr_ratio"), (se_reduction, "se_reduction")):
            check_positive_int(value, name)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        head_dim = embed_dim // num_heads
        if head_dim % fr_ratio:
            raise ValueError(f"the head dim embed_dim // num_heads ({head_dim}) must be divisible by "
                             f"fr_ratio ({fr_ratio})")
        if embed_dim % se_reduction:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by se_reduction ({se_reduction})")
        if linear:
            raise NotImplementedError("linear=True (the authors' PVTv2-style pooled keys) is not supported")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.fr = fr_ratio
        self.sr_ratio = sr_ratio
        self.linear = False
        self.use_sum = bool(use_sum)
        self.clip = bool(clip)
        self.backend = check_option(backend, "backend", BACKENDS)
        self.group = group
        inner = embed_dim // fr_ratio
        # Registration order follows theirs, so state_dict() lists keys in their order too.
        factory = dict(device=device, dtype=dtype)
        self.k_proj = nn.Linear(embed_dim, inner, **factory)
        self.v_proj = nn.Linear(embed_dim, inner, **factory)
        self.q_proj = nn.Linear(embed_dim, inner, **factory)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(embed_dim, embed_dim, kernel_size=sr_ratio, stride=sr_ratio, **factory)
            self.norm = nn.LayerNorm(embed_dim, **factory)
        self.out_proj = nn.Linear(inner, embed_dim, **factory)
        self.se_pool = nn.AdaptiveAvgPool1d(1)
        self.se_fc = nn.Sequential(
            nn.Linear(embed_dim, embed_dim // se_reduction, bias=False, **factory),
            nn.ReLU(),
            nn.Linear(embed_dim // se_reduction, embed_dim, bias=False, **factory),
            nn.Sigmoid(),
        )
        self.reset_parameters()

    @property
    def variant(self) -> str:
        return "sum" if self.use_sum else "product"

    def reset_parameters(self) -> None:
        """The initialisation the layer gets inside their VVT ``Block``: truncated-normal (std 0.02)
        Linear weights with zero biases, LayerNorm (1, 0), Conv2d normal(0, sqrt(2 / fan_out))."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """x [B, H*W, embed_dim] -> [B, H*W, embed_dim]."""
        sharded = self.group is not None
        check_layer_input(x, H, W, self.embed_dim, "embed_dim", sharded=sharded)
        B, N, C = x.shape
        heads = self.num_heads
        d = C // heads // self.fr
        # SE gate from the layer input: mean over tokens, bottleneck MLP, sigmoid -> [B, 1, C].
        if sharded:   # the whole sequence's mean: local sums added over the group
            from ..vicinity.context_parallel import all_reduce_sum
            pooled = all_reduce_sum(x.sum(1) / (H * W), self.group)
        else:
            pooled = self.se_pool(x.transpose(1, 2)).view(B, C)
        gate = self.se_fc(pooled).unsqueeze(1)
        kv_input, kv_grid = x, (H, W)
        if self.sr_ratio > 1:
            if sharded:
                from ..vicinity.context_parallel import gather_lengths
                check_sr_shards([r[0] for r in gather_lengths([N], self.group, x)], 0, H, W, self.sr_ratio)
            kv_input, kv_grid = spatial_reduction(x, H, W, self.sr_ratio, self.sr, self.norm, sharded=sharded)
        Nk = kv_input.shape[1]
        q = self.q_proj(x).view(B, N, heads, d)
        k = self.k_proj(kv_input).view(B, Nk, heads, d)
        v = self.v_proj(kv_input).view(B, Nk, heads, d)
        out = vicinity_attention(q, k, v, (H, W), kv_grid, variant=self.variant, feature_map="relu", eps=EPS,
                                 layout="bnhd", backend=self.backend,
                                 clamp=(CLAMP_MIN, CLAMP_MAX) if self.clip else None, group=self.group)
        out = self.out_proj(out.reshape(B, N, heads * d))
        if self.clip:
            out = abs_clamp(out)
        out = out + out * gate
        if self.clip:
            out = abs_clamp(out)
        return out

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, sr_ratio={self.sr_ratio}, "
                f"fr_ratio={self.fr}, use_sum={self.use_sum}, clip={self.clip}, backend={self.backend!r}")
