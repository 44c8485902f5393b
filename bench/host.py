"""Host time of eager calls: what a GPU call waits for before the GPU sees any work (measured on a CPU).

    python -m bench.host                    # shapes a, c (VVT stage 1, a small ViT layer) and k (k-NN), table + JSON
    python -m bench.host --shapes a,b,c --json bench/results/host-cpu.json
    python -m bench --host                  # the same, through the benchmark CLI

An eager ``vicinity_attention(..., backend="triton")`` call pays Python before any kernel runs: the
public function, validation, the custom op's dispatch, autograd, the launchers (configs, tile and chunk
plans, allocation) and Triton's own binding of every launch. All of it runs on the host, so it can be
measured without a GPU: the launchers are called on CPU tensors shaped like the GPU call, every launch
goes through Triton's real ``JITFunction.run`` (binding, specialisation key, cache lookup, grid) for an
sm_90 target, and only the last step is replaced: a no-op stands in for the compiled kernel's launcher.
The real launcher (C, a few microseconds for 40 arguments) is therefore not counted, in the calls and in
the calibration alike.

Measured per shape, forward, backward and forward + backward:
  (i) the public function ``vicinity_attention``; (ii) ``VicinityAttention`` minus the same module with
  its attention core replaced by a no-op (what the layer adds to its Linear layers); (iii) the triton
  backend's own forward / backward (no validation, no autograd: public minus backend is what those
  cost), which from the third call of a layout on replays the launches it recorded
  (``kernels/replay.py``); (iv) the launchers alone (``vicinity_forward`` / ``vicinity_backward`` on
  preallocated tensors), as they run on a layout's first two calls (what the replay saves); and the
  calibrations: Triton's bare launch of a kernel with a comparable argument list (``calibration_kernel``,
  40 runtime arguments, 4 constexprs), times the call's launch count (the target's yardstick); and the
  call's own launches replayed bare through Triton's binding (the same kernels, arguments, constexprs and
  options: what the launches alone cost through ``kernel[grid](...)``). Backward is timed with ``torch.autograd.grad``
  on a graph built outside the timer, so no gradient accumulation is timed. Callables are timed in
  interleaved rounds by the calling thread's CPU time (``time.thread_time``, one torch thread): the host
  work itself, which on an idle machine is the wall time, and which other processes holding the cores
  do not inflate.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

SHAPES = {   # the GPU model's vicinity shapes (bench/gpu_model.py SHAPES), bf16
    "a": dict(batch=32, heads=1, grid=(56, 56), dim=48, title="B=32, H=1, 56x56, D=48 (VVT stage 1)"),
    "b": dict(batch=1, heads=4, grid=(224, 224), dim=64, title="B=1, H=4, 224x224, D=64"),
    "c": dict(batch=8, heads=8, grid=(14, 14), dim=32, title="B=8, H=8, 14x14, D=32"),
    # k-NN attention at KVT's ViT-S/16 shape (197 tokens, 6 heads of 64, topk = N / 2), bf16.
    "k": dict(op="knn", batch=32, heads=6, tokens=197, dim=64, topk=98, title="k-NN B=32, H=6, N=197, D=64, k=98"),
}
TARGET_FACTOR = 2.0   # issue target: a call's host time <= 2x (its launches x one bare launch)
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ------------------------------------------------------------------------------------------------
# Launches stubbed after Triton's binding


def _no_launch():
    """A compiled kernel for Triton's kernel cache whose launcher does nothing: a real ``CompiledKernel``
    (so Triton's own runner, ``CompiledKernel[grid](...)``, runs as on a GPU) with nothing loaded."""
    from triton.compiler import CompiledKernel
    kernel = object.__new__(CompiledKernel)
    kernel.module = "stub"              # handles "loaded": nothing to load
    kernel._module_pid = None           # (triton 3.9) and nothing for its finaliser to unload
    kernel.function = kernel.packed_metadata = kernel.src = None
    kernel.name = "no_launch"
    kernel._run = lambda *args: None
    return kernel


class _Sm90Driver:
    """Just enough of a Triton driver for ``JITFunction.run`` to bind and key launches for sm_90."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)


@contextlib.contextmanager
def stubbed_launches():
    """Every ``kernel[grid](...)`` inside runs Triton's binding and cache lookup, then a no-op launcher;
    CPU tensors are accepted by the triton backends as if they were on the GPU."""
    from triton.runtime.driver import driver as triton_driver
    from triton.runtime.jit import JITFunction

    from vicinity_attn.knn import triton_backend as knn_backend
    from vicinity_attn.vicinity import triton_backend

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        kernel = _no_launch()
        self.device_caches[device][0][key] = kernel
        return kernel

    from vicinity_attn.common import feature_maps

    saved = (triton_driver._active, JITFunction._do_compile, triton_backend.interpreting, knn_backend.interpreting,
             feature_maps.host_reads_are_free)
    triton_driver.set_active(_Sm90Driver())
    JITFunction._do_compile = do_compile
    # The backends refuse CPU tensors outside the interpreter; here CPU tensors stand in for GPU ones, on
    # which nothing is read back (the CPU-only checks, e.g. common/overflow.py, do not run).
    triton_backend.interpreting = knn_backend.interpreting = lambda: True
    feature_maps.host_reads_are_free = lambda t: False
    try:
        yield
    finally:
        (triton_driver._active, JITFunction._do_compile, triton_backend.interpreting,
         knn_backend.interpreting, feature_maps.host_reads_are_free) = saved


@contextlib.contextmanager
def counted_launches(counter: list, recorded: list | None = None):
    """Appends the name of every kernel launched inside to ``counter`` (and, with ``recorded``, the launch
    itself: kernel, grid, arguments)."""
    from triton.runtime.jit import JITFunction
    run = JITFunction.run

    def counting(self, *args, grid, warmup, **kwargs):
        counter.append(self.fn.__name__)
        if recorded is not None:
            recorded.append((self, grid, args, kwargs))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    JITFunction.run = counting
    try:
        yield
    finally:
        JITFunction.run = run


def _calibration_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def calibration_kernel(p0, p1, p2, p3, p4, p5, p6, p7, p8, p9,
                           n0, n1, n2, n3, n4, n5, n6, n7, n8, n9,
                           s0, s1, s2, s3, s4, s5, s6, s7, s8, s9,
                           s10, s11, s12, s13, s14, s15, s16, s17, eps, floor,
                           A: tl.constexpr, B: tl.constexpr, C: tl.constexpr, D: tl.constexpr):
        pass

    return calibration_kernel


def bare_launch(kernel, tensors) -> Callable[[], object]:
    """One launch of ``kernel`` with 10 tensors, 28 ints, 2 floats and 4 constexprs: the shape of the
    vicinity kernels' argument lists (38-45 runtime arguments)."""
    ints = [196, 64, 1, 48, 8, 3, 2, 1, 96, 5] + [t.stride(i) for t in tensors[:4] for i in range(4)] + [1, 2]

    def launch():
        kernel[(64, 8, 1)](*tensors, *ints, 1e-4, 0.0, A=64, B=32, C=2, D=1)
    return launch


# ------------------------------------------------------------------------------------------------
# What is timed


def _inputs(shape: dict, requires_grad: bool):
    import torch
    B, H, D = shape["batch"], shape["heads"], shape["dim"]
    N = shape["tokens"] if "tokens" in shape else shape["grid"][0] * shape["grid"][1]
    qkv = [torch.randn(B, H, N, D, dtype=torch.bfloat16, requires_grad=requires_grad) for _ in range(3)]
    return qkv, torch.randn(B, H, N, D, dtype=torch.bfloat16)


def public_callables(shape: dict) -> dict[str, Callable[[], object]]:
    """fwd / bwd / fwdbwd of the public function on the shape's tensors."""
    import torch

    from vicinity_attn import vicinity_attention
    (q, k, v), do = _inputs(shape, True)
    grid = shape["grid"]

    def fwd():
        with torch.no_grad():
            return vicinity_attention(q, k, v, grid, backend="triton")

    def fwdbwd():
        o = vicinity_attention(q, k, v, grid, backend="triton")
        return torch.autograd.grad(o, (q, k, v), do)

    return dict(fwd=fwd, bwd=_backward_only(lambda: vicinity_attention(q, k, v, grid, backend="triton"),
                                            (q, k, v), do), fwdbwd=fwdbwd)


def knn_callables(shape: dict) -> tuple[dict, dict, dict]:
    """(public, backend, launchers) fwd / bwd / fwdbwd callables of ``knn_attention`` at a k-NN shape: the
    public function, the triton backend's own forward / backward, and the launchers on preallocated tensors."""
    import torch

    from vicinity_attn import knn_attention
    from vicinity_attn.kernels.knn import knn_backward, knn_forward
    from vicinity_attn.knn import triton_backend
    (q, k, v), do = _inputs(shape, True)
    topk, scale = shape["topk"], shape["dim"] ** -0.5

    def public_fwd():
        with torch.no_grad():
            return knn_attention(q, k, v, topk, backend="triton")

    def public_fwdbwd():
        return torch.autograd.grad(knn_attention(q, k, v, topk, backend="triton"), (q, k, v), do)

    public = dict(fwd=public_fwd, bwd=_backward_only(lambda: knn_attention(q, k, v, topk, backend="triton"),
                                                     (q, k, v), do), fwdbwd=public_fwdbwd)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    saved = triton_backend.forward(qd, kd, vd, topk, scale)
    backend = dict(fwd=lambda: triton_backend.forward(qd, kd, vd, topk, scale),
                   bwd=lambda: triton_backend.backward(do, qd, kd, vd, *saved, topk, scale),
                   fwdbwd=lambda: triton_backend.backward(do, qd, kd, vd, *triton_backend.forward(qd, kd, vd, topk,
                                                                                                   scale), topk, scale))
    o = torch.empty_like(qd)
    dq, dk, dv = torch.empty_like(qd), torch.empty_like(kd), torch.empty_like(vd)
    tau, lse = knn_forward(qd, kd, vd, o, topk, scale)
    launchers = dict(fwd=lambda: knn_forward(qd, kd, vd, o, topk, scale),
                     bwd=lambda: knn_backward(do, qd, kd, vd, o, tau, lse, dq, dk, dv, scale),
                     fwdbwd=lambda: knn_backward(do, qd, kd, vd, o, *knn_forward(qd, kd, vd, o, topk, scale), dq, dk,
                                                 dv, scale))
    return public, backend, launchers


def _backward_only(forward: Callable, leaves, do, allow_unused: bool = False) -> Callable[[], object]:
    """A callable timing only ``torch.autograd.grad`` (the graph is rebuilt, untimed, between calls)."""
    import torch
    state = {"o": forward()}

    def bwd():
        return torch.autograd.grad(state["o"], leaves, do, allow_unused=allow_unused)

    bwd.prepare = lambda: state.update(o=forward())   # called by the timer outside the timed region
    return bwd


def module_callables(shape: dict) -> dict[str, Callable[[], object]]:
    """fwd / bwd / fwdbwd of ``VicinityAttention`` (C = heads x D, bf16) and of the same module with its
    attention call replaced by a no-op, timed side by side so their difference is what the attention
    costs the layer on the host (the Linear layers run for real on the CPU in both)."""
    import torch

    import vicinity_attn.modules as modules
    from vicinity_attn import VicinityAttention
    B, H, D, (h, w) = shape["batch"], shape["heads"], shape["dim"], shape["grid"]
    C = H * D
    layer = VicinityAttention(C, H, backend="triton").to(torch.bfloat16)
    x = torch.randn(B, h * w, C, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(B, h * w, C, dtype=torch.bfloat16)
    params = (x, *layer.parameters())
    real = modules.vicinity_attention

    def no_attention(q, k, v, *args, **kwargs):
        return q

    def run(attention):
        modules.vicinity_attention = attention
        try:
            return layer(x, h, w)
        finally:
            modules.vicinity_attention = real

    out = {}
    for name, attention in (("module", real), ("module_bare", no_attention)):
        def fwd(attention=attention):
            with torch.no_grad():
                return run(attention)

        def fwdbwd(attention=attention):
            return torch.autograd.grad(run(attention), params, dy, allow_unused=True)

        out[f"{name}.fwd"] = fwd
        out[f"{name}.bwd"] = _backward_only(lambda attention=attention: run(attention), params, dy, True)
        out[f"{name}.fwdbwd"] = fwdbwd
    return out


def backend_callables(shape: dict) -> dict[str, Callable[[], object]]:
    """fwd / bwd / fwdbwd of the triton backend's own forward and backward (input checks, allocation, the
    device guard and the launchers: what the public function runs without validation and autograd)."""
    from vicinity_attn.common.validation import validate_call
    from vicinity_attn.vicinity import triton_backend
    (q, k, v), do = _inputs(shape, False)
    spec = validate_call(q, k, v, tuple(shape["grid"]), None, variant="sum", feature_map="relu", eps=1e-4,
                         layout="bhnd", backend="triton")[3]
    saved = triton_backend.forward(q, k, v, spec)

    def fwd():
        return triton_backend.forward(q, k, v, spec)

    def bwd():
        return triton_backend.backward(do, q, k, v, *saved, spec)

    def fwdbwd():
        return triton_backend.backward(do, q, k, v, *triton_backend.forward(q, k, v, spec), spec)

    return dict(fwd=fwd, bwd=bwd, fwdbwd=fwdbwd)


def launcher_callables(shape: dict) -> dict[str, Callable[[], object]]:
    """fwd / bwd / fwdbwd of the launchers alone, on preallocated tensors (what the backend hands them)."""
    import torch

    from vicinity_attn.common.spec import VicinitySpec
    from vicinity_attn.kernels.vicinity import vicinity_backward, vicinity_forward
    from vicinity_attn.vicinity import triton_backend
    (q, k, v), do = _inputs(shape, False)
    spec = VicinitySpec(grid=tuple(shape["grid"]), kv_grid=tuple(shape["grid"]))
    geom = triton_backend._geometry(spec)
    o = torch.empty_like(q)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    saved = vicinity_forward(q, k, v, o, geom, spec.eps, spec.den_floor, spec.clamp)

    def fwd():
        return vicinity_forward(q, k, v, o, geom, spec.eps, spec.den_floor, spec.clamp)

    def bwd():
        return vicinity_backward(do, q, k, v, o, *saved, dq, dk, dv, geom, spec.eps, spec.den_floor, spec.clamp)

    def fwdbwd():
        den, S, z = fwd()
        return vicinity_backward(do, q, k, v, o, den, S, z, dq, dk, dv, geom, spec.eps, spec.den_floor, spec.clamp)

    return dict(fwd=fwd, bwd=bwd, fwdbwd=fwdbwd)


# ------------------------------------------------------------------------------------------------
# Timing


def interleaved_us(fns: dict[str, Callable[[], object]], budget_s: float, inner: int = 5) -> dict[str, float]:
    """Median CPU microseconds (this thread's) per call of each callable, timed in alternating rounds of
    ``inner`` calls."""
    for fn in fns.values():           # warm-up: plans, caches and Triton's kernel cache filled
        for _ in range(2):
            getattr(fn, "prepare", lambda: None)()
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    deadline = time.perf_counter() + budget_s
    gc_was = gc.isenabled()
    gc.disable()
    try:
        rounds = 0
        while rounds < 5 or (time.perf_counter() < deadline and rounds < 400):
            for name, fn in fns.items():
                prepare = getattr(fn, "prepare", None)
                total = 0.0
                for _ in range(inner):
                    if prepare:
                        prepare()
                    t0 = time.thread_time()
                    fn()
                    total += time.thread_time() - t0
                samples[name].append(total / inner * 1e6)
            rounds += 1
    finally:
        if gc_was:
            gc.enable()
    return {name: statistics.median(s) for name, s in samples.items()}


def launch_counts(fns: dict[str, Callable[[], object]]) -> dict[str, list[str]]:
    counts = {}
    for name, fn in fns.items():
        getattr(fn, "prepare", lambda: None)()
        launched: list[str] = []
        with counted_launches(launched):
            fn()
        counts[name] = launched
    return counts


def own_bare_launches(fn: Callable[[], object]) -> Callable[[], None]:
    """The launches ``fn`` makes, replayed bare: each ``kernel[grid](*args, **kwargs)`` with the call's own
    arguments through Triton's ``JITFunction.run`` (the second calibration: Triton's binding of the very
    kernels of the call, constexprs and launch options included)."""
    getattr(fn, "prepare", lambda: None)()
    recorded: list = []
    with counted_launches([], recorded):
        fn()

    def replay():
        for kernel, grid, args, kwargs in recorded:
            kernel[grid](*args, **kwargs)
    return replay


def measure(shape_names: list[str], budget_s: float) -> dict:
    import torch
    import triton
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rows = {}
    load_before = os.getloadavg()
    with stubbed_launches():
        kernel = _calibration_kernel()
        tensors = [torch.empty(4, 4, 4, 4, dtype=torch.bfloat16) for _ in range(10)]
        calibrate = bare_launch(kernel, tensors)
        for name in shape_names:
            shape = SHAPES[name]
            if shape.get("op") == "knn":
                public, backend, launchers = knn_callables(shape)
                module = {}      # no layer column for k-NN
            else:
                public = public_callables(shape)
                launchers = launcher_callables(shape)
                backend = backend_callables(shape)
                module = module_callables(shape)
            fns = {"bare_launch": calibrate, **{f"public.{m}": f for m, f in public.items()},
                   **{f"own_bare.{m}": own_bare_launches(public[m]) for m in ("fwd", "bwd", "fwdbwd")},
                   **{f"backend.{m}": f for m, f in backend.items()},
                   **{f"launchers.{m}": f for m, f in launchers.items()}}
            # The layers run real CPU matmuls: timed in a round of their own, so that their cache traffic
            # does not land on the host-only calls.
            us = {**interleaved_us(fns, budget_s / 2), **(interleaved_us(module, budget_s / 2) if module else {})}
            counts = launch_counts({m: public[m] for m in ("fwd", "bwd", "fwdbwd")})
            launch_us = us["bare_launch"]
            row = {"title": shape["title"], "bare_launch_us": launch_us, "modes": {}}
            for mode in ("fwd", "bwd", "fwdbwd"):
                n = len(counts[mode])
                bound = TARGET_FACTOR * n * launch_us
                row["modes"][mode] = {
                    "launches": n, "kernels": counts[mode],
                    "public_us": us[f"public.{mode}"], "backend_us": us[f"backend.{mode}"],
                    "launchers_us": us[f"launchers.{mode}"],
                    "module_us": us.get(f"module.{mode}"), "module_bare_us": us.get(f"module_bare.{mode}"),
                    "module_attention_us": (us[f"module.{mode}"] - us[f"module_bare.{mode}"]) if module else None,
                    "launches_x_bare_us": n * launch_us, "target_us": bound,
                    "own_bare_us": us[f"own_bare.{mode}"],
                    "public_vs_own_bare": us[f"public.{mode}"] / max(us[f"own_bare.{mode}"], 1e-9),
                    "public_vs_launches": us[f"public.{mode}"] / max(n * launch_us, 1e-9),
                    "meets_target": us[f"public.{mode}"] <= bound,
                }
            rows[name] = row
    return {"triton": triton.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
            "threads": 1, "load_average_before_after": [load_before[0], os.getloadavg()[0]],
            "method": __doc__.split("\n\n")[1].replace("\n", " "), "shapes": rows}


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(result: dict) -> str:
    lines = [f"host CPU time per eager call, microseconds (triton {result['triton']}, torch {result['torch']}, "
             "one thread; launches stubbed after Triton's binding)",
             f"{'shape':<40} {'mode':<7} {'launches':>8} {'bare x n':>9} {'public':>9} {'ratio':>6} "
             f"{'own bare':>9} {'ratio':>6} {'backend':>9} {'launchers':>9} {'layer+':>9} {'target':>7}"]
    for row in result["shapes"].values():
        for mode, m in row["modes"].items():
            lines.append(f"{row['title']:<40} {mode:<7} {m['launches']:>8} {m['launches_x_bare_us']:>9.1f} "
                         f"{m['public_us']:>9.1f} {m['public_vs_launches']:>6.2f} {m['own_bare_us']:>9.1f} "
                         f"{m['public_vs_own_bare']:>6.2f} {m['backend_us']:>9.1f} "
                         f"{m['launchers_us']:>9.1f} "
                         f"{_us(m['module_attention_us']):>9} {'met' if m['meets_target'] else 'MISSED':>7}")
    lines.append("bare x n: the call's launch count x Triton's bare launch of a 40-argument kernel; ratio: "
                 f"public / that (target <= {TARGET_FACTOR:g}); own bare: the call's own launches replayed through "
                 "Triton's binding, and public / that; backend: the triton backend's forward / backward "
                 "without validation and autograd (replaying its recorded launches); launchers: the launchers "
                 "alone, as a layout's first two calls run them; layer+: VicinityAttention minus the same layer "
                 "without attention")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.host", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="a,c,k",
                        help=f"comma-separated, from {','.join(SHAPES)} (default a,c,k)")
    parser.add_argument("--budget-seconds", type=float, default=6.0, help="timing budget per shape (default 6)")
    parser.add_argument("--json", help="write the result here (default bench/results/host-cpu-triton<version>.json; "
                                       "'' = none)")
    args = parser.parse_args(argv)
    names = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in names if s not in SHAPES]
    if unknown:
        parser.error(f"--shapes: unknown {unknown}; known: {sorted(SHAPES)}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("run without TRITON_INTERPRET: interpreted kernels do not bind like real launches")
    result = measure(names, args.budget_seconds)
    print(format_table(result))
    path = args.json
    if path is None:
        path = os.path.join(RESULTS_DIR, f"host-cpu-triton{result['triton']}.json")
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
