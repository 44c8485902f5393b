"""Data parallel x context parallel training with vicinity attention (CPU / gloo, or GPUs / NCCL).

    torchrun --nproc_per_node 4 examples/dp_cp.py --cp 2            # 2 data-parallel x 2 context-parallel
    torchrun --nproc_per_node 2 examples/dp_cp.py --cp 2 --check    # compare gradients with one process

The world is split into data-parallel replicas of ``--cp`` consecutive ranks each. Inside a replica every
rank holds a contiguous shard of every image's tokens (the class token and whole blocks of sr_ratio
rows; README, "Context parallelism"), and the attention layers sum their states over the replica's
context-parallel group (``VicinityAttention(group=cp_group)``). Parameter gradients then need a sum over
the context-parallel group and a mean over the replicas: DistributedDataParallel over the whole world
averages over all ranks, so each rank's loss (its tokens' share of its replica's mean loss) is multiplied
by the context-parallel size. ``--check`` recomputes the first step's gradients in one process on every
rank (the same seed gives every rank the whole batch) and prints the largest relative difference.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from vicinity_attn import VicinityAttention

SR_RATIO = 2


class TinyViT(nn.Module):
    """Patch embedding, a class token, one pre-norm block with VicinityAttention (spatially reduced keys)
    and an MLP, and a per-token regression head (a dense-prediction stand-in)."""

    def __init__(self, dim: int = 32, heads: int = 2, group=None, backend: str = "auto"):
        super().__init__()
        self.embed = nn.Linear(3, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = VicinityAttention(dim, heads, sr_ratio=SR_RATIO, num_prefix_tokens=1, backend=backend, group=group)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 1)

    def forward(self, pixels: torch.Tensor, H: int, W: int, with_cls: bool) -> torch.Tensor:
        """pixels [B, n, 3] (this rank's grid tokens) -> [B, n (+ 1 with the class token), 1]."""
        x = self.embed(pixels)
        if with_cls:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        else:   # DistributedDataParallel needs every parameter in every rank's graph (here: a zero gradient)
            x = x + 0 * self.cls
        x = x + self.attn(self.norm1(x), H, W)
        x = x + self.mlp(self.norm2(x))
        return self.head(x)


def row_shards(H: int, W: int, parts: int) -> list[tuple[int, int]]:
    """Grid-token ranges of ``parts`` shards made of whole blocks of SR_RATIO rows, as even as possible."""
    blocks = H // SR_RATIO
    cuts = [round(i * blocks / parts) * SR_RATIO * W for i in range(parts)] + [H * W]
    return list(zip(cuts[:-1], cuts[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cp", type=int, default=2, help="context-parallel group size (divides the world size)")
    parser.add_argument("--size", type=int, default=16, help="image side (tokens per axis)")
    parser.add_argument("--batch", type=int, default=4, help="images per data-parallel replica and step")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--check", action="store_true", help="compare the first step's gradients with one process")
    args = parser.parse_args()

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % args.cp:
        raise SystemExit(f"--cp {args.cp} must divide the world size {world}")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = torch.float64 if args.check and device.type == "cpu" else torch.float32
    # Every rank creates every group, in the same order (torch.distributed requires it).
    cp_groups = [dist.new_group(list(range(r, r + args.cp))) for r in range(0, world, args.cp)]
    cp_group, cp_rank, replica = cp_groups[rank // args.cp], rank % args.cp, rank // args.cp
    n_replicas = world // args.cp

    torch.manual_seed(0)
    model = TinyViT(group=cp_group).to(device, dtype)
    reference = TinyViT().to(device, dtype) if args.check else None
    if reference is not None:
        reference.load_state_dict(model.state_dict())
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    H = W = args.size
    g0, g1 = row_shards(H, W, args.cp)[cp_rank]
    for step in range(args.steps):
        gen = torch.Generator().manual_seed(step)   # the whole global batch, identical on every rank
        pixels = torch.randn(n_replicas * args.batch, H * W, 3, generator=gen).to(device, dtype)
        target = torch.randn(n_replicas * args.batch, 1 + H * W, 1, generator=gen).to(device, dtype)
        mine = slice(replica * args.batch, (replica + 1) * args.batch)
        with_cls = cp_rank == 0
        out = ddp(pixels[mine, g0:g1], H, W, with_cls)
        t = target[mine, (0 if with_cls else 1 + g0):1 + g1]
        # This rank's share of its replica's mean loss, times the context-parallel size (DDP averages
        # over all world ranks; the replica's true gradient is the sum over its context-parallel ranks).
        loss = ((out - t) ** 2).sum() / target[mine].numel() * args.cp
        opt.zero_grad()
        loss.backward()
        if step == 0 and reference is not None:
            full = ((reference(pixels, H, W, True) - target) ** 2).mean()
            full.backward()
            err = max(((p.grad - r.grad).norm() / r.grad.norm()).item()
                      for p, r in zip(model.parameters(), reference.parameters()))
            print(f"rank {rank}: first-step gradients vs one process: max relative difference {err:.2e}", flush=True)
        opt.step()
        replica_loss = loss.detach() / args.cp
        dist.all_reduce(replica_loss)
        if rank == 0:
            print(f"step {step}: mean loss {replica_loss.item() / n_replicas:.6f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
