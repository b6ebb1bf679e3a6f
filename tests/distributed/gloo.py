"""Shared plumbing of the multi-process tests: a free localhost port and one spawned process as a rank of a gloo
group (the launcher's variables set as torchrun sets them: accelerate and transformers read them)."""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Iterator

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def process_group(rank: int, world: int, port: int, timeout_s: float = 120) -> Iterator[None]:
    """This process as `rank` of a gloo group on localhost:`port`, one thread, torn down on exit. The timeout turns a
    rank left alone in a collective (its peer failed) into an error instead of a hang."""
    env = dict(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank, LOCAL_WORLD_SIZE=world, MASTER_PORT=port)
    os.environ.update(MASTER_ADDR="127.0.0.1", **{key: str(value) for key, value in env.items()})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()


def fork_ranks(worker, world: int, *args, out) -> list:
    """Run `worker(rank, port, *args, out)` on `world` forked gloo ranks (forked: they inherit the imported modules,
    re-importing transformers costs ~15 s per rank on 2 cores; the parent must not have initialized a process group)
    and return what each rank saved to `{out}/rank{rank}.pt`. Skips the test where torch has no gloo backend."""
    import pytest
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    mp.start_processes(worker, args=(free_port(), *args, str(out)), nprocs=world, start_method="fork")
    return [torch.load(f"{out}/rank{rank}.pt", weights_only=False) for rank in range(world)]
