"""PyTorch distributed training: one process per worker, gloo on CPU, NCCL on GPUs.

Every worker reads the same global batches and takes its own contiguous slice of each
(rank order), so the global batch, and with it the estimator's input, is the same for any
number of workers. Dense parameters are averaged by DDP. The embedding tables are kept out
of DDP, which does not handle sparse gradients well: their sparse gradients are gathered
(row indices and values, every rank in rank order) and averaged by hand, which costs
traffic in the rows a batch touches rather than in the table size. Item embeddings are
gathered with autograd, so each query sees every worker's items as negatives and the
gradient flows back to the worker that embedded them.

Started by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in the environment),
by :func:`launch`, or by a test with ``torch.multiprocessing.spawn`` that initialises the
process group itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = ["World", "all_gather_rows", "broadcast_tables", "gather_with_grad", "init_from_env",
           "launch", "leave", "pick_device", "shard", "sync_table_grads"]


@dataclass(frozen=True)
class World:
    """This process's place among the workers (a world of one without a process group)."""

    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> World:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def main(self) -> bool:
        """Only the main process writes checkpoints, metrics and progress."""
        return self.rank == 0


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: a GPU when there is one, else the CPU. A GPU without an index is this
    worker's (``LOCAL_RANK``, set by torchrun)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def init_from_env(device: str = "auto") -> World:
    """Join the process group ``torchrun`` describes in the environment; a world of one
    when there is none. NCCL for GPUs, gloo for the CPU."""
    if "RANK" not in os.environ or World.current().size > 1:
        return World.current()
    dev = pick_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return World.current()


def leave() -> None:
    """Leave the process group, all workers together (a worker tearing down alone can abort
    or hang another's exit); nothing without one."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run ``twotower <argv>`` in ``nproc`` processes on this machine through torchrun (any
    ``--nproc`` in ``argv`` is dropped); returns the exit status."""
    args = list(argv)
    for i, arg in enumerate(args):
        if arg == "--nproc" or arg.startswith("--nproc="):
            del args[i:i + (2 if arg == "--nproc" else 1)]
            break
    env = {**os.environ, "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "twotower", *args]
    return subprocess.call(command, env=env)


def _sizes(n: int, world: World) -> list[int]:
    return [n // world.size + (r < n % world.size) for r in range(world.size)]


def shard(rows: np.ndarray, world: World) -> tuple[np.ndarray, int]:
    """This worker's contiguous slice of a global batch (sizes differ by at most one) and
    where it starts in the batch."""
    sizes = _sizes(len(rows), world)
    start = sum(sizes[:world.rank])
    return rows[start:start + sizes[world.rank]], start


def gather_with_grad(local: torch.Tensor, batch_size: int, world: World) -> torch.Tensor:
    """``[batch_size, ...]``: every worker's ``local`` rows (its :func:`shard` of a batch of
    ``batch_size``) in rank order; gradients flow back to the worker that made each row."""
    if world.size == 1:
        return local
    sizes = _sizes(batch_size, world)
    padded = torch.cat([local, local.new_zeros(max(sizes) - len(local), *local.shape[1:])])
    parts = _AllGather.apply(padded).unflatten(0, (world.size, max(sizes)))
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])


class _AllGather(torch.autograd.Function):
    """Every worker's equally long ``local`` stacked in rank order; the gradient of a
    worker's rows is the sum over all workers of the gradients they got."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        ctx.rows = len(local)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def all_gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every worker's ``local`` (any number of rows each) concatenated in rank order."""
    size = torch.tensor([len(local)], device=local.device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    lengths = [int(s) for s in sizes]
    padded = torch.cat([local, local.new_zeros(max(lengths) - len(local), *local.shape[1:])])
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, lengths, strict=True)])


def sync_table_grads(tables: Sequence[nn.Module], world: World) -> None:
    """Average the tables' gradients over the workers (sparse ones row by row), in place.

    Every worker concatenates the same rows in the same order, so all end with identical
    gradients, and so identical tables and optimizer states.
    """
    if world.size == 1:
        return
    for table in tables:
        grad = table.weight.grad
        if grad is None:
            continue
        if not grad.is_sparse:
            dist.all_reduce(grad)
            grad /= world.size
            continue
        grad = grad.coalesce()
        rows = all_gather_rows(grad.indices()[0])
        values = all_gather_rows(grad.values()) / world.size
        table.weight.grad = torch.sparse_coo_tensor(
            rows[None], values, grad.shape, check_invariants=False).coalesce()  # valid rows


def broadcast_tables(tables: Sequence[nn.Module], world: World) -> None:
    """Start every worker from rank 0's tables (DDP broadcasts only what it manages)."""
    if world.size == 1:
        return
    for table in tables:
        dist.broadcast(table.weight.data, src=0)
