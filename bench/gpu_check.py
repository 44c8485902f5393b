"""The one command to run on a lent GPU: device facts, correctness on the device, per-kernel times beside
the GPU model, timings against SDPA / FlashAttention, then the test suite with whatever time is left.

    python -m bench.gpu_check --out bench/results/gpu-check-h100.json     # on a CUDA machine, from the checkout
    python -m bench.gpu_check --dry-run --out /tmp/gpu-check-dry.json     # no GPU: every stage, tiny, interpreted

Runs from a bare checkout (nothing to install: ``vicinity_attn/_checkout.py`` maps ``kernels/``); optional
packages (pytest, flash_attn, cuDNN attention, timm) degrade to a recorded reason, never to a failure.

It keeps a global deadline itself (``--deadline``, default 400 s: the lent machine allows 7 minutes with its
cold Triton compiles): a stage starts only with its minimum time left, every stage checks the clock between
its items, and a timer interrupts whatever runs at the deadline plus a short grace. The JSON (``--out``) and a
short text log (``--log``, default the JSON's path with ``.txt``) are rewritten after EVERY stage (and after
every item of the long ones), so a kill loses at most the item in flight. Stages, in order of value:

1. ``device``: name, SMs, clocks, memory, L2, driver, versions; whether the GPU model describes this card
   (H100 SXM, H200) and which chip model the per-kernel comparison uses.
2. ``correctness``: forward and every gradient of the triton backend against the torch backend on the device
   (float64 torch as the reference; the low-precision torch computation as "plain", by the tolerance rule),
   at the timed shapes and at small ones (sum / product, prefix tokens, cross grid, clamp, floor, varlen,
   k-NN with every row keeping exactly topk keys), the sm_90 paths each named, and two runs bitwise equal.
3. ``kernels``: per-kernel GPU times (torch.profiler; CUDA events if it fails) beside the model's per-kernel
   rows (bench/results/gpu-model.json), with the ratio measured / model.
4. ``timings``: forward, backward, forward + backward, eager and CUDA-graph replayed, of the triton backend
   and of SDPA's flash and cuDNN backends (and FlashAttention-2 when it imports), with peak memory.
5. ``backbone``: a VVT-tiny training step at two resolutions (vicinity against softmax), if time remains.
6. ``suite``: the device test suite (``TRITON_INTERPRET=0 pytest``, device modules first) in a subprocess
   whose timeout is the time left.

``--dry-run`` runs every stage on the CPU at tiny shapes through the Triton interpreter (under a minute):
the test of the stages' code. Its numbers are NOT GPU measurements and are labelled so.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DEFAULT = os.path.join(ROOT, "bench", "results", "gpu-check.json")
MODEL_DEFAULT = os.path.join(ROOT, "bench", "results", "gpu-model.json")
DEFAULT_DEADLINE_S = 400.0
HARD_GRACE_S = 15.0          # the timer fires this long after the deadline: whatever runs is interrupted
STAGES = ("device", "correctness", "kernels", "timings", "backbone", "suite")
# Seconds a stage needs left to start (real run; the dry run scales them down).
STAGE_MIN_S = dict(device=0, correctness=20, kernels=15, timings=20, backbone=60, suite=25)
NO_CUDA = ("python -m bench.gpu_check needs a CUDA GPU, and torch {torch} sees none: nothing was run or measured. "
           "(--dry-run runs every stage on the CPU through the Triton interpreter.)")
# Absolute floor of the tolerance rule per dtype, relative to the reference's magnitude. fp32: 1e-5 (the tests'
# 1e-6 holds at their small shapes; at 50k tokens the sums' order alone differs by more).
FLOOR = {"fp32": 1e-5, "fp16": 1e-3, "bf16": 8e-3}


class DeadlineExceeded(BaseException):
    """Raised by the hard timer: not an Exception, so that no item's error handler swallows it."""


# ----------------------------------------------------------------------------------------------------
# Budget, report

class Budget:
    """The global deadline: seconds since the start, seconds left, and whether something of a given length fits."""

    def __init__(self, deadline_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.deadline_s, self.clock, self.start = float(deadline_s), clock, clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return self.deadline_s - self.elapsed()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


class Report:
    """The JSON result and its text log, rewritten whole (atomically) on every :meth:`write`."""

    def __init__(self, json_path: str, log_path: str, head: dict) -> None:
        self.json_path, self.log_path = json_path, log_path
        self.data = dict(head, stages={})
        self.lines: list[str] = []

    def log(self, line: str, budget: Budget | None = None) -> None:
        stamp = f"[{budget.elapsed():6.1f} s] " if budget else ""
        self.lines.append(stamp + line)
        print(stamp + line, flush=True)

    def write(self) -> None:
        for path, text in ((self.json_path, json.dumps(self.data, indent=1, default=str)),
                           (self.log_path, "\n".join(self.lines) + "\n")):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, path)


@contextlib.contextmanager
def hard_deadline(seconds: float):
    """SIGALRM after ``seconds`` raises :class:`DeadlineExceeded` in the main thread (no-op elsewhere)."""
    usable = hasattr(signal, "setitimer") and seconds > 0
    try:
        import threading
        usable = usable and threading.current_thread() is threading.main_thread()
    except ImportError:
        pass
    if not usable:
        yield
        return

    def fire(signum, frame):
        raise DeadlineExceeded(f"hard deadline ({seconds:.0f} s) reached")
    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------------------------------
# Shapes

def timed_shapes(dry: bool) -> dict:
    """name -> shape dict (op, dtype, batch, heads, grid, d, dv[, topk]): the GPU model's shapes, or tiny
    stand-ins under the same names in a dry run (so that the model's rows are matched the same way)."""
    from .gpu_model import SHAPES
    out = {}
    for name, s in SHAPES.items():
        op = s.get("op", "vicinity")
        shape = dict(op="vicinity" if op == "vicinity_causal" else op, dtype=s["dtype"], batch=s["batch"],
                     heads=s["heads"], grid=tuple(s["grid"]), d=s["d"], dv=s["dv"], **dict(s.get("extra", ())))
        if op == "vicinity_causal":
            shape["causal"] = "frames"
        if dry:
            shape.update(batch=1, heads=1, d=16, dv=16)
            shape.update(grid=(16,), topk=5) if shape["op"] == "knn" else shape.update(grid=(2, 3))
        out[name] = shape
    return out


def small_cases(dry: bool) -> list[dict]:
    """The small correctness cases: every feature of the op once, in fp32 and bf16 (the first and k-NN also
    fp16); in a dry run each feature once, in one dtype."""
    g2, g3 = ((2, 3), (2, 2, 2)) if dry else ((13, 17), (5, 6, 7))
    cases = [
        dict(name="sum 2d", op="vicinity", grid=g2, d=32, dv=32),
        dict(name="product 3d + 1 prefix", op="vicinity", grid=g3, d=16, dv=16, variant="product", prefix=1),
        dict(name="cross grid sum + 2 prefix", op="vicinity", grid=g2, kv_grid=tuple(max(1, x // 2) for x in g2),
             d=48, dv=48, prefix=2),
        dict(name="clamp (VVT clip)", op="vicinity", grid=g2, d=32, dv=32, clamp=(1e-4, 1e4)),
        dict(name="floor (L2ViT)", op="vicinity", grid=g2, d=32, dv=32, variant="none", den_floor=100.0, eps=0.0),
        dict(name="varlen", op="varlen", grids=[(2, 2), (1, 3)] if dry else [(14, 14), (7, 9), (28, 28)], d=32, dv=32,
             prefix=1),
        dict(name="k-NN", op="knn", grid=(20,) if dry else (300,), d=32, dv=32, topk=7 if dry else 100),
        dict(name="frame-causal 3d + 1 prefix", op="vicinity", grid=g3, d=32, dv=32, prefix=1, causal="frames"),
    ]
    if dry:
        return [dict(c, dtype=("fp32", "bf16", "bf16", "bf16", "bf16", "fp32", "fp16", "bf16")[i], batch=1, heads=1,
                     d=16, dv=16) for i, c in enumerate(cases)]
    out = []
    for i, c in enumerate(cases):
        for dtype in ("fp32", "bf16") + (("fp16",) if i in (0, 6) else ()):
            out.append(dict(c, dtype=dtype, batch=2, heads=2))
    return out


def _torch_dtype(name: str):
    import torch
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}[name]


# ----------------------------------------------------------------------------------------------------
# Stage 1: device facts

# What the GPU model's chip descriptions are, by card: (regex on the device name, SMs, chip model used).
CARDS = (
    (r"H100.*(SXM|HBM3)|H100 80GB HBM3", 132, "H100 SXM"),
    (r"H200", 132, "H200"),
)


def chip_models() -> dict:
    """The chip descriptions the comparison can use: the model's own H100 SXM, and the H200 (the same SMs,
    clocks and tensor cores with 4.8 TB/s HBM3e)."""
    from .gpu_model import H100_SXM
    return {"H100 SXM": H100_SXM, "H200": dict(H100_SXM, name="H200 (model)", hbm_bytes_per_s=4.8e12)}


def describe_card(name: str, sms: int | None) -> dict:
    """Whether the GPU model describes the card called ``name`` with ``sms`` SMs, and which chip model the
    per-kernel comparison uses (the H100 SXM one where none describes it: ratios then say how far that is)."""
    for pattern, want_sms, chip in CARDS:
        if re.search(pattern, name or "") and (sms is None or sms == want_sms):
            return dict(described=True, chip=chip, note=f"the model describes this card ({chip})")
    return dict(described=False, chip="H100 SXM",
                note=f"the model does NOT describe {name!r} ({sms} SMs): the comparison uses the H100 SXM model, "
                     "so the ratios include the difference between the cards")


def _nvidia_smi() -> dict:
    fields = "name,driver_version,clocks.max.sm,clocks.max.mem,clocks.sm,power.limit,memory.total,pcie.link.gen.current"
    try:
        proc = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=15)
    except (OSError, subprocess.SubprocessError) as exc:
        return dict(error=f"nvidia-smi: {type(exc).__name__}: {exc}"[:200])
    if proc.returncode != 0:
        return dict(error=f"nvidia-smi exit {proc.returncode}: {proc.stderr.strip()[:200]}")
    first = proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else ""
    return dict(zip(fields.split(","), (x.strip() for x in first.split(","))))


def stage_device(ctx: dict) -> dict:
    import torch

    from .env import environment
    facts = dict(environment=environment(ctx["device"]))
    if ctx["device"].type == "cuda":
        p = torch.cuda.get_device_properties(ctx["device"])
        facts.update(name=p.name, sms=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                     memory_bytes=p.total_memory, l2_bytes=getattr(p, "L2_cache_size", None),
                     clock_khz=getattr(p, "clock_rate", None), memory_clock_khz=getattr(p, "memory_clock_rate", None),
                     memory_bus_bits=getattr(p, "memory_bus_width", None), device_count=torch.cuda.device_count(),
                     cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                     nvidia_smi=_nvidia_smi())
    else:
        facts.update(name=f"CPU (dry run): {facts['environment']['cpu_model']}", sms=None)
    facts["model"] = describe_card(facts["name"], facts.get("sms"))
    ctx["chip"] = chip_models()[facts["model"]["chip"]]
    facts["model"]["chip_model"] = ctx["chip"]
    ctx["report"].log(f"device: {facts['name']}, {facts.get('sms')} SMs; {facts['model']['note']}", ctx["budget"])
    return facts


# ----------------------------------------------------------------------------------------------------
# Launch recorder: which kernels ran, with which token tiles (and, without a profiler, their times)

class LaunchRecorder:
    """Records every Triton launch (``JITFunction.run`` / the interpreter's ``run``): kernel name and its
    integer BLOCK_* constexprs; with ``timed``, also each launch's time (CUDA events on a GPU, wall time in
    the interpreter)."""

    def __init__(self, timed: bool = False) -> None:
        self.timed, self.launches, self._saved = timed, [], []

    def __enter__(self) -> LaunchRecorder:
        from triton.runtime import interpreter, jit
        for cls in {jit.JITFunction, interpreter.InterpretedFunction}:
            original = cls.__dict__["run"]
            self._saved.append((cls, original))
            cls.run = self._wrap(original)
        return self

    def __exit__(self, *exc) -> None:
        for cls, original in self._saved:
            cls.run = original
        self._saved.clear()

    def _wrap(self, original):
        recorder = self

        def run(fn_self, *args, **kwargs):
            if kwargs.get("warmup"):
                return original(fn_self, *args, **kwargs)
            name = getattr(getattr(fn_self, "fn", None), "__name__", type(fn_self).__name__)
            blocks = {k: v for k, v in kwargs.items() if k.startswith("BLOCK") and isinstance(v, int)}
            entry = dict(kernel=name, blocks=blocks)
            if kwargs.get("CHUNKED"):        # a state pass that reduces its chunks (the last program sums)
                entry["chunked"] = True
            if not recorder.timed:
                recorder.launches.append(entry)
                return original(fn_self, *args, **kwargs)
            import torch
            tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if tensor is not None and tensor.is_cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = original(fn_self, *args, **kwargs)
                end.record()
                end.synchronize()
                entry["us"] = start.elapsed_time(end) * 1e3
            else:
                t0 = time.perf_counter()
                out = original(fn_self, *args, **kwargs)
                entry["us"] = (time.perf_counter() - t0) * 1e6
            recorder.launches.append(entry)
            return out
        return run

    def kernels(self) -> list[str]:
        return sorted({x["kernel"] for x in self.launches})

    def max_block(self, key: str = "BLOCK_N") -> int | None:
        values = [x["blocks"][key] for x in self.launches if key in x["blocks"]]
        return max(values) if values else None


# ----------------------------------------------------------------------------------------------------
# Stage 2: correctness

def rel_err(x, ref) -> float:
    ref = ref.double()
    scale = ref.abs().max().item()
    return float("inf") if scale == 0 else (x.double() - ref).abs().max().item() / scale


def rule(names, got, ref, plain, dtype: str) -> dict:
    """The tolerance rule per tensor: error against the float64 reference at most 2x the plain computation's
    in the same dtype, plus FLOOR[dtype]."""
    out = {}
    for name, g, r, p in zip(names, got, ref, plain):
        err, perr = rel_err(g, r), rel_err(p, r)
        allowed = 2 * perr + FLOOR[dtype]
        out[name] = dict(err=float(f"{err:.3e}"), plain_err=float(f"{perr:.3e}"), allowed=float(f"{allowed:.3e}"),
                         ok=bool(err <= allowed))
    return out


def _inputs(shape: dict, device, dtype, gen):
    import torch
    B, H, D, Dv = shape["batch"], shape["heads"], shape["d"], shape["dv"]
    prefix = shape.get("prefix", 0)
    nq = prefix + math.prod(shape["grid"])
    nk = prefix + math.prod(shape.get("kv_grid") or shape["grid"])

    def one(n, d):
        return torch.randn(B, H, n, d, generator=gen, device=device, dtype=torch.float32).to(dtype)
    return one(nq, D), one(nk, D), one(nk, Dv), one(nq, Dv)


def _run_with_grads(fn, tensors, do):
    import torch
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, do.to(out.dtype))]


def vicinity_call(shape: dict, backend: str):
    from vicinity_attn import vicinity_attention
    kw = dict(grid=shape["grid"], kv_grid=shape.get("kv_grid"), variant=shape.get("variant", "sum"),
              num_prefix_tokens=shape.get("prefix", 0), den_floor=shape.get("den_floor", 0.0),
              eps=shape.get("eps", 1e-4), clamp=shape.get("clamp"), causal=shape.get("causal"))
    return lambda q, k, v: vicinity_attention(q, k, v, backend=backend, **kw)


def knn_call(shape: dict, backend: str):
    from vicinity_attn import knn_attention
    return lambda q, k, v: knn_attention(q, k, v, shape["topk"], backend=backend)


def varlen_call(shape: dict, backend: str):
    """q, k, v as [B, H, N, D] views of one packed sequence (B = 1, N = the packed tokens)."""
    import torch

    from vicinity_attn import vicinity_attention_varlen
    prefix = shape.get("prefix", 0)
    lens = [prefix + math.prod(g) for g in shape["grids"]]

    def fn(q, k, v):
        cu = torch.tensor([0, *[sum(lens[:i + 1]) for i in range(len(lens))]], dtype=torch.int32, device=q.device)
        packed = [t[0].transpose(0, 1) for t in (q, k, v)]       # [N, H, D]
        out = vicinity_attention_varlen(*packed, cu, cu, shape["grids"], backend=backend, num_prefix_tokens=prefix)
        return out.transpose(0, 1).unsqueeze(0)
    return fn, sum(lens)


def sm90_paths(shape: dict, dtype, launches: LaunchRecorder) -> dict:
    """The sm_90 paths a vicinity call took, each by name: the fused query pass, 128-token tiles, bf16 state
    copies (the forward's S saved in bf16 for the backward's dq dots), the chunk reduction (inside a chunked
    state pass)."""
    import torch

    from vicinity_attn.vicinity.triton_backend import saved_state_dtype
    ref = torch.empty(1, 1, 1, shape["d"], dtype=dtype, device="meta")
    ref_v = torch.empty(1, 1, 1, shape["dv"], dtype=dtype, device="meta")
    names = launches.kernels()
    return dict(fused_query_pass="query_pass_kernel" in names, tiles_128=(launches.max_block() or 0) >= 128,
                bf16_state_copies=saved_state_dtype(ref, ref_v, shape.get("clamp")) == torch.bfloat16,
                chunk_reduction=any(e.get("chunked") for e in launches.launches), kernels=names,
                max_block_n=launches.max_block())


def check_case(shape: dict, device) -> dict:
    """One correctness item: the triton backend against the torch backend (float64 reference, and the plain
    computation in the case's dtype), forward and dq / dk / dv, four times (bitwise equal: the fourth call replays
    the recorded launches of the third, kernels/replay.py); k-NN also the kept-key count."""
    import torch
    dtype_name = shape["dtype"]
    dtype = _torch_dtype(dtype_name)
    gen = torch.Generator(device=device).manual_seed(0)
    op = shape["op"]
    if op == "varlen":
        fn_t, n = varlen_call(shape, "triton")
        fn_r, _ = varlen_call(shape, "torch")
        shape = dict(shape, batch=1, grid=(n,), kv_grid=None, prefix=0)
    elif op == "knn":
        fn_t, fn_r = knn_call(shape, "triton"), knn_call(shape, "torch")
    else:
        fn_t, fn_r = vicinity_call(shape, "triton"), vicinity_call(shape, "torch")
    q, k, v, do = _inputs(shape, device, dtype, gen)
    with LaunchRecorder() as launches:
        got = _run_with_grads(fn_t, (q, k, v), do)
    # Three more calls: the launchers, the launchers while recorded, a replay (kernels/replay.py).
    again = [_run_with_grads(fn_t, (q, k, v), do) for _ in range(3)]
    ref = _run_with_grads(fn_r, [t.double() for t in (q, k, v)], do.double())
    plain = ref if dtype == torch.float64 else _run_with_grads(fn_r, (q, k, v), do)
    result = dict(tensors=rule(("out", "dq", "dk", "dv"), got, ref, plain, dtype_name),
                  deterministic=all(torch.equal(a, b) for run in again for a, b in zip(got, run)),
                  finite=all(bool(torch.isfinite(t).all()) for t in got))
    if op == "knn":
        result["kept"] = knn_kept(q, k, v, shape["topk"])
    elif op == "vicinity":
        result["paths"] = sm90_paths(shape, dtype, launches)
    else:
        result["kernels"] = launches.kernels()
    result["ok"] = bool(all(t["ok"] for t in result["tensors"].values()) and result["deterministic"]
                        and result["finite"] and result.get("kept", {}).get("ok", True))
    return result


def knn_kept(q, k, v, topk: int) -> dict:
    """How many keys each row keeps (scores >= the kernel's tau). The scores recomputed here in fp32 differ from
    the kernel's by the sums' rounding (tol: 1e-5 of the row's largest |score|), so a row passes when the keys
    clearly above tau are at most topk and those within tol of it make up the rest: exactly topk up to rounding.
    ``near_ties``: rows with more than one key within tol of tau (where rounding could change the choice)."""
    import torch

    from vicinity_attn.knn import triton_backend
    scale = q.shape[-1] ** -0.5
    with torch.no_grad():
        _, tau, _ = triton_backend.forward(q, k, v, topk, scale)
        s = scale * (q.float() @ k.float().transpose(-1, -2))
        t = tau.float()[..., None]
        tol = 1e-5 * s.abs().amax(-1, keepdim=True)
        above = (s >= t + tol).sum(-1)
        near = ((s - t).abs() < tol).sum(-1)
        ok = (above <= topk) & (above + near >= topk)
        count = (s >= t).sum(-1)
    return dict(rows=int(ok.numel()), rows_ok=int(ok.sum()), exact_recomputed=int((count == topk).sum()),
                near_ties=int((near > 1).sum()), bad=int((~ok).sum()), min_kept=int(count.min()),
                max_kept=int(count.max()), ok=bool(ok.all()))


def stage_correctness(ctx: dict) -> dict:
    items = [dict(s, name=f"({n}) timed shape") for n, s in ctx["shapes"].items()] + small_cases(ctx["dry"])
    return _run_items(ctx, "correctness", items, check_case, per_item_s=5)


def _run_items(ctx: dict, stage: str, items: list[dict], fn, per_item_s: float) -> dict:
    """Runs ``fn(item, device)`` per item while the budget allows, recording each result (or its error) and
    rewriting the report after each."""
    report, budget = ctx["report"], ctx["budget"]
    entry = report.data["stages"][stage]
    entry["items"] = results = []
    for item in items:
        label = f"{item['name']} {item.get('dtype', '')}".strip()
        if not budget.allows(per_item_s):
            results.append(dict(item=label, skipped="deadline"))
            continue
        t0 = time.perf_counter()
        try:
            res = fn(item, ctx["device"])
        except Exception as exc:  # noqa: BLE001 - one failing item is a result, not the end of the check
            res = dict(ok=False, error=f"{type(exc).__name__}: {exc}"[:400])
        res = dict(item=label, seconds=round(time.perf_counter() - t0, 2), **res)
        results.append(res)
        report.log(f"{stage}: {label}: {_brief(res)}", budget)
        report.write()
    ran = [r for r in results if "skipped" not in r]
    entry.update(ran=len(ran), skipped=len(results) - len(ran),
                 failed=[r["item"] for r in ran if not r.get("ok", True)])
    return dict(status="ok" if not entry["failed"] else "failed")


def _brief(res: dict) -> str:
    if "error" in res:
        return "ERROR " + res["error"][:160]
    parts = ["ok" if res.get("ok", True) else "FAILED"]
    if "tensors" in res:
        parts.append(" ".join(f"{k} {v['err']:.1e}/{v['allowed']:.1e}" for k, v in res["tensors"].items()))
    if "kept" in res:
        parts.append(f"rows keeping topk {res['kept']['rows_ok']}/{res['kept']['rows']} "
                     f"(near ties {res['kept']['near_ties']})")
    if "paths" in res:
        parts.append(" ".join(k for k, v in res["paths"].items() if v is True) or "no sm_90 path")
    if res.get("deterministic") is False:
        parts.append("NOT DETERMINISTIC")
    if res.get("total_measured_us"):
        dry = res.get("method", "").startswith("DRY RUN")
        timed = "DRY RUN interpreter time, NOT a GPU time" if dry else "measured"
        floor = res.get("total_floor_ratio")
        parts.append(f"{res['total_measured_us']:.1f} us {timed}: x{res['total_ratio']} the model's "
                     f"{res['total_modelled_us']:.1f}, x{res['total_old_ratio']} the old model's"
                     + ("" if floor is None else f", x{floor} the stall-free floor's"))
    return f"{', '.join(parts)} ({res.get('seconds', 0):.1f} s)"


# ----------------------------------------------------------------------------------------------------
# Stage 3: per-kernel times beside the model

def model_rows(model: dict | None, name: str, chip: dict) -> list[dict]:
    """The model's per-kernel rows of shape ``name`` (forward + backward), both models: ``modelled_us`` the
    latency-aware one (its own H100 SXM or H200 figure), ``old_modelled_us`` the bandwidth / issue one,
    retimed for ``chip`` where it is not the model's own (:func:`bench.gpu_model.kernel_time`'s old formula),
    and ``stall_free_us``, the latency-aware model's stall-free floor (:func:`bench.gpu_model.stall_free_us`:
    what these instructions would take with every stall hidden), where the model has it."""
    from .gpu_model import stall_free_us
    entry = (model or {}).get("shapes", {}).get(name, {}).get("fwdbwd", {})
    h200 = chip.get("hbm_bytes_per_s", 0) > 4e12
    rows = []
    for k in entry.get("kernels", []):
        t = dict(hbm_us=k["hbm_bytes"] / (chip["hbm_efficiency"] * chip["hbm_bytes_per_s"]) * 1e6,
                 l2_us=k["l2_bytes"] / chip["l2_bytes_per_s"] * 1e6,
                 tensor_us=k["tensor_flops"] / chip["tensor_flops_per_s"] * 1e6, issue_us=k["issue_us"])
        old = max(t.values()) + chip["launch_overhead_s"] * 1e6
        new = k.get("h200_modelled_us" if h200 else "modelled_us") if "old_modelled_us" in k else None
        latency = k.get("latency_h200" if h200 else "latency")
        rows.append(dict(kernel=k["kernel"], role=k.get("role"), modelled_us=old if new is None else new,
                         old_modelled_us=old,
                         stall_free_us=None if latency is None else stall_free_us(dict(latency=latency), chip=chip)))
    return rows


def per_kernel(measured: dict[str, tuple[float, int]], rows: list[dict], calls: int) -> list[dict]:
    """Measured total microseconds and launch count per kernel name (over ``calls`` calls) beside the model's
    rows of the same kernel (summed per name): per call, with ratio measured / model for both models, and
    measured / the stall-free floor (``floor_ratio``; None unless every row of the kernel has one)."""
    by_name: dict[str, dict] = {}
    for r in rows:
        e = by_name.setdefault(r["kernel"], dict(kernel=r["kernel"], roles=[], modelled_us=0.0, old_modelled_us=0.0,
                                                  stall_free_us=0.0, modelled_launches=0))
        e["roles"].append(r["role"])
        e["modelled_us"] += r["modelled_us"]
        e["old_modelled_us"] += r.get("old_modelled_us", r["modelled_us"])
        floor = r.get("stall_free_us")
        e["stall_free_us"] = None if floor is None or e["stall_free_us"] is None else e["stall_free_us"] + floor
        e["modelled_launches"] += 1
    out = []
    for name in list(by_name) + sorted(n for n in measured if n not in by_name):
        e = by_name.get(name, dict(kernel=name, roles=[], modelled_us=None, old_modelled_us=None, stall_free_us=None,
                                   modelled_launches=0))
        us, count = measured.get(name, (None, 0))
        e["measured_us"] = None if us is None else round(us / calls, 3)
        e["launches_per_call"] = count / calls
        for key, ratio in (("modelled_us", "ratio"), ("old_modelled_us", "old_ratio"),
                           ("stall_free_us", "floor_ratio")):
            e[ratio] = (round(e["measured_us"] / e[key], 2) if e["measured_us"] is not None and e[key] else None)
            if e[key] is not None:
                e[key] = round(e[key], 3)
        out.append(e)
    return out


def _profile_kernels(call, calls: int, device) -> tuple[dict, str]:
    """{kernel name: (total device us, launches)} over ``calls`` calls: torch.profiler's CUDA activity, or
    CUDA events per launch (the launch recorder) where the profiler fails; interpreter wall time on a CPU."""
    import torch
    if device.type == "cuda":
        try:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(calls):
                    call()
                torch.cuda.synchronize(device)
            out = {}
            for evt in prof.key_averages():
                us = getattr(evt, "device_time_total", None)
                if us is None:
                    us = getattr(evt, "cuda_time_total", 0)
                if us and evt.count:
                    out[evt.key] = (float(us), int(evt.count))
            if out:
                return out, "torch.profiler (CUDA activity: kernel time on the device)"
        except Exception:  # noqa: BLE001 - CUPTI missing or busy: fall back to events
            pass
    with LaunchRecorder(timed=True) as rec:
        for _ in range(calls):
            call()
    out: dict[str, tuple[float, int]] = {}
    for x in rec.launches:
        us, n = out.get(x["kernel"], (0.0, 0))
        out[x["kernel"]] = (us + x["us"], n + 1)
    how = ("CUDA events around each Triton launch (the profiler was unavailable)" if device.type == "cuda" else
           "DRY RUN: wall time of each launch in the Triton interpreter, NOT a GPU time")
    return out, how


def kernel_item(shape: dict, device, ctx: dict) -> dict:
    import torch
    dtype = _torch_dtype(shape["dtype"])
    q, k, v, do = _inputs(shape, device, dtype, torch.Generator(device=device).manual_seed(1))
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    fn = knn_call(shape, "triton") if shape["op"] == "knn" else vicinity_call(shape, "triton")

    def call():
        out = fn(q, k, v)
        torch.autograd.grad(out, (q, k, v), do)
    call()   # compiled in the correctness stage at this shape; one more warm call
    calls = 1 if ctx["dry"] else 5
    measured, how = _profile_kernels(call, calls, device)
    rows = model_rows(ctx["model"], shape["model_name"], ctx["chip"])
    kernels = per_kernel(measured, rows, calls)
    ours = [r for r in kernels if r["modelled_us"] is not None]
    total_m = sum(r["measured_us"] or 0 for r in ours)
    total_model = sum(r["modelled_us"] for r in ours)
    total_old = sum(r["old_modelled_us"] for r in ours)
    floors = [r["stall_free_us"] for r in ours]
    total_floor = sum(floors) if floors and None not in floors else None
    return dict(method=how, calls=calls, kernels=kernels, ok=True,
                total_measured_us=round(total_m, 2), total_modelled_us=round(total_model, 2),
                total_old_modelled_us=round(total_old, 2),
                total_stall_free_us=None if total_floor is None else round(total_floor, 2),
                total_ratio=round(total_m / total_model, 2) if total_model and total_m else None,
                total_old_ratio=round(total_m / total_old, 2) if total_old and total_m else None,
                total_floor_ratio=round(total_m / total_floor, 2) if total_floor and total_m else None,
                other_device_time_us=round(sum((r["measured_us"] or 0) for r in kernels
                                               if r["modelled_us"] is None and not _is_host_event(r["kernel"])), 2))


def _is_host_event(name: str) -> bool:
    return name.startswith(("cuda", "Memcpy", "Memset", "aten::", "Activity Buffer"))


def stage_kernels(ctx: dict) -> dict:
    items = [dict(s, name=f"({n})", model_name=n) for n, s in ctx["shapes"].items()]
    return _run_items(ctx, "kernels", items, lambda item, device: kernel_item(item, device, ctx), per_item_s=4)


# ----------------------------------------------------------------------------------------------------
# Stage 4: timings against SDPA / FlashAttention, eager and CUDA-graph replayed

def providers(shape: dict, device) -> dict:
    """name -> callable(q, k, v) on [B, H, N, D] tensors, or a string saying why it is absent."""
    import torch.nn.functional as F
    out = {"vicinity[triton]" if shape["op"] != "knn" else "knn[triton]":
           knn_call(shape, "triton") if shape["op"] == "knn" else vicinity_call(shape, "triton")}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return dict(out, sdpa="torch.nn.attention.sdpa_kernel is missing (torch < 2.3)")
    # Frame-causal shapes: softmax attention with the block-causal mask (N x N booleans) of the same frames.
    mask = None
    if shape.get("causal"):
        from .video import block_causal_mask
        mask = block_causal_mask(shape["grid"], device)

    def restricted(backend):
        def fn(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return fn
    if mask is not None:
        out["sdpa-efficient"] = restricted(SDPBackend.EFFICIENT_ATTENTION)
    out["sdpa-flash"] = restricted(SDPBackend.FLASH_ATTENTION)
    cudnn = getattr(SDPBackend, "CUDNN_ATTENTION", None)
    out["sdpa-cudnn"] = restricted(cudnn) if cudnn is not None and device.type == "cuda" else \
        "SDPA's cuDNN backend needs CUDA (and torch >= 2.5)"
    from .providers import flash_attn_module
    fa = flash_attn_module() if device.type == "cuda" else None
    if mask is not None:
        out["flash-attn-2"] = "flash_attn takes no block-causal mask"
    elif fa is None:
        out["flash-attn-2"] = "flash_attn does not import here"
    else:
        from flash_attn import flash_attn_func
        out["flash-attn-2"] = lambda q, k, v: flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    return out


def _median_us(fn, device, dry: bool) -> float:
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")) * 1e3
    if dry:   # one call: the dry run tests the code path, its number means nothing
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    from .timing import cpu_median
    return cpu_median(fn, budget_s=0.5, min_samples=1, max_samples=3).median_s * 1e6


def _graphed(body, device):
    """``body`` captured in a CUDA graph: returns the replay."""
    import torch
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            body()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph.replay


def timing_item(shape: dict, device, ctx: dict) -> dict:
    import torch

    from .memory import peak_allocated_bytes
    dtype = _torch_dtype(shape["dtype"])
    q0, k0, v0, do = _inputs(shape, device, dtype, torch.Generator(device=device).manual_seed(2))
    res = {}
    for pname, fn in providers(shape, device).items():
        if isinstance(fn, str):
            res[pname] = dict(skipped=fn)
            continue
        q, k, v = (t.clone().requires_grad_(True) for t in (q0, k0, v0))
        entry = {}
        try:
            out_keep = fn(q, k, v)
        except Exception as exc:  # noqa: BLE001 - e.g. a head dim or dtype this backend does not take
            res[pname] = dict(error=f"{type(exc).__name__}: {exc}"[:300])
            continue
        bodies = dict(fwd=lambda: fn(q, k, v),
                      bwd=lambda: torch.autograd.grad(out_keep, (q, k, v), do, retain_graph=True),
                      fwdbwd=lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do))
        for direction, body in bodies.items():
            for mode in ("eager", "graph"):
                key = f"{direction}_{mode}_us"
                if not ctx["budget"].allows(3):
                    entry[key] = "skipped: deadline"
                    continue
                if mode == "graph" and device.type != "cuda":
                    entry[key] = "CUDA graphs need CUDA"
                    continue
                try:
                    entry[key] = round(_median_us(body if mode == "eager" else _graphed(body, device), device,
                                                  ctx["dry"]), 2)
                except Exception as exc:  # noqa: BLE001 - a direction / mode this provider cannot do
                    entry[key] = f"{type(exc).__name__}: {exc}"[:200]
        try:
            entry["fwdbwd_peak_bytes"] = peak_allocated_bytes(bodies["fwdbwd"], device)
        except Exception as exc:  # noqa: BLE001
            entry["fwdbwd_peak_bytes"] = f"{type(exc).__name__}: {exc}"[:200]
        res[pname] = entry
    if device.type == "cuda":
        torch.cuda.empty_cache()
    m = (ctx["model"] or {}).get("shapes", {}).get(shape["model_name"], {})
    model = {d: dict(ours_us=m.get(d, {}).get("modelled_us"), fa2_us=m.get(d, {}).get("fa2_modelled_us"))
             for d in ("fwd", "fwdbwd")}
    return dict(ok=True, providers=res, model_h100_sxm=model)


def stage_timings(ctx: dict) -> dict:
    items = [dict(s, name=f"({n})", model_name=n) for n, s in ctx["shapes"].items()]
    return _run_items(ctx, "timings", items, lambda item, device: timing_item(item, device, ctx), per_item_s=8)


# ----------------------------------------------------------------------------------------------------
# Stage 5: backbone, Stage 6: suite

def stage_backbone(ctx: dict) -> dict:
    from .backbone import measure_point
    resolutions = (64, 96) if ctx["dry"] else (224, 448)
    attentions = ("vicinity",) if ctx["dry"] else ("vicinity", "softmax")
    items = [dict(name=f"{att} {r}px", attention=att, resolution=r) for r in resolutions for att in attentions]

    def one(item, device):
        got = measure_point(item["attention"], item["resolution"], device, budget_s=0.2 if ctx["dry"] else 3.0,
                            max_steps=1 if ctx["dry"] else 5)
        return dict(ok=True, **{k: v for k, v in got.items() if isinstance(v, (int, float, str, type(None)))})
    return _run_items(ctx, "backbone", items, one, per_item_s=5 if ctx["dry"] else 25)


SUITE_DEVICE_MODULES = ("tests/vicinity/test_triton_backend.py", "tests/vicinity/test_query_pass.py",
                        "tests/knn/test_backends.py")
SUITE_REST_IGNORED = ("tests/tools",)       # the compile gate and the wheel build are CPU tools, not device tests
_VERBOSE_LINE = re.compile(r"^(\S+::.*?) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def suite_commands(dry: bool) -> list[list[str]]:
    base = [sys.executable, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider"]
    if dry:   # a taste of each step: two quick tests of the device module, then a quick module
        return [base + ["tests/vicinity/test_triton_backend.py", "-k", "rejected or cpu_tensors"],
                base + ["tests/common/test_validation.py", "-k", "mixed_devices or empty_batch"]]
    rest = ["tests"] + [f"--ignore={p}" for p in SUITE_DEVICE_MODULES + SUITE_REST_IGNORED]
    return [base + list(SUITE_DEVICE_MODULES), base + rest]


def parse_pytest(text: str) -> dict:
    counts: dict[str, int] = {}
    failed = []
    for line in text.splitlines():
        m = _VERBOSE_LINE.match(line)
        if m:
            counts[m.group(2).lower()] = counts.get(m.group(2).lower(), 0) + 1
            if m.group(2) in ("FAILED", "ERROR"):
                failed.append(m.group(1))
    return dict(counts=counts, failed=failed[:60])


def stage_suite(ctx: dict) -> dict:
    import importlib.util
    if importlib.util.find_spec("pytest") is None:
        return dict(status="skipped", reason="pytest is not installed here: the suite did not run")
    budget, report = ctx["budget"], ctx["report"]
    env = dict(os.environ, TRITON_INTERPRET="1" if ctx["dry"] else "0")
    runs = report.data["stages"]["suite"]["runs"] = []
    status = "ok"
    for cmd in suite_commands(ctx["dry"]):
        timeout = budget.left() - 5
        if timeout < 10:
            runs.append(dict(command=" ".join(cmd[1:]), skipped="deadline"))
            status = "partial"
            continue
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            text, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout or b""
            text, rc = (out.decode(errors="replace") if isinstance(out, bytes) else out), "timeout"
            status = "partial"
        run = dict(command=("TRITON_INTERPRET=" + env["TRITON_INTERPRET"] + " " + " ".join(cmd[1:])), returncode=rc,
                   timeout_s=round(timeout), seconds=round(time.perf_counter() - t0, 1), **parse_pytest(text),
                   tail=text[-1500:])
        runs.append(run)
        if rc not in (0, 5, "timeout") or run["failed"]:
            status = "failed"
        report.log(f"suite: {run['counts']} (exit {rc}) {' '.join(cmd[5:])[:80]}", budget)
        report.write()
    return dict(status=status)


# ----------------------------------------------------------------------------------------------------
# Driver

STAGE_FUNCS = dict(device=stage_device, correctness=stage_correctness, kernels=stage_kernels, timings=stage_timings,
                   backbone=stage_backbone, suite=stage_suite)


def run_stages(ctx: dict, stages: list[str]) -> None:
    report, budget = ctx["report"], ctx["budget"]
    scale = 0.05 if ctx["dry"] else 1.0
    for name in stages:
        entry = report.data["stages"].setdefault(name, {})
        if not budget.allows(STAGE_MIN_S[name] * scale):
            entry.update(status="skipped", reason=f"deadline: {budget.left():.0f} s left, the stage needs "
                                                  f"{STAGE_MIN_S[name] * scale:.0f}")
            report.log(f"{name}: skipped (deadline)", budget)
            report.write()
            continue
        entry["status"] = "running"
        report.write()
        t0 = time.perf_counter()
        try:
            got = STAGE_FUNCS[name](ctx) or {}
            entry.update(got if "status" in got else dict(got, status="ok"))
        except DeadlineExceeded as exc:
            entry.update(status="interrupted", reason=str(exc))
            report.log(f"{name}: interrupted by the hard deadline", budget)
            entry["seconds"] = round(time.perf_counter() - t0, 1)
            report.write()
            raise
        except Exception as exc:  # noqa: BLE001 - a broken stage is recorded; the next ones still run
            import traceback
            entry.update(status="error", error=f"{type(exc).__name__}: {exc}"[:500],
                         traceback=traceback.format_exc()[-2000:])
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        report.log(f"{name}: {entry['status']} ({entry['seconds']} s)", budget)
        report.data["elapsed_s"] = round(budget.elapsed(), 1)
        report.write()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help=f"the JSON (default {os.path.relpath(OUT_DEFAULT, ROOT)}; "
                                                    "dry run: gpu-check-dry-run.json beside it)")
    parser.add_argument("--log", default=None, help="the text log (default: the JSON's path with .txt)")
    parser.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S,
                        help="seconds for everything; stages stop starting when it nears (default %(default)s)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    parser.add_argument("--model", default=MODEL_DEFAULT, help="the GPU model's JSON (python -m bench.gpu_model)")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: every stage on the CPU at tiny shapes through the Triton interpreter")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    if set(stages) - set(STAGES):
        parser.error(f"unknown stage(s) {sorted(set(stages) - set(STAGES))}; choose from {', '.join(STAGES)}")
    stages = [s for s in STAGES if s in stages]
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported (below)
        if os.environ["TRITON_INTERPRET"] in ("", "0") and "triton" in sys.modules:
            print("--dry-run needs TRITON_INTERPRET=1 before triton is imported")
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.setdefault("TRITON_INTERPRET", "0")
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        print(NO_CUDA.format(torch=torch.__version__))
        return 2
    json_path = args.out or (OUT_DEFAULT if not args.dry_run else OUT_DEFAULT.replace(".json", "-dry-run.json"))
    log_path = args.log or os.path.splitext(json_path)[0] + ".txt"
    model = None
    if os.path.exists(args.model):
        with open(args.model) as f:
            model = json.load(f)
    budget = Budget(args.deadline)
    device = torch.device("cpu" if args.dry_run else "cuda")
    label = ("DRY RUN on the CPU through the Triton interpreter at tiny shapes: NO number here is a GPU measurement"
             if args.dry_run else "MEASURED on the GPU named under stages.device (model columns are a MODEL)")
    report = Report(json_path, log_path, dict(
        tool="python -m bench.gpu_check", argv=sys.argv[1:] if argv is None else list(argv), dry_run=args.dry_run,
        label=label, deadline_s=args.deadline, started_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model_source=os.path.relpath(args.model, ROOT) if model else None, stages_planned=stages))
    report.log(f"gpu_check: {label}; deadline {args.deadline:.0f} s; writing {json_path} and {log_path}")
    if model is None:
        report.log(f"warning: no GPU model at {args.model}: the model columns stay empty")
    torch.manual_seed(0)
    ctx = dict(device=device, dry=args.dry_run, budget=budget, report=report, model=model,
               shapes=timed_shapes(args.dry_run), chip=chip_models()["H100 SXM"])
    try:
        with hard_deadline(args.deadline + HARD_GRACE_S):
            run_stages(ctx, stages)
    except DeadlineExceeded:
        pass
    finally:
        report.data["elapsed_s"] = round(budget.elapsed(), 1)
        report.data["summary"] = summary(report.data)
        report.log(f"done in {budget.elapsed():.1f} s: {report.data['summary']['line']}")
        report.write()
    return 0 if report.data["summary"]["ok"] else 1


def summary(data: dict) -> dict:
    """One line and a verdict: which stages ran, which items failed."""
    stages = data.get("stages", {})
    failed = {n: s.get("failed") or s.get("error") for n, s in stages.items()
              if s.get("status") in ("failed", "error")}
    line = "; ".join(f"{n} {s.get('status')}" for n, s in stages.items())
    return dict(ok=not failed, failed=failed, line=line)


if __name__ == "__main__":
    sys.exit(main())
