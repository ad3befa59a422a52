"""Run a function on N gloo ranks in fresh processes (for sharded-vs-unsharded tests)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from pep_torchrec.serving.local import free_port


def _entry(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, results: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results[rank] = fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn: Callable[..., Any], world_size: int = 2, *args: Any) -> list[Any]:
    """Call `fn(rank, world_size, *args)` on `world_size` spawned gloo ranks; return each rank's result
    (must be picklable). An exception on any rank fails the call."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_entry, args=(world_size, free_port(), fn, args, results), nprocs=world_size, join=True)
        return [results[r] for r in range(world_size)]
