"""pytest-benchmark benchmarks of the torch backend against the ``authors`` baseline (CPU, fp32).

Not part of the default test run: the file name does not match ``test_*.py`` and it lives outside
``tests/``, so ``python -m pytest tests`` (the README's command) and a bare ``pytest`` never collect
it. Run it explicitly from the repository root:

    python -m pytest bench/bench_pytest.py --benchmark-columns=median,iqr,rounds --benchmark-sort=name

(``--benchmark-save=NAME`` / ``--benchmark-compare`` keep and compare runs.) Every benchmark also
checks that the two implementations agree, so a fast wrong answer cannot pass.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

_REPO = str(Path(__file__).resolve().parents[1])
if _REPO not in sys.path:  # run from anywhere: bench/ is used from a checkout, not installed
    sys.path.insert(0, _REPO)

from bench.cases import Case  # noqa: E402
from bench.flops import mode_flops  # noqa: E402
from bench.providers import make_inputs, make_provider  # noqa: E402
from bench.runner import mode_callable  # noqa: E402

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cpu")
SIDES = (28, 56, 112)
PROVIDERS = ("vicinity-torch", "authors")


@pytest.mark.parametrize("mode", ("fwd", "fwdbwd"))
@pytest.mark.parametrize("side", SIDES, ids=lambda s: f"{s}x{s}")
@pytest.mark.parametrize("provider_name", PROVIDERS)
def test_torch_vs_authors(benchmark, provider_name, side, mode):
    """Median time of one call; FLOPs and GFLOP/s (of the median) go into the benchmark's extra_info."""
    case = Case((side, side), batch=1, heads=4, dim=64, dim_v=64)
    provider = make_provider(provider_name, case, DEVICE, torch.float32)
    q, k, v = make_inputs(provider, case, DEVICE, torch.float32, requires_grad=True)
    fn = mode_callable(provider, mode, q, k, v)
    benchmark.group = f"{mode} {side}x{side}"
    benchmark.pedantic(fn, warmup_rounds=1, rounds=max(3, 768 // side), iterations=1)
    flops = mode_flops(provider.forward_flops, provider.kind, mode)
    if benchmark.stats is not None:   # None under --benchmark-disable (a plain correctness run)
        benchmark.extra_info.update(flops=flops, label=provider.label,
                                    gflops_per_s=flops / benchmark.stats.stats.median / 1e9)


@pytest.mark.parametrize("side", SIDES, ids=lambda s: f"{s}x{s}")
def test_torch_and_authors_agree(side):
    """The two benchmarked implementations compute the same thing (fp32, relative to the output scale)."""
    case = Case((side, side), batch=1, heads=4, dim=64, dim_v=64)
    outs = []
    for name in PROVIDERS:
        provider = make_provider(name, case, DEVICE, torch.float32)
        q, k, v = make_inputs(provider, case, DEVICE, torch.float32, requires_grad=False)
        outs.append(provider.fn(q, k, v))
    err = (outs[0] - outs[1]).abs().max() / outs[1].abs().max()
    assert err < 1e-4
