"""Benchmarks of vicinity attention against FlashAttention-style softmax attention.

Run ``python -m bench --help`` from the repository root. Modules, one job each:

- :mod:`bench.flops`     the FLOP formulas every row's FLOP/s is computed from;
- :mod:`bench.authors`   the authors' formulation (4x-expanded features), written here as a baseline;
- :mod:`bench.providers` what is benchmarked: vicinity (best backend), vicinity-torch, authors,
  flash, sdpa-math;
- :mod:`bench.timing`    median time of a call (``triton.testing.do_bench`` on a GPU, a warmed-up
  median loop on a CPU);
- :mod:`bench.memory`    saved-for-backward bytes, peak GPU memory, memory estimates;
- :mod:`bench.runner`    sweeps cases x providers x modes into rows, skipping with a reason;
- :mod:`bench.report`    stdout table, JSON, log-log plot;
- :mod:`bench.targets`   the torch backend's CPU performance targets, measured in one run;
- :mod:`bench.backbone`     a whole VVT-tiny-shaped backbone: training-step time and peak memory against resolution;
- :mod:`bench.cli`       the command line.
"""
