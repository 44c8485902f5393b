"""Every bad call raises a clear ValueError / TypeError naming the argument."""
import pytest
import torch

from vicinity_attn import VicinityAttention, vicinity_attention


def qkv(B=2, H=2, Nq=12, Nk=12, D=4, Dv=4, dtype=torch.float32):
    return (torch.randn(B, H, Nq, D, dtype=dtype), torch.randn(B, H, Nk, D, dtype=dtype),
            torch.randn(B, H, Nk, Dv, dtype=dtype))


CASES = [
    # (description, kwargs/mutator, exception, message fragment)
    ("q not 4-d", lambda q, k, v: dict(q=q[0]), ValueError, "q must be 4-d"),
    ("v not 4-d", lambda q, k, v: dict(v=v[0]), ValueError, "v must be 4-d"),
    ("q not a tensor", lambda q, k, v: dict(q=q.tolist()), TypeError, "q must be a torch.Tensor"),
    ("integer tensor", lambda q, k, v: dict(k=k.long()), TypeError, "k must be a floating tensor"),
    ("mixed dtypes", lambda q, k, v: dict(v=v.double()), TypeError, "share a dtype"),
    ("batch mismatch", lambda q, k, v: dict(k=k[:1], v=v[:1]), ValueError, "batch and head"),
    ("head mismatch", lambda q, k, v: dict(v=v[:, :1]), ValueError, "batch and head"),
    ("Nk mismatch k/v", lambda q, k, v: dict(v=v[:, :, :6]), ValueError, "same number of tokens"),
    ("D mismatch q/k", lambda q, k, v: dict(k=k[..., :3]), ValueError, "same head dim"),
    ("grid product", lambda q, k, v: dict(grid=(3, 5)), ValueError, "grid (3, 5) has 15 tokens"),
    ("kv_grid product", lambda q, k, v: dict(kv_grid=(2, 5)), ValueError, "kv_grid (2, 5) has 10 tokens"),
    ("non-positive axis", lambda q, k, v: dict(grid=(0, 12)), ValueError, "grid sizes must be positive"),
    ("negative axis", lambda q, k, v: dict(kv_grid=(-3, -4)), ValueError, "kv_grid sizes must be positive"),
    ("four axes", lambda q, k, v: dict(grid=(1, 2, 2, 3)), ValueError, "grid must have 1 to 3 axes"),
    ("empty grid", lambda q, k, v: dict(grid=()), ValueError, "grid must have 1 to 3 axes"),
    ("float grid", lambda q, k, v: dict(grid=(3.0, 4)), TypeError, "grid must contain ints"),
    ("grid of wrong type", lambda q, k, v: dict(grid="3x4"), TypeError, "grid must be an int or a sequence"),
    ("kv_grid axes differ", lambda q, k, v: dict(kv_grid=(12,)), ValueError, "kv_grid must have as many axes"),
    ("unknown variant", lambda q, k, v: dict(variant="gaussian"), ValueError, "variant must be one of"),
    ("unknown feature map", lambda q, k, v: dict(feature_map="softmax"), ValueError, "feature_map must be one of"),
    ("unknown layout", lambda q, k, v: dict(layout="bnd"), ValueError, "layout must be one of"),
    ("unknown backend", lambda q, k, v: dict(backend="cuda"), ValueError, "backend must be one of"),
    ("eps zero", lambda q, k, v: dict(eps=0.0), ValueError, "eps must be a positive"),
    ("eps negative", lambda q, k, v: dict(eps=-1e-4), ValueError, "eps must be a positive"),
    ("eps nan", lambda q, k, v: dict(eps=float("nan")), ValueError, "eps must be a positive"),
    ("negative prefix", lambda q, k, v: dict(num_prefix_tokens=-1), ValueError, "num_prefix_tokens must be >= 0"),
    ("prefix makes grid wrong", lambda q, k, v: dict(num_prefix_tokens=1), ValueError, "prefix tokens"),
    ("zero head dim", lambda q, k, v: dict(q=q[..., :0], k=k[..., :0]), ValueError, "head dims must be at least 1"),
]


@pytest.mark.parametrize("desc,mutate,exc,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_calls(desc, mutate, exc, fragment):
    # Validation runs before any backend is chosen, so one backend covers them all.
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v, grid=(3, 4), kv_grid=None, backend="torch")
    args.update(mutate(q, k, v))
    with pytest.raises(exc, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        vicinity_attention(**args)


def test_bnhd_layout_mismatch_names_layout():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="layout 'bnhd'"):
        vicinity_attention(q, k[:, :, :1], v, (2, 6), layout="bnhd")


def test_mixed_devices():
    q, k, v = qkv()
    meta_v = v.to("meta")
    with pytest.raises(ValueError, match="one device"):
        vicinity_attention(q, k, meta_v, (3, 4))


def test_empty_batch_returns_empty_output():
    q, k, v = qkv(B=0, Dv=5)
    for backend in ("torch", "reference"):
        out = vicinity_attention(q, k, v, (3, 4), backend=backend)
        assert out.shape == (0, 2, 12, 5)
    qb, kb, vb = (t.transpose(1, 2).requires_grad_(True) for t in qkv(B=0, Dv=5))
    out = vicinity_attention(qb, kb, vb, (3, 4), layout="bnhd", backend="torch")
    assert out.shape == (0, 12, 2, 5)
    out.sum().backward()
    assert qb.grad.shape == qb.shape


MODULE_CASES = [
    (dict(dim=30, num_heads=4), ValueError, "dim \\(30\\) must be divisible by num_heads \\(4\\)"),
    (dict(dim=0), ValueError, "dim must be a positive int"),
    (dict(dim=32, sr_ratio=0), ValueError, "sr_ratio must be a positive int"),
    (dict(dim=32, variant="cosine"), ValueError, "variant must be one of"),
    (dict(dim=32, feature_map="tanh"), ValueError, "feature_map must be one of"),
    (dict(dim=32, backend="gpu"), ValueError, "backend must be one of"),
    (dict(dim=32, eps=0), ValueError, "eps must be a positive"),
    (dict(dim=32, proj_drop=1.5), ValueError, "proj_drop must be in"),
    (dict(dim=32, attn_drop=-0.1), ValueError, "attn_drop must be in"),
    (dict(dim=32, attn_drop="0.1"), ValueError, "attn_drop must be in"),
    (dict(dim=32, feature_map="identity"), ValueError, "feature_map='identity' needs non-negative features"),
]


@pytest.mark.parametrize("kwargs,exc,fragment", MODULE_CASES)
def test_module_bad_construction(kwargs, exc, fragment):
    with pytest.raises(exc, match=fragment):
        VicinityAttention(**kwargs)


def test_module_bad_forward():
    m = VicinityAttention(32, num_heads=4)
    with pytest.raises(ValueError, match="H \\* W .* must equal the number of tokens"):
        m(torch.randn(2, 20, 32), 4, 4)
    with pytest.raises(ValueError, match="x must have 32 channels"):
        m(torch.randn(2, 16, 16), 4, 4)
    with pytest.raises(ValueError, match="x must be a 3-d tensor"):
        m(torch.randn(16, 32), 4, 4)
    with pytest.raises(ValueError, match="smaller than sr_ratio"):
        VicinityAttention(32, num_heads=4, sr_ratio=4)(torch.randn(1, 6, 32), 2, 3)
