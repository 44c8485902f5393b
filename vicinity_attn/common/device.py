"""The device guard of the triton backends: launches go to the GPU their tensors live on."""
from __future__ import annotations

import contextlib

import torch


def launch_device(t: torch.Tensor):
    """A context in which Triton launches go to ``t``'s GPU, whichever GPU is current (Triton launches on the
    current device: without it, tensors on cuda:1 while cuda:0 is current would be handed to a kernel running
    on cuda:0). A no-op for CPU tensors (the interpreter) and meta tensors."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
