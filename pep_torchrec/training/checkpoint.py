"""Checkpoints with torch.distributed.checkpoint (DCP): sharded tables, fused and dense optimizer
state, and the trainer's position, so a killed run resumes exactly where it was.

Layout::

    RUN/checkpoints/step_00000120/      DCP files (every rank writes its own shards)
    RUN/checkpoints/step_00000120/trainer_state.json   step, epoch, best-so-far, metrics (rank 0)
    RUN/checkpoints/step_00000120/rng_rank{R}.json     each rank's RNG states (CPU; its CUDA device's)

A checkpoint is written under `step_N.tmp` and renamed by rank 0 after every rank finished, so a
checkpoint directory without the suffix is always complete.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class CheckpointManager:
    """Save / find / load / prune DCP checkpoints of one run.

    Args:
        directory: RUN/checkpoints.
        rank: this process's rank (rank 0 writes metadata and renames).
        keep: how many recent checkpoints to keep; steps in `protect` are never pruned.
    """

    def __init__(self, directory: str | os.PathLike, *, rank: int, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.rank = rank
        self.keep = max(1, keep)

    def path(self, step: int) -> Path:
        return self.directory / f"step_{step:08d}"

    def steps(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        found = []
        for child in self.directory.iterdir():
            m = _STEP_DIR.match(child.name)
            if m and (child / "trainer_state.json").is_file():
                found.append(int(m.group(1)))
        return sorted(found)

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(
        self, step: int, state: dict[str, Any], trainer_state: dict[str, Any], protect: tuple[int, ...] = ()
    ) -> Path:
        """Write `state` (a DCP-able dict: model / optimizer state dicts) and `trainer_state` (JSON)."""
        final = self.path(step)
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        dcp.save(state, checkpoint_id=str(tmp))
        _write_json(tmp / f"rng_rank{self.rank}.json", _rng_state())
        _barrier()
        if self.rank == 0:
            _write_json(tmp / "trainer_state.json", trainer_state)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._prune(protect + (step,))
        _barrier()
        return final

    def load(self, step: int, state: dict[str, Any]) -> dict[str, Any]:
        """Load into `state` in place (DCP reshards to this run's plan) and restore this rank's RNG.

        Returns:
            The saved trainer state.
        """
        path = self.path(step)
        meta_path = path / "trainer_state.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{path}: not a complete checkpoint (trainer_state.json missing)")
        dcp.load(state, checkpoint_id=str(path))
        rng_path = path / f"rng_rank{self.rank}.json"
        if rng_path.is_file():
            _set_rng_state(json.loads(rng_path.read_text()))
        return json.loads(meta_path.read_text())

    def _prune(self, protect: tuple[int, ...]) -> None:
        steps = self.steps()
        keep = set(steps[-self.keep :]) | set(protect)
        for step in steps:
            if step not in keep:
                shutil.rmtree(self.path(step), ignore_errors=True)


def _encode(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _rng_state() -> dict[str, str]:
    """This rank's generators: the CPU one, and its current CUDA device's where CUDA is in use
    (dropout and random init on the GPU draw from that one, not the CPU's)."""
    state = {"torch": _encode(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _encode(torch.cuda.get_rng_state())
    return state


def _set_rng_state(state: dict[str, str]) -> None:
    torch.set_rng_state(_decode(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_decode(state["cuda"]))
