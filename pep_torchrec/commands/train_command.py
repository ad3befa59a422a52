"""Training entry point: config → Trainer → train → summary.

Launch-agnostic; the same module runs as::

    pep-torchrec train --config configs/movielens_fm.yaml --data out/ml100k --run-dir runs/fm
    python -m pep_torchrec.train --config ...
    torchrun --nproc-per-node 2 pep_torchrec/train.py --config ...
    torchx run -s local_cwd dist.ddp -j 1x2 --script pep_torchrec/train.py -- --config ...
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from pep_torchrec.config import ConfigError, load_config
from pep_torchrec.training.run_dir import RunDir, remove_paths

DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (configs/*.yaml)")
    parser.add_argument("--data", help="prepared dataset directory (sets data.path)")
    parser.add_argument(
        "--run-dir", help="output directory (config.yaml, metrics.jsonl, summary.json, checkpoints/)"
    )
    # nargs="+" as well as repetition: torchx rejects a repeated flag after `--`, so under torchx the
    # overrides go in one `--set a=1 b=2`.
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config fields, e.g. --set train.epochs=3 sharding.types=[row_wise]",
    )
    parser.add_argument("--mask", help="retrain: mask directory from a search run (sets pep.mask)")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --run-dir"
    )
    parser.add_argument(
        "--auto-resume",
        action="store_true",
        help="resume if --run-dir has a complete checkpoint, else start afresh (replacing what "
        "an earlier attempt left): what a job restarted after a failure passes",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the previous run in --run-dir (without it, a run directory holding "
        "checkpoints, masks or a summary is refused)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the sharding plan and per-rank memory for sharding.dry_run_world_size ranks, then exit",
    )


def _check_run_dir(args: argparse.Namespace) -> list[Path]:
    """Refuse to mix runs: a new run needs a run directory without a previous run's outputs
    (`RunDir.previous_run`), and `--resume` one that has a complete checkpoint. `--auto-resume`
    becomes `--resume` where that holds and `--overwrite` otherwise. Returns what `--overwrite`
    replaces: the previous run's outputs, removed by rank 0 only once the config has been accepted."""
    run = RunDir(args.run_dir)
    if args.auto_resume:
        if args.resume or args.overwrite:
            raise ConfigError("--auto-resume decides between --resume and --overwrite itself: pass it alone")
        args.resume = run.is_resumable()
        args.overwrite = not args.resume
    if args.resume:
        if args.overwrite:
            raise ConfigError("--resume and --overwrite: choose one (continue the run, or replace it)")
        if not run.has_config():
            raise ConfigError(f"--resume: {run.path} holds no run (no config.yaml)")
        if not run.is_resumable():
            raise ConfigError(f"--resume: no complete checkpoint under {run.checkpoints_dir}")
        return []
    found = run.previous_run()
    if found and not args.overwrite:
        raise ConfigError(
            f"--run-dir {run.path} holds a previous run ({', '.join(found)}): pass --resume to "
            "continue it or --overwrite to replace it"
        )
    return run.outputs() if args.overwrite else []


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.path={json.dumps(args.data)}")
    if args.mask:
        if not (Path(args.mask) / "meta.json").is_file():
            raise ConfigError(
                f"--mask {args.mask}: not a mask directory (no meta.json; a search run's masks/budget_*)"
            )
        overrides.append(f"pep.mask={json.dumps(args.mask)}")
    for flag in ("resume", "auto_resume", "overwrite"):
        if getattr(args, flag) and not args.run_dir:
            raise ConfigError(f"--{flag.replace('_', '-')} needs --run-dir")
    replaced = _check_run_dir(args) if args.run_dir and not args.dry_run else []
    base = None
    if args.resume and args.config is None:
        # Resume with the run's own resolved config unless another one is given (keys of another
        # version dropped with a warning, like every reader of a run's config.yaml).
        base = RunDir(args.run_dir).config_data()
    elif args.config is None:
        raise ConfigError("--config is required (a YAML of configs/, e.g. configs/debug_cpu.yaml)")
    cfg = load_config(args.config, overrides, base=base)
    if not cfg.data.path:
        raise ConfigError(
            "no dataset: pass --data DIR (a `pep-torchrec data prepare` output) or set data.path"
        )
    # Stored resolved in the run's config.yaml: export, prune and report then find the dataset and
    # the mask from any working directory.
    cfg.data.path = str(Path(cfg.data.path).resolve())
    if cfg.pep.mask:
        cfg.pep.mask = str(Path(cfg.pep.mask).resolve())
    if args.dry_run:
        return _dry_run(cfg)
    if not args.run_dir:
        raise ConfigError("--run-dir is required for training")

    from pep_torchrec.distributed.env import init_distributed, shutdown
    from pep_torchrec.training.trainer import Trainer

    run_dir = Path(args.run_dir)
    created = not run_dir.exists()
    if replaced and int(os.environ.get("RANK", "0")) == 0:  # the ranks meet in init_distributed, after this
        remove_paths(replaced)
    env = init_distributed(cfg.train.device)
    try:
        trainer = Trainer(cfg, env, run_dir, resume=args.resume)
        summary = trainer.train()
        if env.is_main:
            _print_summary(summary)
    except BaseException:
        if env.is_main and not args.resume:
            RunDir(run_dir).discard_failed_start(created=created)
        raise
    finally:
        shutdown(env)
    return 0


def _dry_run(cfg) -> int:
    """Plan for `sharding.dry_run_world_size` ranks without a process group or any table memory."""
    import torch

    from pep_torchrec.data.schema import Schema
    from pep_torchrec.distributed.planning import make_constraints, make_sharders, plan_sharding
    from pep_torchrec.models.run_model import build_train_model

    schema = Schema.load(cfg.data.path)
    world = cfg.sharding.dry_run_world_size
    local = min(cfg.sharding.dry_run_local_world_size, world)
    device_type = "cuda" if cfg.train.device in ("auto", "cuda") else "cpu"
    meta = torch.device("meta")
    model = build_train_model(cfg, schema, embedding_device=meta, dense_device=meta)
    names = [t.name for t in model.model.ebc.embedding_bag_configs()]
    report = plan_sharding(
        model,
        sharders=make_sharders(cfg.optim.embedding, device_type),
        constraints=make_constraints(names, cfg.sharding),
        world_size=world,
        local_world_size=local,
        compute_device=device_type,
        batch_size=max(1, cfg.data.batch_size // world),
        hbm_cap=int(cfg.sharding.hbm_gb * 1024**3) if device_type == "cuda" else None,
    )
    print(
        f"dry run: {world} ranks ({world // local} nodes x {local}), device {device_type}, "
        f"{len(names)} tables, model {cfg.model.name}, dim {cfg.model.embedding_dim}"
    )
    print(report.format())
    return 0


def _print_summary(summary: dict) -> None:
    keys = (
        "stage",
        "dataset",
        "model",
        "world_size",
        "steps",
        "examples_per_sec",
        "valid_auc",
        "test_auc",
        "test_logloss",
        "embedding_params_total",
        "embedding_params_kept",
    )
    width = max(map(len, keys))
    for k in keys:
        v = summary.get(k)
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
