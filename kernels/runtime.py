"""What every operation's launchers share: interpreter detection, the specialisation policy of the
kernels' runtime arguments, and the dot precision handed to kernels (with its GPU emulation).

Dot numerics under the interpreter: the Triton interpreter computes ``tl.dot`` exactly as asked, so
an fp32 dot there would hide what a tensor core does to its operands. By default the launchers ask
the kernels (``kernels/common.py`` ``mma``) to *emulate* the GPU dot: round both operands as the GPU
would (fp16 / bf16 conversion, TF32 = 10 mantissa bits, TF32x3 as its big + small split), then an
exact fp32 dot with fp32 accumulation. ``VICINITY_ATTN_EXACT_DOTS=1`` (read at every launch) opts out:
every dot then runs in exact fp32 (fp64 for fp64 inputs), as the interpreter computes it unemulated.
"""
from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

EXACT_DOTS_ENV = "VICINITY_ATTN_EXACT_DOTS"

# Runtime integer arguments that must never specialise: sequence lengths, grid sizes, counts derived
# from them, batch x heads. Triton would otherwise compile a new variant whenever one of them changes
# divisibility by 16 (or equals 1), i.e. per resolution. Every other integer argument specialises as a
# real launch infers it: head dims D / DV and the strides get Triton's "divisible by 16" and "== 1"
# facts, which is what lets the compiler prove the column masks uniform and vectorise the loads and
# stores (128-bit, async copies) instead of issuing scalar 16-bit accesses.
RUNTIME_INTS = frozenset({"H", "N", "n_prefix", "grid_0", "grid_1", "grid_2", "blocks_per_chunk", "n_rows", "n_chunks",
                          "n_slots", "slot0_len", "frame_len", "blocks_per_slot", "n_elems"})


def launch_jit(fn):
    """``triton.jit`` with the package's specialisation policy: the arguments of ``fn`` named in
    RUNTIME_INTS are ``do_not_specialize``; everything else specialises as Triton infers it."""
    names = [n for n in inspect.signature(fn).parameters if n in RUNTIME_INTS]
    return triton.jit(do_not_specialize=names)(fn)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints: ``triton.cdiv`` without its constexpr wrapper (triton 3.9 made it a
    ``constexpr_function``, which costs microseconds per host call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): ``triton.next_power_of_2`` for host code."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# Read once, as Triton does: it picks the interpreter or the compiler when it is imported.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """True when kernels run in the Triton interpreter (TRITON_INTERPRET=1 when the package was imported)."""
    return _INTERPRET


def target_arch() -> int | None:
    """The compute capability (80 for sm_80, 90 for sm_90a, ...) of the GPU that launches go to: Triton's
    active driver's target, i.e. the current CUDA device (the launch capture's stand-in while the
    compile gate captures for an arch). None under the interpreter or where no driver is active (the
    GPU model's traffic run): callers then take the newest arch's plan. Looked up once per (driver,
    device): a device's capability does not change."""
    if interpreting():
        return None
    try:
        active = triton.runtime.driver.active
        key = (active, active.get_current_device())
    except RuntimeError:   # no GPU driver (a CPU-only machine)
        return None
    arch = _ARCHS.get(key, _UNKNOWN)
    if arch is _UNKNOWN:
        if len(_ARCHS) >= 64:       # the compile gate's launch capture makes a driver per capture
            _ARCHS.clear()
        target = active.get_current_target()
        arch = _ARCHS[key] = target.arch if isinstance(target.arch, int) else None
    return arch


_ARCHS: dict = {}    # (driver, device) -> arch; holds the driver, so its id is never reused while cached
_UNKNOWN = object()
PLAN_CACHE_SIZE = 4096


def plan_cache(fn):
    """Memoises a launch-planning function (configs, tiles, chunk plans, precisions): its result depends
    only on its hashable arguments and on where launches go (the interpreter or not, the target arch,
    exact dots), so an eager call plans once per shape instead of at every launch. The target is read
    through ``fn``'s own module (what its body calls: a test may patch it there). At most
    PLAN_CACHE_SIZE entries (then it starts afresh: shapes, not data, fill it)."""
    cache: dict = {}
    module = fn.__globals__

    @functools.wraps(fn)
    def cached(*args, **kwargs):
        interpret = module.get("interpreting", interpreting)()
        key = (args, tuple(kwargs.items()), interpret, module.get("target_arch", target_arch)(),
               interpret and exact_dots())
        try:
            return cache[key]
        except KeyError:
            pass
        except TypeError:       # an unhashable argument (a symbolic size while tracing): plan afresh
            return fn(*args, **kwargs)
        if len(cache) >= PLAN_CACHE_SIZE:
            cache.clear()
        result = cache[key] = fn(*args, **kwargs)
        return result

    cached.cache_clear = cache.clear
    _PLAN_CACHES.append(cache)
    return cached


_PLAN_CACHES: list[dict] = []


def clear_plan_caches() -> None:
    """Forget every memoised launch plan (after changing what plans depend on: a tuning constant in a test)."""
    for cache in _PLAN_CACHES:
        cache.clear()


def _squeeze_scalars(interpreter) -> None:
    """Lets the kernels' loops with runtime bounds (``range(0, blocks_per_chunk)``, ``range(0, D, ...)``)
    run in the interpreter of triton < 3.7 with numpy 2.

    That interpreter holds every scalar as a 1-element array and converts it for ``range`` with
    ``int(array)``, which numpy 2 refuses ("only 0-dimensional arrays can be converted to Python
    scalars"); triton 3.7+ squeezes the array first. Same fix, applied to the older interpreter only.
    """
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "squeezes_scalars", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor.squeezes_scalars = True
    interpreter._patch_lang_tensor = patch_lang_tensor


def _unsigned_all_ones(interpreter) -> None:
    """Lets ``~x`` of an unsigned integer (the k-NN selection pass's order-preserving score keys) run in
    the interpreter of triton < 3.7 with numpy 2.

    That interpreter builds the all-ones operand of ``~`` as ``np.full(1, -1, dtype)``, which numpy 2
    refuses for unsigned dtypes ("Python integer -1 out of bounds for uint32"); triton 3.7+ uses the
    dtype's maximum (the same bits). Same fix, applied to the older interpreter only.
    """
    builder = getattr(interpreter, "InterpreterBuilder", None)
    original = getattr(builder, "get_all_ones_value", None)
    if original is None or getattr(original, "unsigned_all_ones", False):
        return

    def get_all_ones_value(self, type):
        np_type = interpreter._get_np_dtype(type)
        if np.issubdtype(np_type, np.unsignedinteger):
            return interpreter.TensorHandle(np.full(1, np.iinfo(np_type).max, dtype=np_type), type.scalar)
        return original(self, type)

    get_all_ones_value.unsigned_all_ones = True
    builder.get_all_ones_value = get_all_ones_value


def _patch_triton36_interpreter() -> None:
    """Fixes of the interpreter of triton < 3.7 (the version the lent GPU machines ship is 3.6) that
    triton 3.7+ made itself: :func:`_squeeze_scalars`, :func:`_unsigned_all_ones`."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    version = tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())
    if version >= (3, 7):
        return
    _squeeze_scalars(interpreter)
    _unsigned_all_ones(interpreter)


if interpreting():
    _patch_triton36_interpreter()


def exact_dots() -> bool:
    """True when VICINITY_ATTN_EXACT_DOTS opts the interpreter out of GPU dot emulation."""
    return os.environ.get(EXACT_DOTS_ENV, "0") not in ("", "0")


# PREC values the kernels' ``mma`` understands: a GPU input precision runs ``tl.dot`` as asked; an
# "emulate_*" value (interpreter only) rounds the operands as that GPU dot would, then dots in fp32.
GPU_PRECISIONS = ("ieee", "tf32", "tf32x3")
EMULATED = {(tl.float16, "tf32"): "emulate_fp16", (tl.bfloat16, "tf32"): "emulate_bf16",
            (tl.float32, "tf32"): "emulate_tf32", (tl.float32, "tf32x3"): "emulate_tf32x3"}


@dataclass(frozen=True)
class Precision:
    """Dtypes handed to the kernels as constexprs."""

    acc: tl.dtype    # states, reductions, position features
    dot: tl.dtype    # tl.dot operand dtype
    prec: str        # tl.dot input_precision, or an "emulate_*" mode (see EMULATED)

    def constexprs(self) -> dict:
        return dict(ACC=self.acc, DOT=self.dot, PREC=self.prec)

    def emulated(self) -> Precision:
        """The interpreter's stand-in for this GPU precision: fp32 operands rounded as the GPU would."""
        mode = EMULATED.get((self.dot, self.prec))
        return self if mode is None else Precision(self.acc, tl.float32, mode)


TORCH_TO_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
               torch.float64: tl.float64}


def gpu_precision(dtype: torch.dtype, dot: torch.dtype | None = None) -> Precision:
    """The GPU dot for inputs of ``dtype`` with operands in ``dot`` (default: the input dtype).

    fp16 / bf16 operands: tensor-core dots, fp32 accumulation. fp32 operands: "tf32x3" for fp32 inputs
    (three TF32 products, about fp32-accurate; plain TF32 would lose ~3 digits), plain "tf32" when a
    16-bit input's dot is deliberately widened to fp32 operands for their range (same 10-bit mantissa
    as fp16, fp32 exponent). fp64: fp64 everywhere.
    """
    if dtype == torch.float64:
        return Precision(tl.float64, tl.float64, "ieee")
    dot = dtype if dot is None else dot
    if dot == torch.float32:
        return Precision(tl.float32, tl.float32, "tf32x3" if dtype == torch.float32 else "tf32")
    return Precision(tl.float32, TORCH_TO_TL[dot], "tf32")


def pick_precision(dtype: torch.dtype, dot: torch.dtype | None = None,
                   interpret: bool | None = None) -> Precision:
    """``gpu_precision`` on a GPU; under the interpreter its emulation, or exact fp32 dots when
    VICINITY_ATTN_EXACT_DOTS is set."""
    prec = gpu_precision(dtype, dot)
    interpret = interpreting() if interpret is None else interpret
    if not interpret:
        return prec
    if exact_dots():
        return Precision(prec.acc, prec.acc, "ieee")
    return prec.emulated()


# The SM count that plans take where no GPU is asked (the interpreter, CPU tensors, the compile gate):
# an H100 SXM's.
DEFAULT_SM_COUNT = 132
_SM_COUNTS: dict = {}    # torch.device -> multiprocessor count


def sm_count(device: torch.device) -> int:
    """The number of SMs of ``device`` (a CUDA device: its multiprocessor count, looked up once per
    device); DEFAULT_SM_COUNT under the interpreter and for any other device. Launch plans that follow
    it depend on the device model, never on timing."""
    if interpreting() or device.type != "cuda":
        return DEFAULT_SM_COUNT
    count = _SM_COUNTS.get(device)
    if count is None:
        count = _SM_COUNTS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return count


# Counters of the last-program elections (the state passes' chunk reduction), per (device, stream).
_COUNTERS: dict = {}
COUNTERS_MIN = 1024


def election_counters(device: torch.device, n: int) -> torch.Tensor:
    """int32 [>= n] zeros on ``device``, one counter per program group of a last-program election.

    Every launch that uses them leaves them at zero again (the elected program re-arms its group's
    counter), so a kept buffer needs no memset per call: it is zeroed once when made and kept per
    (device, stream), grown on demand (a launch on the same stream is ordered after the previous user,
    so the old buffer may go). Two streams never share one: their launches may overlap, and interleaved
    counts would elect the wrong program. While a stream is being captured into a CUDA graph (torch.cuda.graph,
    torch.compile's CUDA graphs) the buffer is the graph's own, zeroed by a memset node inside the graph
    at every replay: a kept buffer's zeros at replay time would depend on what ran before."""
    if device.type != "cuda":
        stream = None
    else:
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(n, dtype=torch.int32, device=device)
        stream = torch.cuda.current_stream(device).cuda_stream
    key = (device, stream)
    counters = _COUNTERS.get(key)
    if counters is None or counters.numel() < n:
        counters = _COUNTERS[key] = torch.zeros(max(COUNTERS_MIN, next_power_of_2(n)), dtype=torch.int32,
                                                device=device)
    return counters
