"""A free loopback port for tests that start a server or a process group, and joining
such a group from a spawned worker."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def gloo_group(rank: int, port: int, world_size: int) -> Iterator[None]:
    """This worker in a gloo group on ``port``; on a clean exit all workers leave together
    (a rank tearing down alone can hang its peer's exit)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
