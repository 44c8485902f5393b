"""k-NN attention with NaN / +inf / -inf in q, k or v (docs/knn.md, "Non-finite inputs"): every backend
has the reference's NaN and inf pattern exactly, in the output and in dq, dk, dv, and its finite values
by the tolerance rule; the reference itself follows the stated rules. topk below and equal to the key
count, rows of one and of two key tiles (the interpreter's key tile is 64: kernels/knn/configs.py) and
two query-row blocks (16 rows), the bad value in the first or the last tokens.
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_rule, knn_outputs_and_grads
from vicinity_attn import knn_attention
from vicinity_attn.knn.reference import knn_keep_mask

# The interpreter runs the kernels in numpy, which warns at every inf - inf and 0 * inf: here they are the point.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning",
                                        "ignore:All-NaN slice encountered:RuntimeWarning")

NAN, INF = float("nan"), float("inf")
VALUES = {"nan": NAN, "+inf": INF, "-inf": -INF}
CASES = [(which, name) for which in "qkv" for name in VALUES]
NQ = 20          # two row blocks of the interpreter's 16


def _inputs(which: str, value: float, nk: int, where: str, seed: int, dtype=torch.float64):
    """Fresh q, k, v, dO with one entry of ``which`` set to ``value``, at a random token among the first or
    the last 16 (``where``) and a random head-dim index."""
    g = torch.Generator().manual_seed(seed)
    B, H, D, Dv = 1, 2, 8, 6
    q = torch.randn(B, H, NQ, D, dtype=torch.float64, generator=g)
    k = torch.randn(B, H, nk, D, dtype=torch.float64, generator=g)
    v = torch.randn(B, H, nk, Dv, dtype=torch.float64, generator=g)
    do = torch.randn(B, H, NQ, Dv, dtype=torch.float64, generator=g)
    target = {"q": q, "k": k, "v": v}[which]
    n = target.shape[2]
    token = int(torch.randint(16, (1,), generator=g)) + (0 if where == "start" else n - 16)
    head, dim = (int(torch.randint(m, (1,), generator=g)) for m in (H, target.shape[3]))
    target[0, head, token, dim] = value
    return [t.to(dtype) for t in (q, k, v, do)]


def _run(backend, q, k, v, do, topk):
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    return [t.detach() for t in knn_outputs_and_grads(q, k, v, do, topk, backend=backend)]


def _assert_same_pattern(name, got, ref):
    """NaN and inf at exactly the reference's entries (inf with its sign)."""
    assert torch.equal(got.isnan(), ref.isnan()), \
        f"{name}: NaN at {int(got.isnan().sum())} entries, the reference at {int(ref.isnan().sum())}"
    assert torch.equal(got.isinf(), ref.isinf()), \
        f"{name}: inf at {int(got.isinf().sum())} entries, the reference at {int(ref.isinf().sum())}"
    assert torch.equal(got[got.isinf()], ref[ref.isinf()]), f"{name}: the signs of inf differ"


def _check(backend, q, k, v, do, topk):
    """``backend`` against the float64 reference: the same non-finite pattern, finite values by the rule."""
    dtype = q.dtype
    ref = _run("reference", *(t.double() for t in (q, k, v, do)), topk)
    plain = ref if dtype == torch.float64 else _run("reference", q, k, v, do, topk)
    got = _run(backend, q, k, v, do, topk)
    assert any(not r.isfinite().all() for r in ref), "the case must put a NaN / inf somewhere"
    for name, g, r, p in zip(("out", "dq", "dk", "dv"), got, ref, plain):
        assert g.dtype == dtype and g.shape == r.shape, name
        _assert_same_pattern(name, g, r)
        finite = r.isfinite()
        if r[finite].numel() and r[finite].abs().max() > 0:
            assert_rule(name, g[finite], r[finite], p[finite].double().nan_to_num(), dtype)
        else:
            # All 0 (topk = 1: the softmax is the constant 1): what is left is rounding of dO.v_j - dO.o_i.
            size = 1.0
            for x in (q, k, v, do):
                size *= x[x.isfinite()].abs().max().item()
            bound = 16 * torch.finfo(dtype).eps * size * v.shape[-1]
            assert g[finite].abs().max().item() <= bound, name


# Every case on torch; on triton (the interpreter: ~3 s a case) each value case once, the (topk, position)
# pairs taken in turn, so that every pair and every value is still run through the kernels.
_PAIRS = [(topk_of, where) for topk_of in ("below", "all") for where in ("start", "end")]
TWO_TILE_CASES = (
    [("torch", which, value, topk_of, where) for which, value in CASES for topk_of, where in _PAIRS]
    + [("triton", which, value, *_PAIRS[i % len(_PAIRS)]) for i, (which, value) in enumerate(CASES)])


@pytest.mark.parametrize("backend,which,value,topk_of,where", TWO_TILE_CASES,
                         ids=["-".join((f"{w}={n}", t, p, b)) for b, w, n, t, p in TWO_TILE_CASES])
def test_two_key_tiles_match_reference(backend, which, value, topk_of, where):
    """Rows of 80 keys: two key tiles (the selection pass recomputes the scores per bisection step)."""
    nk = 80
    q, k, v, do = _inputs(which, VALUES[value], nk, where, seed=len(which + value + topk_of + where))
    _check(backend, q, k, v, do, 9 if topk_of == "below" else nk)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("topk_of", ["below", "all"])
@pytest.mark.parametrize("which,value", CASES, ids=[f"{w}={n}" for w, n in CASES])
def test_one_key_tile_matches_reference(backend, which, value, topk_of):
    """Rows of 24 keys: one key tile (the selection pass holds the row on chip)."""
    nk = 24
    q, k, v, do = _inputs(which, VALUES[value], nk, "start", seed=7)
    _check(backend, q, k, v, do, 5 if topk_of == "below" else nk)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("which,value", [("q", "nan"), ("k", "+inf"), ("v", "-inf")])
def test_float32_matches_reference(backend, which, value):
    """float32 inputs against the float64 reference: the same pattern, finite values by the rule."""
    q, k, v, do = _inputs(which, VALUES[value], 80, "end", seed=3, dtype=torch.float32)
    _check(backend, q, k, v, do, 9)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_key_tile_of_only_minus_inf_scores(backend):
    """topk = Nk and the first key tile all -inf for some rows: tau = -inf, every key kept, and the row's
    softmax runs over the finite scores of the second tile (finite output)."""
    q, k, v, do = _inputs("v", 0.0, 80, "start", seed=11)
    q[..., 0] = q[..., 0].abs() + 0.1
    k[:, :, :64, 0] = -INF
    ref = _run("reference", q, k, v, do, 80)
    assert ref[0].isfinite().all()
    _check(backend, q, k, v, do, 80)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("nk", [24, 80])
def test_row_of_only_minus_inf_scores_is_nan(backend, nk):
    """A row whose scores are all -inf is NaN (the reference's softmax of an all -inf row)."""
    q, k, v, do = _inputs("v", 0.0, nk, "start", seed=12)
    q[0, 1, 3, 2] = -INF
    k[..., 2] = k[..., 2].abs() + 0.1
    ref = _run("reference", q, k, v, do, 4)
    assert ref[0][0, 1, 3].isnan().all() and ref[0][0, 1, :3].isfinite().all()
    _check(backend, q, k, v, do, 4)


@pytest.mark.parametrize("which,value", CASES, ids=[f"{w}={n}" for w, n in CASES])
def test_reference_follows_the_rules(which, value):
    """The rules of docs/knn.md on the reference, from the float64 scores: o_i is all NaN exactly where
    row i keeps a NaN or +inf score or only -inf ones; a NaN row makes every dv of its head NaN; a NaN
    score is always kept; at a non-finite tau every key not below it is kept (the whole row at a NaN tau);
    elsewhere exactly topk keys."""
    topk = 9
    q, k, v, do = _inputs(which, VALUES[value], 80, "end", seed=5)
    out, _, _, dv = _run("reference", q, k, v, do, topk)
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    keep = knn_keep_mask(s, topk)
    nan_row = (keep & (s.isnan() | (s == INF))).any(-1) | (s == -INF).all(-1)
    if which != "v":
        assert nan_row.any()
    row_is_nan = out.isnan().all(-1)
    if which == "v":     # a NaN / inf value reaches every row through p v (0 * inf = NaN, 0 * NaN = NaN)
        assert not nan_row.any() and out.isnan().any()
    else:
        assert torch.equal(row_is_nan, nan_row) and out[~nan_row].isfinite().all()
        heads_with_nan_rows = nan_row.any(-1)
        assert torch.equal(dv.isnan().all(-1).all(-1), heads_with_nan_rows)
    assert keep[s.isnan()].all()
    sorted_s = torch.sort(s.masked_fill(s.isnan(), INF), dim=-1, descending=True).values
    tau = sorted_s[..., topk - 1: topk]
    n_nan = s.isnan().sum(-1, keepdim=True)
    tau = tau.masked_fill(n_nan >= topk, NAN)
    nonfinite = ~tau.isfinite()
    not_below = ~(s < tau)
    assert torch.equal(keep & nonfinite, not_below & nonfinite)
    assert (keep.sum(-1, keepdim=True)[~nonfinite] == topk).all()


def test_reference_nan_order_does_not_depend_on_the_sign_of_nan():
    """A NaN with the sign bit set (what inf - inf gives on x86) ranks as high as any other NaN."""
    s = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    for nan in (NAN, -NAN, torch.tensor(INF) - torch.tensor(INF)):
        t = s.clone()
        t[0, 0] = nan
        assert knn_keep_mask(t, 2).tolist() == [[True, False, False, True]]
        assert knn_keep_mask(t, 3).tolist() == [[True, False, True, True]]
        assert knn_keep_mask(t, 1).tolist() == [[True] * 4]      # tau = NaN: nothing is below it


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_finite_rows_unaffected_by_a_nan_row(backend):
    """A NaN in one query row leaves every other row's output finite and equal to the reference's."""
    q, k, v, do = _inputs("q", NAN, 80, "start", seed=21)
    out = knn_attention(q, k, v, 9, backend=backend)
    ref = knn_attention(q, k, v, 9, backend="reference")
    bad = out.isnan().all(-1)
    assert bad.sum() == 1 and out[~bad].isfinite().all()
    torch.testing.assert_close(out[~bad], ref[~bad], rtol=1e-10, atol=1e-12)


class _RaisedTau:
    """The real selection pass, then tau of one query row raised above every finite score of the row, as if
    a later pass had computed the row's scores otherwise: the forward pass keeps no finite key there."""

    def __init__(self, kernel, bh: int, row: int, scores: torch.Tensor):
        self.kernel, self.bh, self.row, self.scores = kernel, bh, row, scores

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(q, k, tau, *args, **kwargs):
            launch(q, k, tau, *args, **kwargs)
            finite = self.scores[self.bh, self.row].nan_to_num(nan=-INF)
            tau[self.bh, self.row] = finite.max() + 1.0
        return run


def _raise_tau(monkeypatch, q, k, bh, row):
    from vicinity_attn.kernels.knn import launch

    scores = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).flatten(0, 1)
    monkeypatch.setattr(launch, "knn_threshold_kernel", _RaisedTau(launch.knn_threshold_kernel, bh, row, scores))


@pytest.mark.parametrize("nk", [24, 80])
def test_triton_row_keeping_no_key_is_zero_not_nan(monkeypatch, nk):
    """Issue 24: a row that keeps no key gets o = 0 and no gradient (lse = +inf, so p = 0), not 0 / 0; every
    other row, and dk / dv from them, are the reference's."""
    bh, row = 1, 17
    q, k, v, do = _inputs("v", 0.0, nk, "start", seed=31)
    _raise_tau(monkeypatch, q, k, bh, row)
    out, dq, dk, dv = _run("triton", q, k, v, do, 6)
    do_without_row = do.clone()
    do_without_row[0, bh, row] = 0
    ref_out, ref_dq, ref_dk, ref_dv = _run("reference", q, k, v, do_without_row, 6)
    assert torch.equal(out[0, bh, row], torch.zeros_like(out[0, bh, row]))
    assert torch.equal(dq[0, bh, row], torch.zeros_like(dq[0, bh, row]))
    others = torch.ones(out.shape[:3], dtype=torch.bool)
    others[0, bh, row] = False
    for name, g, r in (("out", out[others], ref_out[others]), ("dq", dq[others], ref_dq[others]),
                       ("dk", dk, ref_dk), ("dv", dv, ref_dv)):
        assert g.isfinite().all(), name
        assert_rule(name, g, r, r, torch.float64)


def test_triton_guard_keeps_a_nan_row_nan(monkeypatch):
    """The guard of a row with no finite key kept does not hide a NaN: a row with NaN scores keeps them
    (NaN is always kept) and stays NaN, forward and gradients, whatever tau says."""
    bh, row = 0, 4
    q, k, v, do = _inputs("v", 0.0, 80, "start", seed=32)
    q[0, bh, row, 3] = NAN
    ref = _run("reference", q, k, v, do, 6)
    _raise_tau(monkeypatch, q, k, bh, row)
    got = _run("triton", q, k, v, do, 6)
    assert got[0][0, bh, row].isnan().all()
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        _assert_same_pattern(name, g, r)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("nk", [24, 80])
def test_nan_filling_the_top_k_keeps_the_whole_row(backend, nk):
    """topk = 1 and a NaN in k: every row's top-1 is the NaN, tau is NaN, and nothing is below a NaN tau, so
    every row keeps every key (every dk NaN), in every backend as in the reference."""
    q, k, v, do = _inputs("k", NAN, nk, "end", seed=41)
    ref = _run("reference", q, k, v, do, 1)
    assert ref[2][0, 0].isnan().all() or ref[2][0, 1].isnan().all()
    _check(backend, q, k, v, do, 1)


@pytest.mark.parametrize("which,value", CASES, ids=[f"{w}={n}" for w, n in CASES])
def test_torch_backend_several_row_blocks(monkeypatch, which, value):
    """The torch backend over blocks of 3 query rows (7 blocks), forward and backward."""
    from vicinity_attn.knn import torch_backend as knn_torch

    monkeypatch.setattr(knn_torch, "BLOCK_ELEMENTS", 2 * 3 * 80)
    assert len(knn_torch.row_blocks(2, NQ, 80)) == 7
    q, k, v, do = _inputs(which, VALUES[value], 80, "end", seed=51)
    _check("torch", q, k, v, do, 9)


# The tangent is computed in PyTorch on every backend (vicinity_attn/knn/tangent.py); triton only adds its
# primal (~6 s a case in the interpreter): every case on torch, one per input with both topks on triton.
TANGENT_CASES = ([("torch", which, value, topk) for which, value in CASES for topk in (9, 80)]
                 + [("triton", "q", "nan", 9), ("triton", "k", "+inf", 80), ("triton", "v", "-inf", 9)])


@pytest.mark.parametrize("backend,which,value,topk", TANGENT_CASES,
                         ids=[f"{w}={n}-{t}-{b}" for b, w, n, t in TANGENT_CASES])
def test_forward_mode_tangent_matches_reference(backend, which, value, topk):
    """torch.func.jvp: the tangent has the reference's NaN / inf pattern and its finite values."""
    q, k, v, _ = _inputs(which, VALUES[value], 80, "end", seed=5)
    g = torch.Generator().manual_seed(1)
    tangents = tuple(torch.randn(x.shape, dtype=x.dtype, generator=g) for x in (q, k, v))

    def tangent(name):
        return torch.func.jvp(lambda *x: knn_attention(*x, topk, backend=name), (q, k, v), tangents)[1]
    ref, got = tangent("reference"), tangent(backend)
    assert not ref.isfinite().all()
    _assert_same_pattern("tangent", got, ref)
    finite = ref.isfinite()
    assert_rule("tangent", got[finite], ref[finite], ref[finite], torch.float64)
