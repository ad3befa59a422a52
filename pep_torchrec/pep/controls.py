"""Masks without PEP's thresholds: magnitude pruning (the baseline PEP has to beat) and the controls
that separate "which row sizes" from "which elements".

    pep-torchrec prune --run-dir runs/fm --budgets 0.2,0.1,0.05,0.02 --out runs/fm_magnitude
    pep-torchrec prune --method uniform --run-dir runs/fm_search --budgets 0.1 --out runs/uniform --seed 0
    pep-torchrec prune --method frequency --run-dir runs/fm_search --budgets 0.1 --out runs/freq
    pep-torchrec prune --method random-elements --sizes-from runs/fm_search/masks --out runs/rand --seed 0

Methods (every one writes OUT/masks/budget_*/ in the format a search writes, exactly K elements, K =
round(budget x embedding elements), so `pep-torchrec train --config <..._retrain.yaml> --mask
OUT/masks/budget_0.1` retrains it):

  magnitude        the k largest |v| over every table of a *baseline* run's best checkpoint (ties by
                   table, row, column, as the search does), under the row rules --layout /
                   --min-row-dims / --max-row-dims; `init` = the trained weights (OUT/init/) and
                   `warm_start` = the checkpoint: the retrain fine-tunes the pruned model.
  uniform          uniform-k: every row keeps its first k = K // rows columns, the remaining K - k x rows
                   elements one extra column each on rows drawn at random (--seed). A lottery ticket:
                   `init` = the *search* run's step-0 embedding (RUN/init/), the one PEP's masks retrain from.
  frequency        no learning at all: row sizes from the train split's id frequencies (element j of a row
                   whose id occurs f times scores log(1 + f) / (j + 1); the K best), first columns; `init`
                   = the search run's step-0 embedding. The frequencies are counted in the train split of
                   --data (default: the run's data.path).
  random-elements  each row keeps as many elements as in the masks of --sizes-from (a masks/ directory of
                   budget_* masks, or one mask), at columns drawn at random (--seed); `init` and
                   `warm_start` are the source mask's. With an aligned source this separates "which
                   sizes" from "which elements".

Every method is deterministic given its inputs and --seed. A mask that leaves the model without feature
interactions (kept elements in fewer than two tables) and a row floor a budget cannot afford are
reported as warnings (and recorded in meta.json under `warnings`).

Runs in one process and reads the sharded DCP checkpoint of any world size into whole tables.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp

from pep_torchrec.config import ConfigError
from pep_torchrec.data.schema import Schema, SchemaError
from pep_torchrec.models import embedding_tables
from pep_torchrec.pep.masks import (
    affordable_floor,
    aligned_mask,
    budget_count,
    floor_clip_note,
    frequency_sizes,
    interaction_warning,
    random_columns_mask,
    select_mask,
    uniform_sizes,
    write_arrays,
)
from pep_torchrec.training.run_dir import RunDir, budget_tag, init_dir_of, list_masks, read_meta

logger = logging.getLogger(__name__)

# Where a baseline run's embedding tables live in its checkpoint (DMP(TrainModel(model)).state_dict()).
TABLE_KEY = "model.ebc.embedding_bags.{table}.weight"
DEFAULT_BUDGETS = "0.2,0.1,0.05,0.02"
TABLE_PREFIX = "t_"


def load_full_tables(
    checkpoint: Path, shapes: dict[str, tuple[int, int]], key: str = TABLE_KEY
) -> dict[str, torch.Tensor]:
    """Read whole [rows, D] tables from a DCP checkpoint written by any number of ranks."""
    state = {"model": {key.format(table=t): torch.empty(shape) for t, shape in shapes.items()}}
    with warnings.catch_warnings():  # a single-process load is the point here, not an accident
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    return {t: state["model"][key.format(table=t)] for t in shapes}


def _mask_warnings(budget: float, kept_by_table: Mapping[str, int], clip: str | None = None) -> list[str]:
    """The warnings of one mask, logged (stderr on the command line) and returned for meta.json."""
    found = [w for w in (clip, interaction_warning(kept_by_table)) if w]
    for message in found:
        logger.warning("budget %g: %s", budget, message)
    return found


def _write_mask(
    out: Path, budget: float, masks: Mapping[str, np.ndarray], meta: dict[str, Any], clip: str | None = None
) -> dict[str, Any]:
    """Write OUT/masks/budget_*/ from whole bool [R, D] tables, with the tables' kept counts and warnings."""
    kept = {t: int(m.sum()) for t, m in masks.items()}
    meta = {**meta, "tables": {t: {"rows": int(m.shape[0]), "kept": kept[t]} for t, m in masks.items()}}
    meta["warnings"] = _mask_warnings(budget, kept, clip)
    shapes = {t: tuple(m.shape) for t, m in masks.items()}
    path = write_arrays(
        RunDir(out).mask_dir(budget),
        shapes,
        np.bool_,
        {t: [(0, 0, torch.from_numpy(np.ascontiguousarray(m)))] for t, m in masks.items()},
        meta,
        rank=0,
    )
    return {"budget": budget, "kept": meta["kept"], "path": str(path), "warnings": meta["warnings"]}


def magnitude_masks(
    run_dir: Path,
    budgets: list[float],
    out: Path,
    *,
    layout: str = "elementwise",
    min_row_dims: int = 0,
    max_row_dims: int = 0,
) -> list[dict]:
    cfg = RunDir(run_dir).config()
    if cfg.train.stage != "baseline":
        raise ConfigError(
            f"{run_dir}: magnitude pruning starts from a baseline run (this one is {cfg.train.stage})"
        )
    schema = Schema.load(cfg.data.path)
    dim = cfg.model.embedding_dim
    tables = {t.name: t.num_embeddings for t in embedding_tables(schema.sparse_features, dim)}
    checkpoint = RunDir(run_dir).best_checkpoint()
    weights = load_full_tables(checkpoint, {t: (n, dim) for t, n in tables.items()})
    total = sum(tables.values()) * dim
    shapes = {t: (n, dim) for t, n in tables.items()}
    write_arrays(
        RunDir(out).init_dir,
        shapes,
        np.float32,
        {t: [(0, 0, w)] for t, w in weights.items()},
        {
            "kind": "init",
            "dim": dim,
            "source": str(checkpoint.resolve()),
            "tables": {t: {"rows": n} for t, n in tables.items()},
        },
        rank=0,
    )
    scores = {t: [(0, 0, w.abs())] for t, w in weights.items()}
    results = []
    for budget in budgets:
        count = budget_count(budget, total)
        min_row = affordable_floor(min_row_dims, count, sum(tables.values()))
        try:
            keep = select_mask(
                scores, count, list(tables), dim=dim, min_row=min_row, max_row=max_row_dims, layout=layout
            )
        except ValueError as e:
            raise ConfigError(f"budget {budget}: {e}") from e
        meta = {
            "kind": "mask",
            "criterion": "magnitude",
            "layout": layout,
            "min_row_dims": min_row,
            "min_row_dims_requested": min_row_dims,
            "max_row_dims": max_row_dims,
            "budget": budget,
            "kept": count,
            "source_run": str(run_dir.resolve()),
            "warm_start": str(checkpoint.resolve()),
            "dim": dim,
            "init": "../../init",
            "embedding_params_total": total,
        }
        clip = floor_clip_note(min_row_dims, min_row, count, sum(tables.values()))
        results.append(_write_mask(out, budget, {t: keep[t][0][2].numpy() for t in tables}, meta, clip))
    return results


def _search_init(run_dir: Path, method: str) -> tuple[Path, dict[str, Any]]:
    """A search run's step-0 embedding (RUN/init/) and its meta: where the lottery-ticket controls start."""
    run = RunDir(run_dir)
    if not (run.init_dir / "meta.json").is_file():
        raise ConfigError(
            f"--run-dir {run_dir}: --method {method} starts from a search run's step-0 embedding "
            f"({run.init_dir}/), and {run_dir} has none (not a search run?)"
        )
    init, meta = run.init()
    if not meta.get("tables") or not meta.get("dim"):
        raise ConfigError(f"{init / 'meta.json'}: an init directory's meta needs tables and dim")
    return init, meta


def _train_frequencies(
    run_dir: Path, data: str | None, tables: Mapping[str, int]
) -> tuple[dict[str, np.ndarray], Path]:
    """Train-split occurrences of every id, per table (`t_<feature>`), from --data or the run's data.path."""
    from pep_torchrec.report import ReportError, train_frequencies

    if data is not None:
        dataset: Path | None = Path(data)
        flag = f"--data {data}"
    else:
        run = RunDir(run_dir)
        recorded = str((run.config_data().get("data") or {}).get("path", ""))
        dataset = run.resolve(recorded) if recorded else None
        flag = f"--data (the run's data.path {recorded!r} was not found)"
    if dataset is None or not (dataset / "schema.json").is_file():
        raise ConfigError(
            f"{flag}: not a prepared dataset (schema.json missing); --method frequency counts the "
            f"train split's ids"
        )
    try:
        schema = Schema.load(dataset)
    except SchemaError as e:
        raise ConfigError(f"--data {dataset}: {e}") from e
    features = {t: t.removeprefix(TABLE_PREFIX) for t in tables}
    missing = sorted(f for f in features.values() if f not in schema.feature_names)
    if missing:
        raise ConfigError(f"--data {dataset}: no features {missing} in its schema (the run's tables)")
    try:
        counts = train_frequencies(dataset, schema, {features[t]: n for t, n in tables.items()})
    except ReportError as e:
        raise ConfigError(f"--data {dataset}: {e}") from e
    return {t: counts[features[t]] for t in tables}, dataset


def size_control_masks(
    method: str, run_dir: Path, budgets: list[float], out: Path, *, seed: int = 0, data: str | None = None
) -> list[dict]:
    """uniform / frequency masks at each budget, lottery tickets from the search run's step-0 embedding."""
    init, init_meta = _search_init(run_dir, method)
    dim = int(init_meta["dim"])
    tables = {t: int(e["rows"]) for t, e in init_meta["tables"].items()}
    total = sum(tables.values()) * dim
    frequencies, dataset = (
        _train_frequencies(run_dir, data, tables) if method == "frequency" else (None, None)
    )
    results = []
    for budget in budgets:
        count = budget_count(budget, total)
        if method == "uniform":
            sizes = uniform_sizes(tables, count, dim, seed)
            extra = {"criterion": "uniform", "min_row_dims": count // sum(tables.values()), "seed": seed}
        else:
            assert frequencies is not None
            sizes = frequency_sizes(frequencies, count, dim)
            extra = {"criterion": "frequency", "min_row_dims": 0, "frequencies": f"train split of {dataset}"}
        meta = {
            "kind": "mask",
            "layout": "aligned",
            "max_row_dims": 0,
            **extra,
            "budget": budget,
            "kept": count,
            "source_run": str(run_dir.resolve()),
            "dim": dim,
            "init": str(init),
            "embedding_params_total": total,
        }
        results.append(_write_mask(out, budget, {t: aligned_mask(sizes[t], dim) for t in tables}, meta))
    return results


def _source_masks(sizes_from: Path, budgets: list[float] | None) -> list[Path]:
    """The mask directories --sizes-from names: itself (one mask) or its budget_* (those of --budgets)."""
    if (sizes_from / "meta.json").is_file():
        budget = read_meta(sizes_from).get("budget")
        if budgets is not None and budget not in budgets:
            raise ConfigError(f"--budgets: --sizes-from {sizes_from} is one mask, of budget {budget}")
        return [sizes_from]
    if not sizes_from.is_dir():
        raise ConfigError(f"--sizes-from {sizes_from}: no such directory")
    if budgets is None:
        found = list_masks(sizes_from)
        if not found:
            raise ConfigError(
                f"--sizes-from {sizes_from}: neither a mask (meta.json) nor a directory of budget_* masks"
            )
        return found
    missing = [b for b in budgets if not (sizes_from / budget_tag(b) / "meta.json").is_file()]
    if missing:
        raise ConfigError(
            f"--budgets: {sizes_from} has no complete mask for {', '.join(f'{b:g}' for b in missing)}"
        )
    return [sizes_from / budget_tag(b) for b in budgets]


def random_element_masks(
    sizes_from: Path, out: Path, *, budgets: list[float] | None = None, seed: int = 0
) -> list[dict]:
    """Each row keeps the source mask's count, at random columns; the source's init and warm start."""
    results = []
    for source in _source_masks(sizes_from, budgets):
        meta = read_meta(source, "mask")
        dim = int(meta["dim"])
        masks = {}
        for index, (table, entry) in enumerate(meta["tables"].items()):
            path = source / f"{table}.npy"
            if not path.is_file():
                raise ConfigError(f"--sizes-from {source}: {path.name} missing")
            sizes_R = np.load(path, mmap_mode="r").sum(1)
            if sizes_R.size != int(entry["rows"]):
                raise ConfigError(f"--sizes-from {path}: {sizes_R.size} rows, meta.json says {entry['rows']}")
            # One stream per table (seed, table index): the same draw whatever the other tables are.
            masks[table] = random_columns_mask(sizes_R, dim, np.random.default_rng([seed, index]))
        new = {
            "kind": "mask",
            "criterion": "random_elements",
            "layout": "elementwise",
            "seed": seed,
            "sizes_from": str(source.resolve()),
            "sizes_from_criterion": meta.get("criterion"),
            "min_row_dims": 0,
            "max_row_dims": 0,
            "budget": meta["budget"],
            "kept": int(meta["kept"]),
            "dim": dim,
            "init": str(init_dir_of(source, meta)),
            "embedding_params_total": meta.get("embedding_params_total"),
        }
        if meta.get("warm_start"):
            new["warm_start"] = meta["warm_start"]
        results.append(_write_mask(out, float(meta["budget"]), masks, new))
    return results
