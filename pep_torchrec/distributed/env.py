"""Process-group set-up that is launch-agnostic: plain `python`, `torchrun` and `torchx dist.ddp`.

Launchers export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them we are a
single process and build a one-rank group on an in-memory store, so DMP (which needs a process group)
works the same way everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pep_torchrec.config import ConfigError


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    owns_process_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """`auto` picks CUDA when present; `cuda` without a GPU is an error."""
    if preference not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device: {preference!r} is not one of auto, cpu, cuda")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device: cuda requested but torch.cuda.is_available() is False")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto") -> DistEnv:
    """Join (or create) the default process group: NCCL on CUDA, gloo on CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    owns = False
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=backend)
        else:
            # TorchRec reads the launcher's variables (e.g. LOCAL_WORLD_SIZE for the topology); say
            # what a launcher would for one process.
            for key, value in (("LOCAL_WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
                os.environ.setdefault(key, value)
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        owns = True
    return DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())),
        device=device,
        backend=backend,
        owns_process_group=owns,
    )


def configure_threads(requested: int, local_world_size: int) -> int:
    """Set torch's intra-op thread count (see TrainConfig.num_threads); returns the count in use."""
    if requested > 0:
        torch.set_num_threads(requested)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world_size) - 1))
    return torch.get_num_threads()


def shutdown(env: DistEnv) -> None:
    if env.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
