"""Non-strided tensors (sparse, mkldnn, nested) are rejected by validation, naming the argument, for
every backend and for the module, before any backend touches their storage."""
import warnings

import pytest
import torch

from vicinity_attn import VicinityAttention, vicinity_attention

GRID = (3, 4)


def _qkv():
    return torch.randn(1, 2, 12, 4), torch.randn(1, 2, 12, 4), torch.randn(1, 2, 12, 4)


def _converters():
    out = [("sparse_coo", lambda t: t.to_sparse()), ("sparse_csr", lambda t: t.flatten(0, 2).to_sparse_csr()),
           ("nested", lambda t: torch.nested.nested_tensor(list(t.unbind(0))))]
    if torch.backends.mkldnn.is_available():
        out.append(("mkldnn", lambda t: t.to_mkldnn()))
    return out


@pytest.mark.parametrize("kind,convert", _converters(), ids=[c[0] for c in _converters()])
@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "reference"])
def test_non_strided_tensor_is_named(kind, convert, name, backend):
    args = dict(zip("qkv", _qkv()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # "sparse CSR / nested tensors are in beta" warnings
        args[name] = convert(args[name])
    with pytest.raises(TypeError, match=rf"^{name} must be a dense \(strided\) tensor, got a {kind} tensor"):
        vicinity_attention(args["q"], args["k"], args["v"], GRID, backend=backend)


@pytest.mark.parametrize("kind,convert", [c for c in _converters() if c[0] != "nested"],
                         ids=[c[0] for c in _converters() if c[0] != "nested"])
def test_module_rejects_non_strided_input(kind, convert):
    layer = VicinityAttention(dim=8, num_heads=2, backend="torch")
    x = torch.randn(1, 12, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bad = convert(x) if kind != "sparse_csr" else x.to_sparse_csr(dense_dim=1)
    with pytest.raises(TypeError, match=rf"^x must be a dense \(strided\) tensor, got a {kind} tensor"):
        layer(bad, 3, 4)
