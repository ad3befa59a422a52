"""Launching the trainer in other processes, as people do: `python -m`, and `torchx run` on 2 local ranks.

One place for what every launching test needs: the environment, a run that shows the output's tail
when it fails, the venv's `torchx` and the `dist.ddp` command line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The venv's torchx (the one next to this interpreter), not whichever is first on PATH.
TORCHX = Path(sys.executable).parent / "torchx"
needs_torchx = pytest.mark.skipif(not TORCHX.exists(), reason="torchx not installed in this environment")


def launch_env() -> dict[str, str]:
    """The environment of a launched process: one thread per process (ranks share the cores), this
    checkout importable, and the venv's scripts (torchx, torchrun) on PATH."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_command(cmd: Sequence[str], timeout: float = 400) -> None:
    """Run `cmd` from the repository root; on failure show the tail of its output, not just the exit code."""
    proc = subprocess.run(
        list(cmd), env=launch_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"{list(cmd)[:4]} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}"
    )


def torchx_ddp_command(*train_args: str, ranks: int = 2) -> list[str]:
    """`torchx run -s local_cwd dist.ddp` of `pep_torchrec/train.py` on `ranks` local processes; `train_args`
    go to the training entry point (`--config ... --run-dir ... --set ...`)."""
    return [
        str(TORCHX),
        "run",
        "-s",
        "local_cwd",
        "dist.ddp",
        "-j",
        f"1x{ranks}",
        "--env",
        "OMP_NUM_THREADS=1",
        "--script",
        "pep_torchrec/train.py",
        "--",
        *train_args,
    ]


def launch_torchx_ddp(*train_args: str, ranks: int = 2, timeout: float = 400) -> None:
    """Train under `torchx run ... dist.ddp` on `ranks` local processes; fails the test if the job fails."""
    run_command(torchx_ddp_command(*train_args, ranks=ranks), timeout=timeout)
