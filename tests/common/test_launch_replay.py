"""kernels/replay.py: a replayed call (dense, packed and frame-causal vicinity attention, k-NN attention) hands
the compiled kernels what the launchers hand them (same kernels, grids, scalars, and tensors in the same roles:
the call's arguments, its results, its fresh buffers), returns fresh results, and a layout it has not recorded
(an alignment, an aliasing of arguments) runs the launchers.

Replays need compiled kernels, so the checks run in a subprocess without the interpreter, with the host
benchmark's stand-in for a GPU (a fake sm_90 driver whose compiled kernels record their launches instead of
running)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from tests.helpers import REPO

PROBE = textwrap.dedent("""
    import json, sys
    import torch
    from bench import host
    from vicinity_attn import knn_attention, vicinity_attention, vicinity_attention_varlen
    from vicinity_attn.kernels import replay

    launches = []
    no_launch = host._no_launch

    def recording_no_launch():
        kernel = no_launch()
        kernel._run = lambda g0, g1, g2, stream, fn, meta, lm, enter, exit_, *args: launches.append(
            [kernel, g0, g1, g2, args])
        return kernel

    host._no_launch = recording_no_launch

    def describe(named):
        # Each tensor by its role: a named tensor of the call (argument or result) or the n-th other storage
        # seen in this call, with its offset, dtype, shape and strides; kernels by identity, scalars by value.
        storages, kernels, rows = {}, {}, []
        for kernel, g0, g1, g2, args in launches:
            row = [kernels.setdefault(id(kernel), len(kernels)), g0, g1, g2]
            for a in args:
                if isinstance(a, torch.Tensor):
                    ptr = a.untyped_storage().data_ptr()
                    role = named.get(ptr) or storages.setdefault(ptr, f"buffer{len(storages)}")
                    row.append([role, a.storage_offset(), str(a.dtype), list(a.shape), list(a.stride())])
                else:
                    row.append(repr(a))
            rows.append(row)
        return rows

    def make(case, offset=0):
        g = torch.Generator().manual_seed(0)
        B, H, N, D, layout = case["B"], case["H"], case["N"], case["D"], case["layout"]
        dtype = getattr(torch, case["dtype"])
        shape = (B, H, N, D) if layout == "bhnd" else (B, N, H, D) if layout == "bnhd" else (N, H, D)
        numel = B * H * N * D
        if case.get("shared"):      # q, k, v as views of one projection's output
            qkv = torch.randn(numel * 3 + offset, generator=g).to(dtype)[offset:].view(*shape[:-1], 3 * D)
            return [qkv[..., i * D:(i + 1) * D] for i in range(3)]
        return [torch.randn(numel + offset, generator=g).to(dtype)[offset:].view(shape) for _ in range(3)]

    def call(case, qkv, grads_of):
        launches.clear()
        leaves = [t.detach().requires_grad_(i in grads_of) for i, t in enumerate(qkv)]
        if case["op"] == "knn":
            o = knn_attention(*leaves, topk=case["topk"], layout=case["layout"], backend="triton")
        elif case["op"] == "varlen":     # a pack of case["grids"] (B = 1), checked on the device
            cu = torch.tensor([0, *torch.tensor([g[0] * g[1] for g in case["grids"]]).cumsum(0).tolist()],
                              dtype=torch.int32)
            o = vicinity_attention_varlen(*leaves, cu, cu, case["grids"], check_cu_seqlens_on_host=False,
                                          backend="triton")
        else:
            o = vicinity_attention(*leaves, case["grid"], case.get("kv_grid"), layout=case["layout"],
                                   num_prefix_tokens=case.get("prefix", 0), clamp=case.get("clamp"),
                                   den_floor=case.get("den_floor", 0.0), variant=case.get("variant", "sum"),
                                   causal=case.get("causal"), backend="triton")
        do = torch.randn_like(o)
        wanted = [leaves[i] for i in grads_of]
        grads = torch.autograd.grad(o, wanted, do)
        names = dict(zip(("q", "k", "v", "o", "do"), (*leaves, o, do)))
        names.update({"d" + "qkv"[i]: g for i, g in zip(grads_of, grads)})
        named = {t.untyped_storage().data_ptr(): n for n, t in reversed(list(names.items()))}
        return describe(named), [o, *grads]

    case = json.loads(sys.argv[1])
    grads_of = case.get("grads_of", [0, 1, 2])
    result = {"calls": [], "kinds": []}
    with host.stubbed_launches():
        qkv = make(case)
        kept = []
        for i in range(4):
            rows, results = call(case, qkv, grads_of)
            result["calls"].append(rows)
            result["kinds"].append(sorted(type(e).__name__ for e in replay._entries.values()))
            kept.append(results)
        # (all kept alive: a freed result's memory could come back)
        ptrs = [t.untyped_storage().data_ptr() for r in kept for t in r]
        result["fresh_results"] = len(set(ptrs)) == len(ptrs)
        # The same shapes 2 bytes past a 16-byte boundary: a new layout, run by the launchers.
        rows, _ = call(case, make(case, offset=1), grads_of)
        result["misaligned"] = rows
        result["kinds_after_misaligned"] = sorted(type(e).__name__ for e in replay._entries.values())
        # q and k the same tensor: a new layout (which argument is which is part of the key).
        same = [qkv[0], qkv[0], qkv[2]]
        result["aliased"] = [call(case, same, grads_of)[0] for _ in range(3)]
    json.dump(result, sys.stdout)
""")

CASES = {
    "bf16_bnhd_prefix_d64": dict(op="vicinity", B=2, H=3, N=43, D=64, dtype="bfloat16", layout="bnhd",
                                 grid=[7, 6], prefix=1),
    "fp32_clamp_cross_d40": dict(op="vicinity", B=2, H=2, N=30, D=40, dtype="float32", layout="bhnd",
                                 grid=[6, 5], kv_grid=[6, 5], clamp=[1e-4, 1e4], den_floor=1.0),
    "fp16_3d_q_grad_only": dict(op="vicinity", B=1, H=2, N=60, D=32, dtype="float16", layout="bhnd",
                                grid=[3, 4, 5], variant="product", grads_of=[0]),
    "bf16_shared_qkv": dict(op="vicinity", B=2, H=2, N=49, D=48, dtype="bfloat16", layout="bnhd", grid=[7, 7],
                            shared=True, grads_of=[1, 2]),
    "bf16_frame_causal_prefix": dict(op="vicinity", B=2, H=2, N=61, D=32, dtype="bfloat16", layout="bnhd",
                                     grid=[3, 4, 5], prefix=1, causal="frames"),
    "varlen_bf16": dict(op="varlen", B=1, H=2, N=52, D=32, dtype="bfloat16", layout="packed",
                        grids=[[4, 5], [6, 3], [2, 7]]),
    "knn_bf16": dict(op="knn", B=2, H=3, N=37, D=64, dtype="bfloat16", layout="bhnd", topk=9),
}


def run_probe(case: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VICINITY_ATTN_LAUNCH_REPLAY")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(case)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("name", list(CASES))
def test_replayed_triton_launches_match_the_launchers(name):
    result = run_probe(CASES[name])
    first, recorded, replayed, again = result["calls"]
    assert len(first) >= 2
    # First call: the launchers; second: recorded while the launchers run; then replays (forward + backward).
    assert "Replay" not in result["kinds"][0]
    assert result["kinds"][2] == ["Replay", "Replay"], result["kinds"]
    assert recorded == first and replayed == first and again == first
    # Replays return fresh tensors: no result of one call shares storage with another's.
    assert result["fresh_results"]
    # Kernels see the call's own tensors: each named role appears in the launches.
    roles = {arg[0] for row in replayed for arg in row[4:] if isinstance(arg, list)}
    assert {"o", "do", "q"} | (set() if CASES[name].get("shared") else {"k", "v"}) <= roles


@pytest.mark.parametrize("name", ["bf16_bnhd_prefix_d64", "knn_bf16"])
def test_new_layouts_run_the_triton_launchers(name):
    result = run_probe(CASES[name])
    first = result["calls"][0]
    # Misaligned inputs: other specialisations of some kernels, and two more layouts seen (not replayed yet).
    assert result["misaligned"] != first
    assert len(result["misaligned"]) == len(first)
    assert result["kinds_after_misaligned"].count("Replay") == 2
    assert len(result["kinds_after_misaligned"]) == 4
    # q is k: the same launches as the launchers make for that call, replayed from the third call on.
    aliased = result["aliased"]
    assert aliased[0] == aliased[1] == aliased[2]
    assert any(arg[0] == "q" for row in aliased[2] for arg in row[4:] if isinstance(arg, list))


class _Runner:
    """A stand-in for a compiled kernel: ``kernel[grid]`` is a runner (replay.py stores it, never calls it here)."""

    def __getitem__(self, grid):
        return lambda *args, stream=None: None


def _build(allocs, launch_args, out):
    from vicinity_attn.kernels import replay
    x = torch.randn(4, 8)
    return replay._build([x], allocs, [(_Runner(), (1, 1, 1), (x, *launch_args))], out, x.device)


def test_a_view_that_reinterprets_the_bytes_is_not_replayed():
    """A view of a fresh buffer as another dtype (whole or in part) cannot be rebuilt by ``as_strided`` (which keeps
    the base's dtype): the recording refuses it; a same-dtype view and the buffer itself are recorded."""
    buffer = torch.empty(16, dtype=torch.float32)
    assert _build([buffer], (buffer, buffer[4:8]), buffer) is not None
    assert _build([buffer], (buffer.view(torch.int32),), buffer) is None
    assert _build([buffer], (buffer[4:8].view(torch.int32),), buffer) is None
    assert _build([buffer], (buffer,), buffer.view(torch.int32)) is None


def test_launch_recording_is_off_on_every_thread():
    """``fast_launch.recording.launches`` reads None on a thread that never set it (no AttributeError in a launch)."""
    from vicinity_attn.kernels import fast_launch
    seen = []
    thread = threading.Thread(target=lambda: seen.append(fast_launch.recording.launches))
    thread.start()
    thread.join()
    assert seen == [None]
