"""Magnitude pruning of a trained run: the baseline PEP has to beat.

    pep-torchrec prune --run-dir runs/fm --budgets 0.2,0.1,0.05,0.02 --out runs/fm_magnitude

keeps, per budget, exactly the k largest |v| over every table of the run's best checkpoint (ties by
table, row, column, as the search does), and writes the same mask directories a search writes
(OUT/masks/budget_*/) with `init` = the trained weights (OUT/init/) and `warm_start` = the checkpoint,
so `pep-torchrec train --config <..._retrain.yaml> --mask OUT/masks/budget_0.1` fine-tunes the
pruned model with the mask fixed, starting from all of its trained parameters.

Runs in one process and reads the sharded DCP checkpoint of any world size into whole tables.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
import yaml

from pep_torchrec.config import ConfigError, load_config
from pep_torchrec.data.schema import Schema
from pep_torchrec.models import embedding_tables
from pep_torchrec.pruning import (
    MASK_LAYOUTS,
    affordable_floor,
    budget_count,
    budget_tag,
    select_mask,
    write_arrays,
)

# Where a baseline run's embedding tables live in its checkpoint (DMP(TrainModel(model)).state_dict()).
TABLE_KEY = "model.ebc.embedding_bags.{table}.weight"


def best_checkpoint(run_dir: Path) -> Path:
    """The checkpoint a run selected on valid (summary.json's best_step)."""
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise ConfigError(f"{summary_path}: missing (has the run finished?)")
    summary = json.loads(summary_path.read_text())
    path = run_dir / "checkpoints" / f"step_{summary['best_step']:08d}"
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(f"{path}: the best checkpoint is missing or incomplete")
    return path


def load_full_tables(checkpoint: Path, shapes: dict[str, tuple[int, int]], key: str = TABLE_KEY) -> dict[str, torch.Tensor]:
    """Read whole [rows, D] tables from a DCP checkpoint written by any number of ranks."""
    state = {"model": {key.format(table=t): torch.empty(shape) for t, shape in shapes.items()}}
    with warnings.catch_warnings():  # a single-process load is the point here, not an accident
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    return {t: state["model"][key.format(table=t)] for t in shapes}


def magnitude_masks(run_dir: Path, budgets: list[float], out: Path, *, layout: str = "elementwise",
                    min_row_dims: int = 0, max_row_dims: int = 0) -> list[dict]:
    cfg = load_config(base=yaml.safe_load((run_dir / "config.yaml").read_text()))
    if cfg.train.stage != "baseline":
        raise ConfigError(f"{run_dir}: magnitude pruning starts from a baseline run (this one is {cfg.train.stage})")
    schema = Schema.load(cfg.data.path)
    dim = cfg.model.embedding_dim
    tables = {t.name: t.num_embeddings for t in embedding_tables(schema.sparse_features, dim)}
    checkpoint = best_checkpoint(run_dir)
    weights = load_full_tables(checkpoint, {t: (n, dim) for t, n in tables.items()})
    total = sum(tables.values()) * dim
    shapes = {t: (n, dim) for t, n in tables.items()}
    write_arrays(out / "init", shapes, np.float32, {t: [(0, 0, w)] for t, w in weights.items()},
                 {"kind": "init", "dim": dim, "source": str(checkpoint.resolve()),
                  "tables": {t: {"rows": n} for t, n in tables.items()}}, rank=0)
    scores = {t: [(0, 0, w.abs())] for t, w in weights.items()}
    results = []
    for budget in budgets:
        count = budget_count(budget, total)
        min_row = affordable_floor(min_row_dims, count, sum(tables.values()))
        try:
            keep = select_mask(scores, count, list(tables), dim=dim, min_row=min_row, max_row=max_row_dims,
                               layout=layout)
        except ValueError as e:
            raise ConfigError(f"budget {budget}: {e}") from e
        meta = {
            "kind": "mask", "criterion": "magnitude", "layout": layout, "min_row_dims": min_row,
            "max_row_dims": max_row_dims, "budget": budget, "kept": count,
            "source_run": str(run_dir.resolve()), "warm_start": str(checkpoint.resolve()),
            "dim": dim, "init": "../../init", "embedding_params_total": total,
            "tables": {t: {"rows": n, "kept": int(keep[t][0][2].sum())} for t, n in tables.items()},
        }
        path = write_arrays(out / "masks" / budget_tag(budget), shapes, np.bool_, keep, meta, rank=0)
        results.append({"budget": budget, "kept": count, "path": str(path)})
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, help="a finished baseline run")
    parser.add_argument("--budgets", default="0.2,0.1,0.05,0.02",
                        help="comma-separated; <= 1 are shares of the embedding parameters, > 1 counts")
    parser.add_argument("--out", required=True, help="output directory (masks/budget_*, init/)")
    parser.add_argument("--layout", default="elementwise", choices=MASK_LAYOUTS,
                        help="mask layout, as pep.mask_layout (aligned: each row's kept count in one shared column order)")
    parser.add_argument("--min-row-dims", type=int, default=0,
                        help="every row keeps at least this many elements (clipped to what a budget affords)")
    parser.add_argument("--max-row-dims", type=int, default=0, help="no row keeps more (0 = embedding_dim)")


def _budgets(text: str) -> list[float]:
    """--budgets "0.2,0.1": shares of the embedding in (0, 1); ConfigError naming the bad item."""
    budgets = []
    for item in (b.strip() for b in text.split(",")):
        try:
            budget = float(item)
        except ValueError:
            raise ConfigError(f"--budgets: {item!r} is not a number (expected shares such as 0.2,0.1)") from None
        if not 0.0 < budget < 1.0:
            raise ConfigError(f"--budgets: {item} is not a share of the embedding in (0, 1) (0.1 keeps 10 %)")
        budgets.append(budget)
    return budgets


def run(args: argparse.Namespace) -> int:
    budgets = _budgets(args.budgets)
    if not Path(args.run_dir).is_dir():
        raise ConfigError(f"--run-dir {args.run_dir}: no such directory")
    results = magnitude_masks(Path(args.run_dir), budgets, Path(args.out), layout=args.layout,
                              min_row_dims=args.min_row_dims, max_row_dims=args.max_row_dims)
    for result in results:
        print(f"{result['path']}: {result['kept']:,} elements kept (budget {result['budget']:g})")
    return 0
