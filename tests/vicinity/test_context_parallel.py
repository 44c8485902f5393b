"""Context parallelism (``vicinity_attention(..., group=...)``, ``VicinityAttention(group=...)``) over gloo
on CPU, against the single-process call, in float64.

Process start-up is the expensive part, so one spawn per world size (2 and 3 processes) runs every case
(:func:`_worker`) and writes each rank's measured errors to a JSON file; the tests below read them. The
triton backend runs in the Triton interpreter (TRITON_INTERPRET=1 reaches the children through the
environment). Rendezvous goes through a file in a temporary directory (no port to pick).
"""
import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.helpers import rel_err
from vicinity_attn import VicinityAttention, vicinity_attention

pytest.importorskip("triton")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

TOL = 1e-12
WORLD_SIZES = (2, 3)

# name -> (world sizes, backend, call keywords, (B, H, D, Dv)). Grids describe the whole sequence.
CASES = {
    "torch-2d-prefix-cross-grid": ((2, 3), "torch", dict(grid=(4, 5), kv_grid=(2, 3), num_prefix_tokens=2),
                                   (2, 2, 8, 6)),
    "torch-1d-floor-none": ((2, 3), "torch", dict(grid=(13,), variant="none", den_floor=3.0, eps=1e-4), (1, 2, 8, 8)),
    "torch-3d-product-elu1-bnhd": ((2, 3), "torch", dict(grid=(2, 2, 3), variant="product", feature_map="elu1",
                                                         num_prefix_tokens=1, layout="bnhd"), (1, 2, 8, 4)),
    "torch-2d-clamp": ((2, 3), "torch", dict(grid=(3, 4), clamp=(1e-3, 1.5)), (1, 2, 8, 8)),
    "torch-2d-identity-cross-grid": ((2, 3), "torch", dict(grid=(4, 3), kv_grid=(2, 3), feature_map="identity",
                                                           num_prefix_tokens=1), (1, 2, 8, 6)),
    "torch-causal-3d-prefix-cross-grid-clamp": ((2, 3), "torch", dict(grid=(4, 3, 2), kv_grid=(4, 2, 1),
                                                                   num_prefix_tokens=2, clamp=(1e-3, 1.5),
                                                                   causal="frames"), (1, 2, 8, 6)),
    "torch-causal-2d-product-floor-bnhd": ((2, 3), "torch", dict(grid=(5, 4), variant="product", den_floor=2.0,
                                                                 causal="frames", layout="bnhd"), (2, 1, 8, 4)),
    "triton-causal-3d-prefix-cross-grid-clamp": ((2, 3), "triton", dict(grid=(4, 2, 3), kv_grid=(4, 1, 2),
                                                                     num_prefix_tokens=1, clamp=(1e-3, 1.5),
                                                                     causal="frames"), (1, 1, 8, 8)),
    "triton-1d-identity": ((2,), "triton", dict(grid=(9,), feature_map="identity"), (1, 1, 8, 8)),
    "triton-2d-prefix-cross-grid": ((2, 3), "triton", dict(grid=(3, 4), kv_grid=(2, 2), num_prefix_tokens=1),
                                    (1, 1, 8, 8)),
    "triton-3d-product-clamp": ((2,), "triton", dict(grid=(2, 2, 3), variant="product", clamp=(1e-3, 1.5)),
                                (1, 1, 8, 8)),
}


def _cuts(n: int, world: int, seed: int, empty_first: bool = False) -> list[int]:
    """world + 1 increasing boundaries 0 .. n: uneven shards, none empty unless ``empty_first`` (then
    rank 0 gets no tokens and the rest are cut unevenly)."""
    if empty_first:
        return [0, *_cuts(n, world - 1, seed)]
    g = torch.Generator().manual_seed(seed)
    inner = sorted(set(torch.randint(1, n, (world - 1,), generator=g).tolist()))
    while len(inner) < world - 1:   # distinct, so that no shard is empty
        inner = sorted(set(inner) | {len(inner) + 1})
    return [0, *inner, n]


def _frame_cuts(grid: tuple[int, ...], prefix: int, world: int) -> list[int]:
    """Token boundaries of uneven spans of whole frames (rank 0: the prefix tokens and frame 0)."""
    frames = {2: [0, 1, grid[0]], 3: [0, 1, 3, grid[0]]}[world]
    per = math.prod(grid[1:])
    return [0] + [prefix + f * per for f in frames[1:]]


def _run_case(name: str, rank: int, world: int) -> dict:
    _, backend, kw, (B, H, D, Dv) = CASES[name]
    kw = dict(kw)
    layout = kw.pop("layout", "bhnd")
    grid, kv_grid = kw.pop("grid"), kw.pop("kv_grid", None)
    P = kw.get("num_prefix_tokens", 0)
    nq, nk = P + math.prod(grid), P + math.prod(kv_grid or grid)
    torch.manual_seed(len(name))   # the same full tensors on every rank
    dims = lambda n, d: (B, H, n, d) if layout == "bhnd" else (B, n, H, d)  # noqa: E731
    q, k, v = (torch.randn(dims(n, d), dtype=torch.float64) for n, d in ((nq, D), (nk, D), (nk, Dv)))
    if kw.get("feature_map") == "identity":   # identity features are meant to be non-negative
        q, k = q.abs(), k.abs()
    do = torch.randn(dims(nq, Dv), dtype=torch.float64)
    axis = 2 if layout == "bhnd" else 1
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    o = vicinity_attention(*full, grid, kv_grid, layout=layout, backend=backend, **kw)
    o.backward(do)
    if kw.get("causal"):   # frame-causal: every rank holds whole frames, the same ones of q and k
        qc, kc = _frame_cuts(grid, P, world), _frame_cuts(kv_grid or grid, P, world)
    else:   # q and k cut at different places; world 3 gives one rank no keys in the empty-shard case
        qc = _cuts(nq, world, seed=7 * world)
        kc = _cuts(nk, world, seed=11 * world + 1, empty_first=world == 3 and name == "torch-2d-prefix-cross-grid")
    sl = lambda t, c: t.narrow(axis, c[rank], c[rank + 1] - c[rank])  # noqa: E731
    local = [sl(t, c).detach().clone().requires_grad_() for t, c in zip((q, k, v), (qc, kc, kc))]
    results = []
    # torch cases run twice: run-to-run bitwise reproducibility (of the all-reduce and the shard pieces;
    # the kernels' own determinism is tested in test_triton_backend.py, and the interpreter is slow)
    for _ in range(2 if backend == "torch" else 1):
        for t in local:
            t.grad = None
        ol = vicinity_attention(*local, grid, kv_grid, layout=layout, backend=backend, group=dist.group.WORLD, **kw)
        ol.backward(sl(do, qc))
        results.append([ol.detach().clone()] + [t.grad.clone() for t in local])
    if name == "torch-2d-prefix-cross-grid":   # offsets passed by the caller: no exchange, the same result
        for t in local:
            t.grad = None
        ol = vicinity_attention(*local, grid, kv_grid, layout=layout, backend=backend, group=dist.group.WORLD,
                                token_offsets=(qc[rank], kc[rank]), **kw)
        ol.backward(sl(do, qc))
        results.append([ol.detach().clone()] + [t.grad.clone() for t in local])
    ol, dq, dk, dv = results[0]
    errors = {"o": rel_err(ol, sl(o.detach(), qc)) if ol.numel() else 0.0,
              "dq": rel_err(dq, sl(full[0].grad, qc)) if dq.numel() else 0.0,
              "dk": rel_err(dk, sl(full[1].grad, kc)) if dk.numel() else 0.0,
              "dv": rel_err(dv, sl(full[2].grad, kc)) if dv.numel() else 0.0}
    repeat = all(torch.equal(a, b) for r in results[1:] for a, b in zip(results[0], r)) if len(results) > 1 else None
    return {"errors": errors, "bitwise_repeat": repeat,
            "q_len": qc[rank + 1] - qc[rank], "k_len": kc[rank + 1] - kc[rank]}


def _cross_rank_identical_states(world: int) -> bool:
    """The summed states are bitwise the same on every rank (what the all-reduce hands out)."""
    from vicinity_attn.vicinity.context_parallel import all_reduce_states
    torch.manual_seed(100 + dist.get_rank())
    S, z, _ = all_reduce_states(torch.randn(2, 4, 8, 8, dtype=torch.float64),
                                torch.randn(2, 4, 8, dtype=torch.float64), dist.group.WORLD)
    flat = torch.cat([S.reshape(-1), z.reshape(-1)])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _expect_error(fn, exc_type, *words) -> str:
    try:
        fn()
    except exc_type as exc:
        missing = [w for w in words if w not in str(exc)]
        return "ok" if not missing else f"message lacks {missing}: {exc}"
    return "no error"


def _validation(rank: int, world: int) -> dict:
    q = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    out = {}
    # The shards add up to 3 * world tokens, not the grid's.
    out["wrong_total"] = _expect_error(lambda: vicinity_attention(q, q, q, (3 * world + 1,), group=dist.group.WORLD,
                                                                  backend="torch"), ValueError, "grid", "q shards")
    out["not_a_group"] = _expect_error(lambda: vicinity_attention(q, q, q, (3 * world,), group="world",
                                                                  backend="torch"), TypeError, "group")
    past_end = (3 * world - 2, 0)   # this rank's 3 queries would end past the 3 * world of the grid
    out["offsets_past_end"] = _expect_error(lambda: vicinity_attention(q, q, q, (3 * world,), group=dist.group.WORLD,
                                                                       backend="torch", token_offsets=past_end),
                                            ValueError, "token_offsets")
    # Calls that differ between ranks: the same ValueError on every rank, naming what differs.
    cp = lambda a, b, c, grid, **kw: vicinity_attention(a, b, c, grid, group=dist.group.WORLD,  # noqa: E731
                                                        backend="torch", **kw)
    qd = torch.randn(1, 1, 3, 4 + rank, dtype=torch.float64)
    out["differ_head_dim"] = _expect_error(lambda: cp(qd, qd, qd, (3 * world,)), ValueError, "head dim", "differ")
    qt = q if rank else q.float()
    out["differ_dtype"] = _expect_error(lambda: cp(qt, qt, qt, (3 * world,)), ValueError, "dtype", "differ")
    grid = (3 * world,) if rank else (world, 3)   # the same token count, another grid
    out["differ_grid"] = _expect_error(lambda: cp(q, q, q, grid), ValueError, "grid", "differ")
    out["differ_option"] = _expect_error(lambda: cp(q, q, q, (3 * world,), eps=1e-4 if rank else 1e-3), ValueError,
                                         "options", "differ")
    out["reference"] = _expect_error(lambda: vicinity_attention(q, q, q, (3 * world,), group=dist.group.WORLD,
                                                                backend="reference"), ValueError, "backend")
    # sr_ratio = 2 on a 4 x 6 grid: shards must be whole multiples of 2 rows (12 tokens); 5 tokens each is not.
    layer = VicinityAttention(8, 2, sr_ratio=2, backend="torch", group=dist.group.WORLD).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    out["sr_misaligned"] = _expect_error(lambda: layer(x, 4, 6), ValueError, "sr_ratio", "rank 0")
    # Frame-causal: shards of 3, 1 (and 2) tokens on frames of 2 tokens: rank 0 holds a frame and a half.
    qf = torch.randn(1, 1, [3, 1, 2][rank], 4, dtype=torch.float64)
    out["causal_misaligned"] = _expect_error(lambda: cp(qf, qf, qf, (world, 2), causal="frames"), ValueError,
                                             "whole frames", "rank 0")
    return out


class _TinyModel(nn.Module):
    """Embedding, a VicinityAttention layer (prefix token, spatial reduction), a per-token head."""

    def __init__(self, group=None):
        super().__init__()
        self.embed = nn.Linear(3, 16)
        self.attn = VicinityAttention(16, 2, sr_ratio=2, num_prefix_tokens=1, backend="torch", group=group)
        self.head = nn.Linear(16, 2)

    def forward(self, x, H, W):
        return self.head(torch.relu(self.attn(self.embed(x), H, W)))


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def _ddp_training(rank: int, world: int) -> dict:
    """Two SGD steps of _TinyModel under DistributedDataParallel, against one process: (a) data parallel
    (each rank half the batch), (b) context parallel under DDP (each rank a shard of every sequence,
    whole blocks of sr_ratio rows; DDP averages over ranks, so the local loss is scaled by the group size)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    H, W, B, steps = 4, 6, 4, 2
    torch.manual_seed(0)
    xs = [torch.randn(B, 1 + H * W, 3, dtype=torch.float64) for _ in range(steps)]
    ys = [torch.randn(B, 1 + H * W, 2, dtype=torch.float64) for _ in range(steps)]
    torch.manual_seed(1)
    single = _TinyModel().double()
    state = {k: v.clone() for k, v in single.state_dict().items()}
    opt = torch.optim.SGD(single.parameters(), lr=0.1)
    want = []
    for x, y in zip(xs, ys):
        opt.zero_grad()
        ((single(x, H, W) - y) ** 2).mean().backward()
        want.append(_grads(single))
        opt.step()

    out = {}
    cp_group = dist.new_group(list(range(world)))
    # rank shards of the 25 tokens: the prefix token plus whole blocks of 2 rows (12 tokens)
    bounds = [0, 13, 25] if world == 2 else [0, 1, 13, 25]
    for mode in ("dp", "cp"):
        model = _TinyModel(group=cp_group if mode == "cp" else None).double()
        model.load_state_dict(state)
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        err = 0.0
        for step, (x, y) in enumerate(zip(xs, ys)):
            opt.zero_grad()
            if mode == "dp":
                part = slice(rank * B // world, (rank + 1) * B // world)
                loss = ((ddp(x[part], H, W) - y[part]) ** 2).mean()
            else:
                part = slice(bounds[rank], bounds[rank + 1])
                loss = ((ddp(x[:, part], H, W) - y[:, part]) ** 2).sum() / y.numel() * world
            loss.backward()
            err = max(err, max(rel_err(g, w) for g, w in zip(_grads(model), want[step])))
            opt.step()
        out[mode] = err
    return out


def _vvt_layer(rank: int, world: int) -> dict:
    """The authors' VVT layer (SE gate, spatial reduction, clamp) with group=...: this rank's rows of the
    output, the input gradient and the parameter gradients summed over ranks, against one process."""
    from vicinity_attn.layers import VicinityVisionAttention
    H, W = 6, 4
    torch.manual_seed(3)
    layer = VicinityVisionAttention(16, 2, sr_ratio=2, backend="torch").double()
    x = torch.randn(2, H * W, 16, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, H * W, 16, dtype=torch.float64)
    layer(x, H, W).backward(dy)
    want = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    bounds = [0, 8, 24] if world == 2 else [0, 8, 16, 24]   # whole blocks of sr_ratio = 2 rows
    part = slice(bounds[rank], bounds[rank + 1])
    cp_layer = VicinityVisionAttention(16, 2, sr_ratio=2, backend="torch", group=dist.group.WORLD).double()
    cp_layer.load_state_dict(layer.state_dict())
    xl = x.detach()[:, part].clone().requires_grad_()
    yl = cp_layer(xl, H, W)
    yl.backward(dy[:, part])
    grads = [p.grad.clone() for p in cp_layer.parameters()]
    for g in grads:
        dist.all_reduce(g)
    with torch.no_grad():
        y = layer(x, H, W)
    return {"out": rel_err(yl, y[:, part]), "dx": rel_err(xl.grad, x.grad[:, part]),
            "params": max(rel_err(g, w) for g, w in zip(grads, want))}


def _copies(rank: int, world: int) -> dict:
    """Modules holding the group: deepcopy (an EMA copy) shares the group and gives the same rows;
    pickle stores group=None; neither fails."""
    import copy
    import io

    from vicinity_attn.layers import VicinityVisionAttention
    out = {}
    torch.manual_seed(5)
    for name, make in (("VicinityAttention", lambda: VicinityAttention(8, 2, sr_ratio=2, backend="torch",
                                                                       group=dist.group.WORLD)),
                       ("VicinityVisionAttention", lambda: VicinityVisionAttention(8, 2, sr_ratio=2, backend="torch",
                                                                                   group=dist.group.WORLD))):
        try:
            layer = nn.Sequential(make()).double()
            twin = copy.deepcopy(layer)
            buffer = io.BytesIO()
            torch.save(layer, buffer)
            buffer.seek(0)
            loaded = torch.load(buffer, weights_only=False)
        except Exception as exc:   # noqa: BLE001 (reported to the test)
            out[name] = f"{type(exc).__name__}: {exc}"
            continue
        H, W = 2 * world, 4   # rank r holds rows 2r, 2r + 1 (one block of sr_ratio rows)
        xl = torch.randn(1, H * W, 8, dtype=torch.float64)[:, 2 * W * rank:2 * W * (rank + 1)]
        same = torch.equal(layer[0](xl, H, W), twin[0](xl, H, W))
        weights = all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(), loaded.state_dict().values()))
        out[name] = ("ok" if twin[0].group is layer[0].group and loaded[0].group is None and same and weights
                     else f"group shared {twin[0].group is layer[0].group}, saved {loaded[0].group}, same {same}")
    return out


def _overflow(rank: int, world: int) -> dict:
    """Issue 25, class 3 over ranks: overflow raises the same OverflowError on every rank, forward and
    backward; a NaN input on one rank propagates (no error on any rank)."""
    out = {}
    n = 16 * world

    def shards(scale: float, nan_on: int | None = None, q_scale: float | None = None):
        torch.manual_seed(11)   # the same full tensors on every rank
        full = [torch.randn(1, 2, n, 8) * (scale if i or q_scale is None else q_scale) for i in range(3)]
        if nan_on is not None:
            full[2][0, 0, 16 * nan_on + 3, 1] = float("nan")
        return [t[:, :, 16 * rank:16 * (rank + 1)].clone().requires_grad_() for t in full]

    for backend in ("torch", "triton"):
        q, k, v = shards(1e20, q_scale=1.0)     # |k| |v| ~ 1e40: the summed states overflow float32
        out[f"{backend} states"] = _expect_error(
            lambda: vicinity_attention(q, k, v, (world, 16), backend=backend, group=dist.group.WORLD),
            OverflowError, "forward", "summed over the ranks")
    q, k, v = shards(1e14)          # states in range (scaled by 1 / N), the numerators not
    out["numerators"] = _expect_error(
        lambda: vicinity_attention(q, k, v, (world, 16), backend="torch", group=dist.group.WORLD),
        OverflowError, "forward", "this rank's results")
    q, k, v = shards(1e11)          # the forward in range, the gradient of a huge dO is not
    o = vicinity_attention(q, k, v, (world, 16), backend="torch", group=dist.group.WORLD)
    out["forward in range"] = "ok" if bool(o.isfinite().all()) else "non-finite"
    out["backward"] = _expect_error(lambda: torch.autograd.grad(o, (q, k, v), torch.full_like(o, 3e38)),
                                    OverflowError, "backward")
    q, k, v = shards(1.0, nan_on=world - 1)
    try:
        o = vicinity_attention(q, k, v, (world, 16), backend="torch", group=dist.group.WORLD)
        out["nan propagates"] = "ok" if bool(o.isnan().any()) else "no NaN"
    except Exception as exc:   # noqa: BLE001 (reported to the test)
        out["nan propagates"] = f"{type(exc).__name__}: {exc}"
    return out


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        report = {"cases": {name: _run_case(name, rank, world) for name, case in CASES.items() if world in case[0]},
                  "cross_rank_identical": _cross_rank_identical_states(world),
                  "validation": _validation(rank, world), "vvt": _vvt_layer(rank, world),
                  "copies": _copies(rank, world), "overflow": _overflow(rank, world)}
        if world == 2:
            report["ddp"] = _ddp_training(rank, world)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"world{w}")
def world(request, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp(f"cp{request.param}")
    mp.spawn(_worker, args=(request.param, str(out_dir / "store"), str(out_dir)), nprocs=request.param)
    reports = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(request.param)]
    return request.param, reports


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_gradients_equal_the_single_process_call(world, case):
    size, reports = world
    if size not in CASES[case][0]:
        pytest.skip(f"{case} runs on {CASES[case][0]} processes")
    for rank, report in enumerate(reports):
        res = report["cases"][case]
        bad = {k: e for k, e in res["errors"].items() if not e <= TOL}
        assert not bad, (rank, res)
        assert res["bitwise_repeat"] in (True, None), (rank, "a second identical call differed")
    lengths = [r["cases"][case]["q_len"] for r in reports]
    assert len(set(lengths)) > 1 or size == 1, lengths   # uneven shards were really used


def test_states_are_bitwise_identical_on_every_rank(world):
    _, reports = world
    assert all(r["cross_rank_identical"] for r in reports)


def test_bad_calls_name_the_argument(world):
    _, reports = world
    for report in reports:
        assert report["validation"] == {k: "ok" for k in report["validation"]}, report["validation"]


def test_ddp_training_gradients_equal_one_process(world):
    size, reports = world
    if size != 2:
        pytest.skip("the DistributedDataParallel run uses 2 processes")
    for report in reports:
        assert report["ddp"]["dp"] <= TOL and report["ddp"]["cp"] <= TOL, report["ddp"]


def test_vvt_layer_equals_one_process(world):
    _, reports = world
    for report in reports:
        assert max(report["vvt"].values()) <= TOL, report["vvt"]


def test_modules_holding_a_group_copy_and_pickle(world):
    _, reports = world
    for report in reports:
        assert report["copies"] == {k: "ok" for k in report["copies"]}, report["copies"]


def test_overflow_raises_on_every_rank(world):
    _, reports = world
    for report in reports:
        assert report["overflow"] == {k: "ok" for k in report["overflow"]}, report["overflow"]


def test_group_without_torch_distributed_initialised():
    if dist.is_initialized():
        pytest.skip("this process has torch.distributed initialised")
    q = torch.randn(1, 1, 4, 4)
    with pytest.raises(RuntimeError, match="group was given but torch.distributed is not initialised"):
        vicinity_attention(q, q, q, (2, 2), group=object())
