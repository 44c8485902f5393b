"""The one helpers module of the tests: random inputs and the tolerance rule (a backend's error against
float64 at most 2x the plain computation's in the same dtype, plus a small floor), checks against the
reference for both operations, torch.func checks, packed-input builders and the compile gate's quick report."""
from __future__ import annotations

import collections
import functools
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from vicinity_attn import knn_attention, vicinity_attention
from vicinity_attn.layers.vvt import VicinityVisionAttention

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------
# Where triton-backend tests run, and in which dtypes (the interpreter on a CPU, or a GPU run)
# ----------------------------------------------------------------------------------------------------

FLOAT64_ON_CUDA = ("float64 on CUDA: backend='triton' refuses it (the API sends float64 to the torch backend); "
                   "this float64 case runs in the interpreter run")
INTERPRETER_ONLY = "calls the launchers with float64 tensors and asserts 1e-12: an interpreter-only check"
# fp32 on a GPU: TF32x3 dots, FMA contraction and another order of the fp32 sums than the reference's.
GPU_FP32_RTOL, GPU_FP32_ATOL = 1e-4, 1e-5


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_device(interpret: bool | None = None, cuda_available: bool | None = None) -> str | None:
    """Where tests of backend='triton' put their tensors: "cpu" under the interpreter, "cuda" on a GPU run
    (TRITON_INTERPRET=0 and a CUDA device), None where the triton backend cannot run at all."""
    interpret = interpreting() if interpret is None else interpret
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if interpret:
        return "cpu"
    return "cuda" if cuda else None


def float64_on_triton(device) -> bool:
    """float64 reaches the triton kernels only in the interpreter (CPU tensors); CUDA float64 is refused."""
    return torch.device(device).type == "cpu"


def triton_dtype(dtype: torch.dtype, device) -> torch.dtype:
    """``dtype`` for a triton-backend case on ``device``; skips (with the reason) float64 on CUDA."""
    if dtype == torch.float64 and not float64_on_triton(device):
        import pytest
        pytest.skip(FLOAT64_ON_CUDA)
    return dtype


def exact_case(device) -> tuple[torch.dtype, float, float]:
    """(dtype, rtol, atol) of a check that wants the triton backend "exact" against the reference: float64 and
    1e-10 / 1e-12 in the interpreter; float32 on a GPU, with the tolerance its arithmetic needs there."""
    if float64_on_triton(device):
        return torch.float64, 1e-10, 1e-12
    return torch.float32, GPU_FP32_RTOL, GPU_FP32_ATOL


def fused_vs_separate_tolerance(dtype: torch.dtype, device, name: str) -> tuple[float, float] | None:
    """How far the fused backward query pass may be from the separate passes for gradient ``name``, as (max
    relative error, max fraction of differing elements); None: bitwise equal.

    In the interpreter both run the same helpers in the same order: bitwise, except dq of 16-bit inputs (its
    dots take the state pass's tiles: rare elements one rounding step apart). On a GPU the two programs are
    compiled apart (FMA contraction, instruction order, approximate division): fp32 sums that differ in the
    last bits, which the 16-bit outputs can round one step apart anywhere: at most two steps of the dtype."""
    if float64_on_triton(device):
        if dtype == torch.float64 or name != "dq":
            return None
        return 1e-3, 1e-3
    return 2 * torch.finfo(dtype).eps, 1.0


# ----------------------------------------------------------------------------------------------------
# Inputs, the tolerance rule and checks against the reference
# ----------------------------------------------------------------------------------------------------

# Absolute floor of the tolerance rule, relative to the reference's magnitude, per dtype.
FLOOR = {torch.float64: 1e-10, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def make_inputs(B, H, Nq, Nk, D, Dv, dtype=torch.float64, layout="bhnd", device="cpu", requires_grad=True,
                feature_map=None):
    """Fresh standard-normal q, k, v in the requested layout (float64 values cast to dtype). For
    ``feature_map="identity"`` q and k are |N(0, 1)| instead: identity features are meant to be non-negative."""
    def one(n, d, nonneg=False):
        shape = (B, H, n, d) if layout == "bhnd" else (B, n, H, d)
        x = torch.randn(shape, dtype=torch.float64, device=device)
        return (x.abs() if nonneg else x).to(dtype).requires_grad_(requires_grad)
    nonneg = feature_map == "identity"
    return one(Nq, D, nonneg), one(Nk, D, nonneg), one(Nk, Dv)


def token_counts(grid, kv_grid=None, prefix=0):
    return prefix + math.prod(grid), prefix + math.prod(kv_grid or grid)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref|, in float64."""
    ref = ref.double()
    scale = ref.abs().max().item()
    assert scale > 0, "reference is all zeros: the comparison would be meaningless"
    return (x.double() - ref).abs().max().item() / scale


def outputs_and_grads(q, k, v, do, **kw):
    out = vicinity_attention(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), do.to(out.dtype))
    return [out, *grads]


def check_against_reference(q, k, v, **kw):
    """Forward and dq/dk/dv of ``kw['backend']`` against the float64 reference, by the tolerance rule.

    The rule: for inputs of dtype T, the backend's error against the float64 reference must be at
    most 2x the error of the reference computed in T (the plain PyTorch computation), plus a floor.
    Returns the list of (backend error, allowed) pairs for forward, dq, dk, dv.
    """
    dtype = q.dtype
    backend = kw.pop("backend")
    as64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref_out = vicinity_attention(*as64, backend="reference", **kw)
    do = torch.randn_like(ref_out)
    ref = [ref_out, *torch.autograd.grad(ref_out, as64, do)]
    got = outputs_and_grads(q, k, v, do, backend=backend, **kw)
    if dtype == torch.float64:
        plain = ref
    else:
        lowp = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        plain = outputs_and_grads(*lowp, do, backend="reference", **kw)
    results = []
    for name, g, r, p in zip(("out", "dq", "dk", "dv"), got, ref, plain):
        assert g.dtype == dtype and g.shape == r.shape, f"{name}: {g.dtype} {tuple(g.shape)}"
        results.append(assert_rule(name, g, r, p, dtype))
    return results


def assert_rule(name: str, got: torch.Tensor, ref: torch.Tensor, plain: torch.Tensor,
                dtype: torch.dtype) -> tuple[float, float]:
    """The tolerance rule for one tensor: error of ``got`` against the float64 ``ref`` at most 2x the
    error of ``plain`` (the same computation done plainly in ``dtype``) plus FLOOR[dtype]."""
    err, plain_err = rel_err(got, ref), rel_err(plain, ref)
    allowed = 2 * plain_err + FLOOR[dtype]
    assert err <= allowed, f"{name}: error {err:.3e} > allowed {allowed:.3e} (plain {dtype} error {plain_err:.3e})"
    return err, allowed


def count_launches(monkeypatch, kernels) -> collections.Counter:
    """Counts the launches (``kernel[grid](...)``) of each kernel in ``kernels`` ((module, name) pairs:
    the module attribute the launcher calls through) from now on; returns the live Counter by name."""
    launches = collections.Counter()

    class Counting:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launches[self.name] += 1
            return self.kernel[grid]
    for module, name in kernels:
        monkeypatch.setattr(module, name, Counting(name, getattr(module, name)))
    return launches


def cu_seqlens(lengths):
    """int32 [S + 1] offsets of sequences of ``lengths`` packed one after another."""
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


def pack(grids, kv_grids=None, prefix=0, H=2, D=4, Dv=3, dtype=torch.float64, requires_grad=True, feature_map=None):
    """Random packed q, k, v for sequences of ``grids`` / ``kv_grids`` and their cu_seqlens (q, k non-negative
    for ``feature_map="identity"``, as in :func:`make_inputs`)."""
    kv_grids = kv_grids or grids
    nq = [prefix + math.prod(g if isinstance(g, tuple) else (g,)) for g in grids]
    nk = [prefix + math.prod(g if isinstance(g, tuple) else (g,)) for g in kv_grids]
    nonneg = feature_map == "identity"

    def one(n, d, nonneg=False):
        x = torch.randn(n, H, d, dtype=torch.float64)
        return (x.abs() if nonneg else x).to(dtype).requires_grad_(requires_grad)
    return one(sum(nq), D, nonneg), one(sum(nk), D, nonneg), one(sum(nk), Dv), cu_seqlens(nq), cu_seqlens(nk)


# ----------------------------------------------------------------------------------------------------
# k-NN attention: the tolerance rule applied to knn_attention
# ----------------------------------------------------------------------------------------------------

def knn_outputs_and_grads(q, k, v, do, topk, **kw):
    out = knn_attention(q, k, v, topk, **kw)
    return [out, *torch.autograd.grad(out, (q, k, v), do.to(out.dtype))]


def check_knn_against_reference(q, k, v, topk, backend, **kw):
    """Forward and dq/dk/dv of ``backend`` against the float64 reference by the tolerance rule (the
    plain computation: the reference backend, the authors' formulation, run in q's dtype)."""
    dtype = q.dtype
    as64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref_out = knn_attention(*as64, topk, backend="reference", **kw)
    do = torch.randn_like(ref_out)
    ref = [ref_out, *torch.autograd.grad(ref_out, as64, do)]
    got = knn_outputs_and_grads(q, k, v, do, topk, backend=backend, **kw)
    if dtype == torch.float64:
        plain = ref
    else:
        lowp = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        plain = knn_outputs_and_grads(*lowp, do, topk, backend="reference", **kw)
    results = []
    for name, g, r, p in zip(("out", "dq", "dk", "dv"), got, ref, plain):
        assert g.dtype == dtype and g.shape == r.shape, f"{name}: {g.dtype} {tuple(g.shape)}"
        if topk == 1 and name in ("dq", "dk"):
            # One kept key per row: the softmax is the constant 1, so the scores get no gradient; what is
            # left is the rounding of dO.v_j - dO.o_i (o_i = v_j), a few ulps of the products' size.
            size = do.abs().max() * v.abs().max() * v.shape[-1] * q.abs().max() * k.abs().max()
            bound = 16 * torch.finfo(dtype).eps * size.item()
            assert g.abs().max().item() <= bound, f"{name} must vanish with topk = 1 (max {g.abs().max()})"
            continue
        results.append(assert_rule(name, g, r, p, dtype))
    return results


# ----------------------------------------------------------------------------------------------------
# torch.func checks both operations share (float64, at the level of rounding)
# ----------------------------------------------------------------------------------------------------

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def close_fp64(got: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    """float64 against the float64 reference: relative error at the level of rounding."""
    assert got.dtype == ref.dtype and got.shape == ref.shape, name
    assert ref.abs().max() > 0, f"{name}: the reference is all zero"
    err = rel_err(got, ref)
    assert err < 1e-10, f"{name}: relative error {err:.3e}"


def check_grad_and_vmap_of_grad(fn: Attention, ref_fn: Attention, inputs: tuple) -> None:
    """torch.func.grad of a loss, and per-example gradients (vmap over the batch of a grad over one example)."""
    loss = lambda f: (lambda q, k, v: f(q, k, v).square().sum())  # noqa: E731
    got = torch.func.grad(loss(fn), argnums=(0, 1, 2))(*inputs)
    ref = torch.func.grad(loss(ref_fn), argnums=(0, 1, 2))(*inputs)
    for name, g, r in zip("qkv", got, ref):
        close_fp64(g, r, f"grad d{name}")
    per_example = lambda f: torch.func.vmap(torch.func.grad(loss(f), argnums=(0, 1, 2)))  # noqa: E731
    batched = tuple(t.unsqueeze(1) for t in inputs)
    for name, g, r in zip("qkv", per_example(fn)(*batched), per_example(ref_fn)(*batched)):
        close_fp64(g, r, f"vmap(grad) d{name}")


def check_jacobian(fn: Attention, ref_fn: Attention, inputs: tuple, transform: str) -> None:
    """torch.func.jacrev / jacfwd against the reference's, computed by the batching rules (no per-sample
    fallback loop)."""
    jac = getattr(torch.func, transform)
    ref = jac(ref_fn, argnums=(0, 1, 2))(*inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = jac(fn, argnums=(0, 1, 2))(*inputs)
    assert not [w for w in caught if "performance drop" in str(w.message)], "vmap fell back to a loop"
    for name, g, r in zip("qkv", got, ref):
        close_fp64(g, r, f"{transform} d/d{name}")


def check_vmap_over_an_extra_dimension(fn: Attention, ref_fn: Attention, q: torch.Tensor, k: torch.Tensor,
                                       v: torch.Tensor) -> None:
    """vmap over a new leading dimension of q (k and v shared) against a loop of reference calls."""
    qs = torch.randn(2, *q.shape, dtype=q.dtype)
    ref = torch.stack([ref_fn(x, k, v) for x in qs])
    got = torch.func.vmap(fn, in_dims=(0, None, None))(qs, k, v)
    close_fp64(got, ref, "vmap")


def check_reduce_overhead_compile(fn, inputs) -> None:
    """torch.compile(fn, fullgraph=True, mode="reduce-overhead") (CUDA graphs on a GPU; a plain compile on
    a CPU) traces with no graph break and matches eager, gradients with respect to ``inputs`` included."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, mode="reduce-overhead")
    out, want = compiled(*inputs), fn(*inputs)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    do = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, inputs, do), torch.autograd.grad(want, inputs, do)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


class PassThroughMode(torch.overrides.TorchFunctionMode):
    """A torch function mode that changes nothing: calls under it must take the custom ops' path."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


# Derivatives of derivatives: the fused backends raise one message naming backend='reference'.
SECOND_ORDER = {
    "create_graph": lambda f, q, k, v: torch.autograd.grad(
        torch.autograd.grad(f(q, k, v).square().sum(), q, create_graph=True)[0].sum(), q),
    "hessian": lambda f, q, k, v: torch.func.hessian(lambda x: f(x, k, v).sum())(q),
    "grad_of_grad": lambda f, q, k, v: torch.func.grad(
        lambda x: torch.func.grad(lambda y: f(y, k, v).square().sum())(x).sum())(q),
    "jvp_of_grad": lambda f, q, k, v: torch.func.jvp(
        torch.func.grad(lambda y: f(y, k, v).square().sum()), (q,), (torch.randn_like(q),)),
}


# ----------------------------------------------------------------------------------------------------
# The compile gate's quick matrix, run once per session in a child process without TRITON_INTERPRET
# ----------------------------------------------------------------------------------------------------

@functools.cache
def quick_gate_report() -> tuple[dict, str]:
    """(the JSON report of ``compile_gate --quick``, its stdout + stderr)."""
    out = os.path.join(tempfile.mkdtemp(prefix="quick_gate_"), "gate.json")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "tools.compile_gate", "--quick", "--json", out],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    log = proc.stdout + proc.stderr
    assert proc.returncode in (0, 1) and os.path.exists(out), log[-6000:]
    with open(out) as f:
        return json.load(f), log


def kernels_of(report: dict, op: str) -> list[dict]:
    """The report's kernels that cases of operation ``op`` launch ("vicinity" includes the clamp cases)."""
    return [k for k in report["kernels"] if any(c.split(" ", 1)[0].startswith(op) for c in k["cases"])]


# ----------------------------------------------------------------------------------------------------
# VVT: the authors' layer restated (their parameter names and forward), shared by the layer and clamp tests
# ----------------------------------------------------------------------------------------------------

def authors_param_shapes(C: int, sr_ratio: int, fr_ratio: int, se_reduction: int) -> dict[str, tuple[int, ...]]:
    """Hand-written list of the state-dict keys of their ``VicinityVisionAttention`` (linear=False),
    in their registration order."""
    inner = C // fr_ratio
    shapes = {
        "k_proj.weight": (inner, C), "k_proj.bias": (inner,),
        "v_proj.weight": (inner, C), "v_proj.bias": (inner,),
        "q_proj.weight": (inner, C), "q_proj.bias": (inner,),
    }
    if sr_ratio > 1:
        shapes.update({"sr.weight": (C, C, sr_ratio, sr_ratio), "sr.bias": (C,),
                       "norm.weight": (C,), "norm.bias": (C,)})
    shapes.update({"out_proj.weight": (C, inner), "out_proj.bias": (C,),
                   "se_fc.0.weight": (C // se_reduction, C), "se_fc.2.weight": (C, C // se_reduction)})
    return shapes


def random_state_dict(shapes: dict[str, tuple[int, ...]], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random float64 weights, large enough that the attention and the SE gate matter."""
    sd = {}
    for name, shape in shapes.items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        scale = 1.0 / math.sqrt(fan_in) if len(shape) > 1 else 0.3
        sd[name] = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    if "norm.weight" in sd:
        sd["norm.weight"] += 1.0  # a LayerNorm gain near 1, as trained ones are
    return sd


def _their_abs_clamp(t: torch.Tensor) -> torch.Tensor:
    sign = t.sign()
    return t.abs().clamp(1e-4, 10000) * sign


def authors_forward(sd: dict[str, torch.Tensor], query: torch.Tensor, H: int, W: int, *, num_heads: int,
                    sr_ratio: int, fr: int, use_sum: bool, clip: bool) -> torch.Tensor:
    """Their forward restated step by step with functional ops (same tensor layouts: (L, N, E) and
    the (N, L, h, d) head split, the angle tables from flat token indices, the concatenated
    expanded features). Only change: angles in the input dtype instead of float32."""
    B, N, C = query.shape
    se = query.permute(0, 2, 1).mean(-1)                                   # se_pool
    se = torch.sigmoid(F.linear(F.relu(F.linear(se, sd["se_fc.0.weight"])), sd["se_fc.2.weight"]))
    se = se.view(B, C, 1)
    if sr_ratio > 1:
        x_ = query.permute(0, 2, 1).reshape(B, C, H, W)
        x_ = F.conv2d(x_, sd["sr.weight"], sd["sr.bias"], stride=sr_ratio).reshape(B, C, -1).permute(0, 2, 1)
        x_ = F.layer_norm(x_, (C,), sd["norm.weight"], sd["norm.bias"])
    else:
        x_ = query
    k = F.linear(x_, sd["k_proj.weight"], sd["k_proj.bias"]).permute(1, 0, 2)
    v = F.linear(x_, sd["v_proj.weight"], sd["v_proj.bias"]).permute(1, 0, 2)
    query = query.permute(1, 0, 2)
    tgt_len, bsz, embed_dim = query.shape
    head_dim = embed_dim // num_heads
    q = F.linear(query, sd["q_proj.weight"], sd["q_proj.bias"])
    q = q.contiguous().view(tgt_len, bsz, num_heads, head_dim // fr).transpose(0, 1)
    k = k.contiguous().view(-1, bsz, num_heads, head_dim // fr).transpose(0, 1)
    v = v.contiguous().view(-1, bsz, num_heads, head_dim // fr).transpose(0, 1)
    q, k = F.relu(q), F.relu(k)
    c = math.pi / 2
    m, n = W, H                                   # their get_index(W, H): m = width, n = height
    index = torch.arange(m * n, dtype=q.dtype).reshape(1, -1, 1, 1)
    a = c * torch.div(index, m, rounding_mode="floor") / n
    b = c * torch.remainder(index, m) / m
    ms, ns = m / sr_ratio, n / sr_ratio
    index = torch.arange(int(ms * ns), dtype=q.dtype).reshape(1, -1, 1, 1)
    a_sr = c * torch.div(index, ms, rounding_mode="floor") / ns
    b_sr = c * torch.remainder(index, ms) / ms
    if use_sum:
        q_ = torch.cat([q * torch.cos(a), q * torch.sin(a), q * torch.cos(b), q * torch.sin(b)], dim=-1)
        k_ = torch.cat([k * torch.cos(a_sr), k * torch.sin(a_sr), k * torch.cos(b_sr), k * torch.sin(b_sr)], dim=-1)
    else:
        q_ = torch.cat([q * torch.cos(a) * torch.cos(b), q * torch.cos(a) * torch.sin(b),
                        q * torch.sin(a) * torch.cos(b), q * torch.sin(a) * torch.sin(b)], dim=-1)
        k_ = torch.cat([k * torch.cos(a_sr) * torch.cos(b_sr), k * torch.cos(a_sr) * torch.sin(b_sr),
                        k * torch.sin(a_sr) * torch.cos(b_sr), k * torch.sin(a_sr) * torch.sin(b_sr)], dim=-1)
    eps = 1e-4
    maybe = _their_abs_clamp if clip else (lambda t: t)
    kv_ = maybe(torch.matmul(k_.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)))
    k_sum = torch.sum(k_, dim=1, keepdim=True)
    z_ = maybe(1 / (torch.sum(q_ * k_sum, dim=-1) + eps))
    out = maybe(torch.matmul(q_.transpose(1, 2), kv_).transpose(1, 2))
    out = maybe(out * z_.unsqueeze(-1))
    out = out.transpose(0, 1).contiguous().view(tgt_len, bsz, embed_dim // fr)
    out = maybe(F.linear(out, sd["out_proj.weight"], sd["out_proj.bias"]))
    out = out.permute(1, 2, 0)
    out = maybe(out + out * se.expand_as(out))
    return out.permute(2, 0, 1).permute(1, 0, 2)


VVT_CONFIGS = [  # (C, heads, sr_ratio, fr_ratio, se_reduction, use_sum, H, W)
    (16, 2, 1, 1, 2, True, 4, 5),
    (24, 2, 2, 2, 1, True, 6, 4),
    (16, 1, 1, 2, 2, False, 3, 5),
    (32, 4, 2, 1, 4, False, 4, 6),
]


def vvt_layer_and_weights(cfg, seed: int, **kwargs):
    C, heads, sr, fr, se_red, use_sum, H, W = cfg
    gen = torch.Generator().manual_seed(seed)
    sd = random_state_dict(authors_param_shapes(C, sr, fr, se_red), gen)
    layer = VicinityVisionAttention(C, heads, sr_ratio=sr, fr_ratio=fr, se_reduction=se_red,
                                    use_sum=use_sum, **kwargs).double()
    layer.load_state_dict(sd, strict=True)
    x = torch.randn(3, H * W, C, generator=gen, dtype=torch.float64)
    return layer, sd, x
