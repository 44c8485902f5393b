"""The public functional API and backend dispatch."""
from __future__ import annotations

from typing import Sequence

import torch

from .ops import autocast_disabled, autocast_inputs, custom_op_attention
from .spec import VicinitySpec
from .validation import validate_call

def triton_available() -> bool:
    """True when the triton backend can be imported (kernels present and triton importable)."""
    try:
        from .backends import triton_backend  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The concrete backend "auto" stands for on ``device`` for inputs of ``dtype``: triton on CUDA when
    importable, else torch; float64 always goes to torch (the triton kernels run float64 only in the
    Triton interpreter, never on a GPU)."""
    if backend != "auto":
        return backend
    if device.type == "cuda" and dtype != torch.float64 and triton_available():
        return "triton"
    return "torch"


def _run_backend(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: VicinitySpec) -> torch.Tensor:
    """o [B, H, Nq, Dv] from the backend ``name``: the reference directly (plain autograd), the linear
    backends through their custom ops (:mod:`.ops`), which torch.compile traces without a graph break."""
    if name == "reference":
        from .backends.reference import reference_vicinity_attention
        return reference_vicinity_attention(q, k, v, spec)
    if name == "triton" and not triton_available():
        try:
            from .backends import triton_backend  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(f"backend='triton' is not available: {exc}") from exc
    if name not in ("torch", "triton"):
        raise ValueError(f"unknown backend {name!r}")
    return custom_op_attention(name, q, k, v, spec)


def vicinity_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       grid: int | Sequence[int], kv_grid: int | Sequence[int] | None = None, *,
                       variant: str = "sum", feature_map: str = "relu", eps: float = 1e-4,
                       layout: str = "bhnd", backend: str = "auto",
                       num_prefix_tokens: int = 0) -> torch.Tensor:
    """Vicinity attention (Sun et al., arXiv 2206.10552), linear in the number of tokens.

    o_i = sum_j phi(q_i).phi(k_j) w(i,j) v_j / (sum_j phi(q_i).phi(k_j) w(i,j) + eps), where
    w(i, j) = sum over grid axes a of cos(theta_a(i) - theta_a(j)) ("sum"), the product over axes
    ("product") or 1 ("none"), theta_a = (pi/2) * coord_a / size_a.

    Args:
        q: [B, H, Nq, D] (layout "bhnd") or [B, Nq, H, D] ("bnhd"); float16/bfloat16/float32/float64.
        k: [B, H, Nk, D] or [B, Nk, H, D], same dtype and device as q.
        v: [B, H, Nk, Dv] or [B, Nk, H, Dv]; Dv may differ from D.
        grid: query grid, 1 to 3 positive ints (an int is a 1-d grid), row-major token order;
            ``num_prefix_tokens + prod(grid) == Nq``.
        kv_grid: key/value grid with as many axes as ``grid`` (default ``grid``);
            ``num_prefix_tokens + prod(kv_grid) == Nk``.
        variant: "sum" (paper default), "product" or "none" (plain linear attention).
        feature_map: "relu" (paper) or "elu1" (elu(x) + 1).
        eps: positive constant added to the normaliser.
        layout: "bhnd" or "bnhd", for inputs and output alike.
        backend: "auto" (triton on CUDA when available, else torch; torch for float64), "triton"
            (CUDA float16/bfloat16/float32; CPU tensors and float64 only under TRITON_INTERPRET=1),
            "torch" (linear, pure PyTorch, any device) or "reference" (quadratic; small N only).
        num_prefix_tokens: class/register tokens in front of the grid tokens of both q and k; a
            prefix token weighs 1 against every token and every token weighs 1 against it.

    Returns:
        o: [B, H, Nq, Dv] or [B, Nq, H, Dv] (as ``layout``), q's dtype and device (under
        ``torch.autocast`` for q's device: the autocast dtype, unless q is float64).
        Differentiable with respect to q, k and v for every backend. The "torch" and "triton"
        backends run as ``torch.library`` custom ops (:mod:`vicinity_attn.ops`), so
        ``torch.compile(fullgraph=True)`` traces through them.
    """
    q4, k4, v4, spec = validate_call(q, k, v, grid, kv_grid, variant=variant, feature_map=feature_map,
                                     eps=eps, layout=layout, backend=backend,
                                     num_prefix_tokens=num_prefix_tokens)
    name = resolve_backend(backend, q.device, q.dtype)
    # Under torch.autocast the op runs in the autocast dtype (the backends still accumulate in fp32).
    q4, k4, v4 = autocast_inputs(q4, k4, v4)
    if q4.shape[0] == 0 or q4.shape[1] == 0:
        # Empty batch: nothing to compute, but keep the graph so autograd still works.
        out = q4.new_zeros(*q4.shape[:3], v4.shape[-1]) + 0 * (q4.sum() + k4.sum() + v4.sum())
    else:
        with autocast_disabled(q4.device):
            out = _run_backend(name, q4, k4, v4, spec)
    return out.transpose(1, 2) if layout == "bnhd" else out
