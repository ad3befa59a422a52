"""What the search and retrain stages add to the training loop.

search:  the step-0 embedding is saved (`RUN/init/`); at every eval the kept elements of every
         shard are counted (an eval-interval scan, never per step) and all-reduced; the first eval at
         which the kept count is <= a budget saves a mask keeping *exactly* that many elements
         (`RUN/masks/budget_*/`, ranked by margin, under the row rules `pep.min_row_dims` /
         `max_row_dims` / `mask_layout`, see masks.select_mask); an optional controller sets the threshold
         scale `gk` so the kept share follows a geometric schedule down to the budgets, exactly.
retrain: the tables start as init x mask (`[v | m]` rows, thresholds off); masked elements get zero
         gradient in the kernel, so they stay exactly zero through training and in checkpoints.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from pep_torchrec.config import ConfigError, PEPConfig
from pep_torchrec.distributed.pep_embeddingbag import pep_modules
from pep_torchrec.distributed.state import local_pieces
from pep_torchrec.pep.masks import (
    MASK_LAYOUTS,
    affordable_floor,
    budget_count,
    check_row_rules,
    floor_clip_note,
    interaction_warning,
    kth_largest,
    open_array,
    select_mask,
    write_arrays,
)
from pep_torchrec.training.run_dir import RunDir, init_dir_of, read_meta

logger = logging.getLogger(__name__)


class PEPStage:
    """Search / retrain bookkeeping for one sharded model with one PEP embedding module.

    Args:
        cfg: the `pep` config section.
        stage: "search" or "retrain".
        model: the DistributedModelParallel model.
        rank: this process's rank.
        run_dir: the run directory.
        tables: the PEP module's logical tables, name → num_embeddings, in model order.
        dim: the logical embedding dim D.
        steps_per_epoch: for the pressure schedule.
    """

    def __init__(
        self,
        cfg: PEPConfig,
        stage: str,
        model: nn.Module,
        *,
        tables: dict[str, int],
        dim: int,
        rank: int,
        run_dir: Path,
        steps_per_epoch: int,
    ) -> None:
        self.cfg, self.stage, self.model, self.rank, self.run_dir = cfg, stage, model, rank, run_dir
        self.steps_per_epoch = steps_per_epoch
        modules = pep_modules(model)
        if len(modules) != 1:
            raise ConfigError(f"train.stage={stage}: expected one PEP embedding module, found {len(modules)}")
        ((self.module_fqn, self.module),) = modules.items()
        self.dim = dim
        self.tables = dict(tables)
        self.table_order = list(self.tables)
        self.total = sum(self.tables.values()) * self.dim
        self.budgets = (
            sorted((budget_count(b, self.total), b) for b in cfg.budgets) if stage == "search" else []
        )
        if cfg.mask_layout not in MASK_LAYOUTS:
            raise ConfigError(f"pep.mask_layout={cfg.mask_layout!r}: expected one of {list(MASK_LAYOUTS)}")
        try:  # at start-up, not at the first snapshot
            check_row_rules(cfg.min_row_dims, cfg.max_row_dims, dim)
        except ValueError as e:
            raise ConfigError(
                f"pep.min_row_dims={cfg.min_row_dims}, pep.max_row_dims={cfg.max_row_dims}: {e}"
            ) from e
        self.rows = sum(self.tables.values())
        for count, budget in self.budgets:
            if count > (cfg.max_row_dims or dim) * self.rows:
                raise ConfigError(
                    f"pep.budgets: {budget} ({count} elements) is more than pep.max_row_dims="
                    f"{cfg.max_row_dims} allows over {self.rows} rows"
                )
        self.mask_meta: dict[str, Any] | None = None

    # ---- stored-table pieces on this rank ------------------------------------------------------
    def _stored_pieces(self) -> dict[str, list[tuple[int, int, torch.Tensor]]]:
        """table → this rank's (row offset, stored column offset, [R, C] live weight views)."""
        out: dict[str, list] = {t: [] for t in self.table_order}
        for key, value in self.model.state_dict().items():
            parts = key.split(".")
            if (
                len(parts) >= 3
                and parts[-1] == "weight"
                and parts[-3] == "embedding_bags"
                and "_embedding_bag_collection" in parts
                and parts[-2] in out
            ):
                for index, tensor in local_pieces(value):
                    out[parts[-2]].append((index[0].start, index[1].start, tensor))
        return out

    def _v_pieces(self) -> dict[str, list[tuple[int, int, torch.Tensor]]]:
        """table → this rank's pieces of v (stored columns [0, D))."""
        out: dict[str, list] = {}
        for table, pieces in self._stored_pieces().items():
            out[table] = []
            for r, c, tensor in pieces:
                if c < self.dim:
                    out[table].append((r, c, tensor[:, : self.dim - c]))
        return out

    # ---- search ------------------------------------------------------------------------------
    def save_init(self) -> Path:
        """Save the step-0 embedding (v only) for lottery-ticket retraining."""
        path = RunDir(self.run_dir).init_dir
        meta = {"kind": "init", "dim": self.dim, "tables": {t: {"rows": n} for t, n in self.tables.items()}}
        return write_arrays(
            path,
            {t: (n, self.dim) for t, n in self.tables.items()},
            np.float32,
            self._v_pieces(),
            meta,
            rank=self.rank,
        )

    def kept_by_table(self) -> dict[str, int]:
        """Kept elements per table over all ranks (one all-reduce)."""
        local = self.module.kept_counts()
        counts = torch.tensor([local.get(t, 0) for t in self.table_order], dtype=torch.int64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        return dict(zip(self.table_order, counts.tolist()))

    def snapshot(
        self, budget: float, count: int, *, step: int, valid_auc: float, kept_now: int
    ) -> dict[str, Any]:
        """Save the mask keeping exactly `count` elements, ranked by margin."""
        margins = {t: list(self.module.local_margins(t)) for t in self.table_order}
        min_row = affordable_floor(self.cfg.min_row_dims, count, self.rows)
        keep = select_mask(
            margins,
            count,
            self.table_order,
            dim=self.dim,
            min_row=min_row,
            max_row=self.cfg.max_row_dims,
            layout=self.cfg.mask_layout,
        )
        kept_by_table = torch.tensor([sum(int(m.sum()) for _, _, m in keep[t]) for t in self.table_order])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(kept_by_table)
        path = RunDir(self.run_dir).mask_dir(budget)
        kept = dict(zip(self.table_order, kept_by_table.tolist()))
        warnings = [
            w
            for w in (
                floor_clip_note(self.cfg.min_row_dims, min_row, count, self.rows),
                interaction_warning(kept),
            )
            if w
        ]
        for warning in warnings:
            if self.rank == 0:
                logger.warning("budget %s: %s", budget, warning)
        meta = {
            "kind": "mask",
            "criterion": "pep_margin",
            "layout": self.cfg.mask_layout,
            "min_row_dims": min_row,
            "max_row_dims": self.cfg.max_row_dims,
            "budget": budget,
            "kept": count,
            "step": step,
            "valid_auc": valid_auc,
            "learned_kept": kept_now,
            "granularity": self.cfg.granularity,
            "dim": self.dim,
            "init": "../../init",
            "embedding_params_total": self.total,
            "tables": {
                t: {"rows": n, "kept": int(k)} for (t, n), k in zip(self.tables.items(), kept_by_table)
            },
            "warnings": warnings,
        }
        write_arrays(
            path, {t: (n, self.dim) for t, n in self.tables.items()}, np.bool_, keep, meta, rank=self.rank
        )
        logger.info("saved %s (%d elements) at step %d", path, count, step)
        return {"budget": budget, "kept": count, "step": step, "valid_auc": valid_auc, "path": str(path)}

    def target_share(self, step: int) -> float | None:
        """The pressure schedule's kept share at `step` (geometric from 1 to the floor)."""
        if self.cfg.target_epochs <= 0 or not self.budgets:
            return None
        floor = self.cfg.target_floor or 0.8 * self.budgets[0][0] / self.total
        progress = min(1.0, step / (self.cfg.target_epochs * self.steps_per_epoch))
        return math.exp(progress * math.log(floor))

    @torch.no_grad()
    def set_kept_share(self, share: float) -> float:
        """Set the threshold scale gk so that exactly round(share·total) elements are kept.

        Why gk: the tables' fused Adagrad normalises every gradient, so a push on s cannot move it
        faster than ~lr/sqrt(touches) however strong it is; gk scales every threshold gk·sigmoid(s)
        at once. An element is kept iff z = |v| / sigmoid(s) > gk, so gk is set to the
        (K+1)-th largest z over all shards: the schedule is met exactly at every control step, and
        each element's learned s decides its place in the ranking (the loss pushes the s of
        elements it needs down, so they survive a larger gk).
        Returns:
            The new gk.
        """
        count = round(share * self.total)
        if count >= self.total:
            self.module.gk = 0.0
            return 0.0
        log_unit = getattr(self.module, "local_log_unit_thresholds", None)
        if log_unit is not None:
            # log z = log|v| - log sigmoid(s), computed directly: the difference of two margins
            # (below) loses sigmoid(s) to float32 rounding once it is < ~1e-7·|v| (s far negative).
            saved = self.module.gk
            self.module.gk = 0.0
            keys = {}
            for table in self.table_order:
                magnitude = self.module.local_margins(table)  # |v|
                keys[table] = [
                    (r, c, torch.log(a) - b) for (r, c, a), (_, _, b) in zip(magnitude, log_unit(table))
                ]
            self.module.gk = saved
            self.module.gk = math.exp(kth_largest(keys, count + 1))
            return float(self.module.gk)
        saved = self.module.gk
        ratios: dict[str, list] = {}
        for table in self.table_order:
            self.module.gk = 0.0
            magnitude = self.module.local_margins(table)  # |v|
            self.module.gk = 1.0
            unit = self.module.local_margins(table)  # |v| - sigmoid(s)
            ratios[table] = [
                (r, c, a / (a - b).clamp_min(1e-30)) for (r, c, a), (_, _, b) in zip(magnitude, unit)
            ]
        self.module.gk = saved
        self.module.gk = kth_largest(ratios, count + 1)
        return float(self.module.gk)

    # ---- retrain -------------------------------------------------------------------------------
    @torch.no_grad()
    def load_ticket(self) -> dict[str, Any]:
        """Start from init x mask (or the fresh init x mask with `reinit`), m = mask."""
        mask_dir = Path(self.cfg.mask)
        meta = read_meta(mask_dir, "mask")
        if int(meta["dim"]) != self.dim:
            raise ConfigError(
                f"pep.mask: {mask_dir} is for embedding_dim {meta['dim']}, the model has {self.dim}"
            )
        missing = sorted(set(self.tables) - set(meta["tables"]))
        if missing:
            raise ConfigError(f"pep.mask: {mask_dir} has no mask for tables {missing}")
        init_dir = None if self.cfg.reinit else init_dir_of(mask_dir, meta)
        for table, pieces in self._stored_pieces().items():
            shape = (self.tables[table], self.dim)
            mask = open_array(mask_dir, table, shape)
            init = None if init_dir is None else open_array(init_dir, table, shape)
            for r, c, stored in pieces:
                if c != 0 or stored.shape[1] != 2 * self.dim:
                    raise ConfigError(f"table {table}: retrain needs whole [v | m] rows on a shard")
                rows = slice(r, r + stored.shape[0])
                m = torch.from_numpy(np.array(mask[rows])).to(stored.dtype)
                v = stored[:, : self.dim] if init is None else torch.from_numpy(np.array(init[rows]))
                stored[:, : self.dim] = v.to(stored.dtype) * m
                stored[:, self.dim :] = m
        if meta.get("warm_start"):
            self._warm_start(Path(meta["warm_start"]))
        self.mask_meta = meta
        return meta

    def _warm_start(self, checkpoint: Path) -> None:
        """Fine-tuning a magnitude-pruned model: every non-PEP parameter and buffer (MLPs, linear
        terms, batch-norm statistics) starts from the pruned run's checkpoint too."""
        state = {k: v for k, v in self.model.state_dict().items() if "._embedding_bag_collection." not in k}
        dcp.load({"model": state}, checkpoint_id=str(checkpoint))
        self.model.load_state_dict(state, strict=False)

    def nonzero_v(self) -> int:
        """Non-zero v elements over all ranks (retrain: must equal the mask size)."""
        local = sum(int((t != 0).sum()) for pieces in self._v_pieces().values() for _, _, t in pieces)
        count = torch.tensor([local], dtype=torch.int64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(count)
        return int(count.item())
