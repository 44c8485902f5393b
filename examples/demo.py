"""A short end-to-end check: ``python examples/demo.py``.

Runs ``VicinityAttention`` on the available device with the default backend, compares it with the
quadratic float64 reference on the same weights, and prints the error and timings.
"""
from __future__ import annotations

import argparse
import time

import torch

from vicinity_attn import VicinityAttention, resolve_backend


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, nargs=2, default=(28, 28), metavar=("H", "W"))
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--sr-ratio", type=int, default=1)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    H, W = args.grid
    torch.manual_seed(0)
    model = VicinityAttention(args.dim, args.heads, sr_ratio=args.sr_ratio).to(device)
    x = torch.randn(2, H * W, args.dim, device=device, requires_grad=True)
    backend = resolve_backend("auto", device)
    for _ in range(2):  # the first call pays one-time set-up costs; time the second
        x.grad = None
        start = time.perf_counter()
        out = model(x, H, W)
        out.square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    grad = x.grad.clone()

    reference = VicinityAttention(args.dim, args.heads, sr_ratio=args.sr_ratio, backend="reference").double().to(device)
    reference.load_state_dict(model.state_dict())
    x64 = x.detach().double().requires_grad_(True)
    ref_out = reference(x64, H, W)
    ref_out.square().mean().backward()
    out_err = ((out.double() - ref_out).abs().max() / ref_out.abs().max()).item()
    grad_err = ((grad.double() - x64.grad).abs().max() / x64.grad.abs().max()).item()
    print(f"device {device}, backend {backend!r}, x {tuple(x.shape)}, grid {H}x{W}, heads {args.heads}")
    print(f"forward+backward (second call): {elapsed * 1e3:.1f} ms")
    print(f"relative error vs float64 quadratic reference: output {out_err:.2e}, input grad {grad_err:.2e}")
    ok = out_err < 1e-4 and grad_err < 1e-4
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
