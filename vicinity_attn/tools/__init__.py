"""Developer tools, each runnable as a module: ``python -m vicinity_attn.tools.compile_gate`` (the
ahead-of-time GPU compile gate) and ``python -m vicinity_attn.tools.demo`` (a small end-to-end run)."""
