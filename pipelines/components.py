"""torchx components for each stage of the workflow, so the same steps run locally or on a cluster.

    torchx run -s local_cwd pipelines/components.py:prepare --dataset synthetic --out out/synth
    torchx run -s local_cwd pipelines/components.py:train --config configs/debug_cpu.yaml \
        --data out/synth --run_dir runs/debug -j 1x2
    torchx run -s kubernetes pipelines/components.py:train ... -j 2x8 --gpu 8 --image <your image>

`train` runs any stage (baseline / search / retrain: the config names it); `prune` and `report` are
single-process jobs. `train` is TorchX's own `dist.ddp` around `pep_torchrec/train.py` (torchrun under the hood), so
rendezvous, retries and per-node process counts are TorchX's.
"""

# No `from __future__ import annotations`: torchx reads the parameter types at run time.
from typing import Optional

import torchx
from torchx import specs
from torchx.components import dist, utils


def prepare(
    dataset: str = "synthetic",
    out: str = "out/synthetic",
    raw: Optional[str] = None,
    min_count: Optional[int] = None,
    split: str = "random",
    seed: int = 0,
    rows: Optional[int] = None,
    image: str = torchx.IMAGE,
) -> specs.AppDef:
    """Prepare a dataset (`pep-torchrec data prepare`) as a single-process job.

    Args:
        dataset: synthetic, criteo, avazu or movielens.
        out: output directory of the prepared dataset.
        raw: raw input file or directory (not for synthetic).
        min_count: frequency threshold (values seen fewer times map to the field's OOV id).
        split: random (seeded 80/10/10) or temporal.
        seed: split / generator seed.
        rows: synthetic rows.
        image: container image (local_cwd ignores it).
    """
    args = ["data", "prepare", "--dataset", dataset, "--out", out, "--split", split, "--seed", str(seed)]
    if raw is not None:
        args += ["--raw", raw]
    if min_count is not None:
        args += ["--min-count", str(min_count)]
    if rows is not None:
        args += ["--rows", str(rows)]
    return utils.python(*args, m="pep_torchrec.cli", name="pep-prepare", image=image)


def train(
    *overrides: str,
    config: str,
    data: str,
    run_dir: str,
    resume: bool = False,
    max_restarts: int = 0,
    max_retries: int = 0,
    j: str = "1x2",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    image: str = torchx.IMAGE,
    omp_num_threads: int = 1,
) -> specs.AppDef:
    """Train (any stage the config names) with DistributedModelParallel over `j` = nodes x procs.

    Args:
        overrides: `key=value` config overrides (each becomes `--set key=value`).
        config: YAML config file.
        data: prepared dataset directory.
        run_dir: output directory.
        resume: continue from the latest checkpoint in run_dir.
        max_restarts: torchrun restarts every rank of a node this many times after one fails (any
            scheduler, local_cwd included); each attempt resumes from run_dir's latest checkpoint.
        max_retries: the scheduler reruns the job this many times (Kubernetes, Slurm, ...; the local
            schedulers ignore it); each attempt resumes likewise.
        j: {nnodes}x{nproc_per_node}, e.g. 1x2 locally, 2x8 on two 8-GPU nodes.
        cpu: CPUs per replica.
        gpu: GPUs per replica (0 on CPU: gloo; >0: NCCL).
        memMB: memory per replica.
        image: container image.
        omp_num_threads: intra-op threads per process (1 avoids oversubscribing CPU hosts).
    """
    args = ["--config", config, "--data", data, "--run-dir", run_dir]
    for item in overrides:
        args += ["--set", item]
    if max_restarts or max_retries:
        if resume:
            raise ValueError(
                "resume with max_restarts / max_retries: every attempt resumes by itself already"
            )
        args.append("--auto-resume")  # every attempt: resume if a checkpoint exists, else start
    elif resume:
        args.append("--resume")
    # torchrun reads its flags from PET_* variables too: PET_MAX_RESTARTS is its --max-restarts.
    env = {"OMP_NUM_THREADS": str(omp_num_threads), "PET_MAX_RESTARTS": str(max_restarts)}
    if max_restarts:
        # With the rendezvous' TCP store shared with the workers (torchrun's default), the restarted
        # workers hung creating their gloo process group (torch 2.13, CPU); a store per round works
        # (tests/training/test_train_e2e.py::test_torchx_run_resumes_by_itself_after_a_rank_dies).
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return dist.ddp(
        *args,
        script="pep_torchrec/train.py",
        j=j,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        image=image,
        name="pep-train",
        env=env,
        max_retries=max_retries,
    )


def prune(
    run_dir: str, out: str, budgets: str = "0.2,0.1,0.05,0.02", image: str = torchx.IMAGE
) -> specs.AppDef:
    """Magnitude-prune a finished baseline run into mask directories (`pep-torchrec prune`).

    Args:
        run_dir: the baseline run.
        out: output directory (masks/budget_*, init/).
        budgets: comma-separated budgets (<= 1: shares, > 1: counts).
        image: container image.
    """
    return utils.python(
        "prune",
        "--run-dir",
        run_dir,
        "--budgets",
        budgets,
        "--out",
        out,
        m="pep_torchrec.cli",
        name="pep-prune",
        image=image,
    )


def report(run_dir: str, image: str = torchx.IMAGE) -> specs.AppDef:
    """Plots and a Markdown summary of a run (`pep-torchrec report`).

    Args:
        run_dir: the run to report on.
        image: container image.
    """
    return utils.python("report", "--run-dir", run_dir, m="pep_torchrec.cli", name="pep-report", image=image)
