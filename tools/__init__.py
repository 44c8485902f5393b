"""Developer tools, not installed with the package; run from the repository root as modules:
``python -m tools.compile_gate`` (the ahead-of-time GPU compile gate, which uses ``tools.launch_capture``
to record what the launchers launch and ``tools.sass`` to read the compiled code)."""
