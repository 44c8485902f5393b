"""What the benchmark runs: one :class:`Provider` per attention implementation.

A provider turns a :class:`~bench.cases.Case` into a callable ``fn(q, k, v) -> out`` on tensors in
its own layout (``"bhnd"`` = [B, H, N, D], the SDPA convention; ``"bnhd"`` = [B, N, H, D], the
flash_attn convention), so that no transpose is ever timed.

- ``vicinity``: ``vicinity_attention(backend="auto")``: triton on a GPU, torch elsewhere.
- ``vicinity-torch``: the linear pure-PyTorch backend, on any device.
- ``authors``: :mod:`bench.authors`, the released code's 4x-expanded formulation.
- ``vicinity-floor``: the op with L2ViT's normaliser (``variant="none"``, ``den_floor=100``, ``eps=0``),
  ``backend="auto"``.
- ``l2vit``: L2ViT's released formulation of the same (``LinearAttention.forward``): relu, the dense
  per-head ``k^T v``, ``q (k^T v)`` and ``clamp(q . sum_j k_j, 100)`` in plain PyTorch.
- ``flash``: ``flash_attn.flash_attn_func`` when it imports; else SDPA restricted to the
  FLASH_ATTENTION backend, which on CUDA is FlashAttention-2 and on a CPU is PyTorch's
  FlashAttention-style blocked CPU kernel (labelled ``sdpa-cpu (flash-style)``).
- ``sdpa-math``: SDPA restricted to the MATH backend (materialises the N x N scores).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import vicinity_attn
from vicinity_attn.common.positions import feature_count

from .authors import authors_vicinity_attention
from .cases import Case
from .flops import softmax_forward_flops, vicinity_forward_flops

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
PROVIDERS = ("vicinity", "vicinity-torch", "authors", "vicinity-floor", "l2vit", "flash", "sdpa-math")
DEFAULT_PROVIDERS = ("vicinity", "vicinity-torch", "authors", "vicinity-floor", "l2vit", "flash")
L2VIT_FLOOR = 100.0   # their torch.clamp(q @ k_sum, 1e2)


def default_providers(device: torch.device) -> tuple[str, ...]:
    """The default provider list: on a device where ``vicinity`` already is the torch backend,
    ``vicinity-torch`` would only time the same code twice, so it is left out."""
    if vicinity_attn.resolve_backend("auto", device) == "torch":
        return tuple(p for p in DEFAULT_PROVIDERS if p != "vicinity-torch")
    return DEFAULT_PROVIDERS


@dataclass(frozen=True)
class Provider:
    """One implementation at one case: its callable and what the runner needs to know about it."""

    name: str          # as given on the command line
    label: str         # what actually runs, e.g. "vicinity[torch]" or "sdpa-cpu (flash-style)"
    kind: str          # "linear" (vicinity FLOP formula) or "softmax"
    layout: str        # "bhnd" or "bnhd"
    fn: AttnFn
    forward_flops: float
    # Rough bytes of working memory beyond the inputs, for fwd+bwd: used to skip before running.
    memory_estimate: float


def flash_attn_module():
    """The ``flash_attn`` package when it imports, else None (it never does on a CPU-only machine)."""
    try:
        import flash_attn  # noqa: F401
        from flash_attn import flash_attn_func  # noqa: F401
    except Exception:  # ImportError, or a CUDA-extension load error: either way, not usable
        return None
    return flash_attn


def _sdpa_restricted(backend) -> AttnFn:
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v):
        # Restricting the backend makes SDPA raise instead of silently falling back to another kernel.
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)
    return fn


def _vicinity_fn(case: Case, backend: str, variant: str) -> AttnFn:
    def fn(q, k, v):
        return vicinity_attn.vicinity_attention(q, k, v, case.grid, variant=variant, backend=backend)
    return fn


def _authors_fn(case: Case, variant: str) -> AttnFn:
    def fn(q, k, v):
        return authors_vicinity_attention(q, k, v, case.grid, variant=variant)
    return fn


def l2vit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """L2ViT's attention core as their code computes it (temperature aside): q, k [B, H, N, D],
    v [B, H, N, Dv] -> [B, H, N, Dv] in the inputs' dtype, plain autograd."""
    q, k = torch.relu(q), torch.relu(k)
    denom = torch.clamp(q @ k.transpose(-2, -1).sum(dim=-1, keepdim=True), L2VIT_FLOOR)
    return (q @ (k.transpose(-2, -1) @ v)) / denom


def _floor_fn(backend: str) -> AttnFn:
    def fn(q, k, v):
        return vicinity_attn.vicinity_attention(q, k, v, q.shape[2], variant="none", eps=0.0,
                                                den_floor=L2VIT_FLOOR, backend=backend)
    return fn


def make_provider(name: str, case: Case, device: torch.device, dtype: torch.dtype,
                  variant: str = "sum") -> Provider | str:
    """The provider ``name`` at ``case`` on ``device``/``dtype``, or a string saying why it cannot run."""
    b, h, n, d, dv = case.batch, case.heads, case.n, case.dim, case.dim_v
    size = torch.empty((), dtype=dtype).element_size()
    n_feat = feature_count(len(case.grid), variant)
    lin_flops = vicinity_forward_flops(b, h, n, n, d, dv, n_feat)
    soft_flops = softmax_forward_flops(b, h, n, n, d, dv)
    io_bytes = b * h * n * (2 * d + 2 * dv) * size       # q, k, v, o (and as much again for gradients)

    if name in ("vicinity", "vicinity-torch"):
        backend = vicinity_attn.resolve_backend("auto", device) if name == "vicinity" else "torch"
        if backend == "triton" and dtype == torch.float64:
            return "the triton backend runs fp64 only under the interpreter"
        return Provider(name, f"vicinity[{backend}]", "linear", "bhnd", _vicinity_fn(case, backend, variant),
                        lin_flops, memory_estimate=2 * io_bytes)
    if name == "vicinity-floor":
        backend = vicinity_attn.resolve_backend("auto", device)
        if backend == "triton" and dtype == torch.float64:
            return "the triton backend runs fp64 only under the interpreter"
        return Provider(name, f"vicinity-floor[{backend}]", "linear", "bhnd", _floor_fn(backend),
                        vicinity_forward_flops(b, h, n, n, d, dv, 1), memory_estimate=2 * io_bytes)
    if name == "l2vit":
        # relu(q), relu(k) and the [N, Dv] products kept for autograd, and their gradients.
        return Provider(name, "l2vit (their code)", "linear", "bhnd", l2vit_attention,
                        vicinity_forward_flops(b, h, n, n, d, dv, 1), memory_estimate=6 * io_bytes)
    if name == "authors":
        # Expanded q and k (F*D wide), their feature-mapped inputs, and the same again as gradients.
        expanded = b * h * n * n_feat * d * size
        return Provider(name, "authors (4x-expanded)", "linear", "bhnd", _authors_fn(case, variant),
                        lin_flops, memory_estimate=2 * io_bytes + 6 * expanded)
    from torch.nn.attention import SDPBackend
    if name == "flash":
        if device.type not in ("cuda", "cpu"):
            return f"no FlashAttention provider for device type {device.type!r}"
        if device.type == "cuda":
            if dtype not in (torch.float16, torch.bfloat16):
                return "FlashAttention runs fp16/bf16 only on a GPU (use --dtype bf16 or fp16)"
            fa = flash_attn_module()
            if fa is not None:
                return Provider(name, f"flash-attn {getattr(fa, '__version__', '?')}", "softmax", "bnhd",
                                lambda q, k, v: fa.flash_attn_func(q, k, v), soft_flops,
                                memory_estimate=2 * io_bytes)
        label = "sdpa-flash (cuda)" if device.type == "cuda" else "sdpa-cpu (flash-style)"
        return Provider(name, label, "softmax", "bhnd", _sdpa_restricted(SDPBackend.FLASH_ATTENTION),
                        soft_flops, memory_estimate=2 * io_bytes)
    if name == "sdpa-math":
        # Scores, probabilities and their gradients: about four B*H*N*N tensors alive at once.
        return Provider(name, "sdpa-math", "softmax", "bhnd", _sdpa_restricted(SDPBackend.MATH), soft_flops,
                        memory_estimate=2 * io_bytes + 4 * b * h * n * n * size)
    return f"unknown provider {name!r} (choose from {', '.join(PROVIDERS)})"


def make_inputs(provider: Provider, case: Case, device: torch.device, dtype: torch.dtype,
                requires_grad: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random normal q, k, v for ``case`` in the provider's layout (same values for every provider)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape_qk = (case.batch, case.heads, case.n, case.dim)
    shape_v = (case.batch, case.heads, case.n, case.dim_v)
    tensors = [torch.randn(s, generator=gen, dtype=torch.float32) for s in (shape_qk, shape_qk, shape_v)]
    out = []
    for t in tensors:
        if provider.layout == "bnhd":
            t = t.transpose(1, 2)
        out.append(t.to(device=device, dtype=dtype).contiguous().requires_grad_(requires_grad))
    return out[0], out[1], out[2]


# ----------------------------------------------------------------------------------------------------
# k-NN attention (KVT): ``knn`` = vicinity_attn.knn_attention (backend "auto": triton on a GPU, the
# row-block torch backend elsewhere); ``knn-authors`` = the authors' dense formulation (scores, a
# dense float mask from torch.topk, -inf fill, softmax), i.e. the "reference" backend. The CLI is
# ``python -m bench.knn``.
# ----------------------------------------------------------------------------------------------------

KNN_PROVIDERS = ("knn", "knn-authors")


def knn_topk(case: Case, topk: int | None) -> int:
    """The topk of a k-NN case: as given, else N / 2 (the issue's target setting)."""
    return topk if topk is not None else max(1, case.n // 2)


def make_knn_provider(name: str, case: Case, device: torch.device, dtype: torch.dtype,
                      topk: int | None = None) -> Provider | str:
    """The k-NN provider ``name`` at ``case`` (N = prod(case.grid) tokens), or why it cannot run."""
    b, h, n, d, dv = case.batch, case.heads, case.n, case.dim, case.dim_v
    size = torch.empty((), dtype=dtype).element_size()
    k = knn_topk(case, topk)
    flops = softmax_forward_flops(b, h, n, n, d, dv)
    io_bytes = b * h * n * (2 * d + 2 * dv) * size
    if name == "knn":
        backend = "triton" if device.type == "cuda" and vicinity_attn.functional.knn_triton_available() else "torch"
        if backend == "triton" and dtype == torch.float64:
            return "the triton backend runs fp64 only under the interpreter"
        fn = lambda q, kk, v: vicinity_attn.knn_attention(q, kk, v, k, backend=backend)  # noqa: E731
        return Provider(name, f"knn[{backend}]", "softmax", "bhnd", fn, flops, memory_estimate=3 * io_bytes)
    if name == "knn-authors":
        fn = lambda q, kk, v: vicinity_attn.knn_attention(q, kk, v, k, backend="reference")  # noqa: E731
        # Scores, mask, where-output, probabilities, their gradients (N x N each) and the int64 indices.
        return Provider(name, "knn-authors (dense topk mask)", "softmax", "bhnd", fn, flops,
                        memory_estimate=2 * io_bytes + 7 * b * h * n * n * max(size, 4) + b * h * n * k * 8)
    return f"unknown k-NN provider {name!r} (choose from {', '.join(KNN_PROVIDERS)})"
