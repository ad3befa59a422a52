"""Reading a run directory for the report: config, metrics, summary, its masks and its dataset.

Legend: R = rows (ids) of one table, D = embedding_dim.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pep_torchrec.data.schema import Schema, SchemaError
from pep_torchrec.training.run_dir import RunDir, RunDirError, read_meta
from pep_torchrec.utils.errors import UserError

log = logging.getLogger(__name__)

TABLE_PREFIX = "t_"
# Mask elements reduced per chunk (bools): 32 MiB whatever the table's shape.
_CHUNK_ELEMENTS = 1 << 25


class ReportError(UserError):
    """The run directory (or its dataset) cannot be reported on; the message names the file and why."""


@dataclass
class Run:
    """What a run directory holds, parsed.

    Attributes:
        run_dir: the run directory.
        config: config.yaml as plain data.
        summary: summary.json ({} while the run is still training).
        metrics: metrics.jsonl, one dict per evaluation, in file order.
        stage: "baseline", "search" or "retrain".
    """

    run_dir: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    stage: str

    def setting(self, section: str, key: str, default: Any = None) -> Any:
        value = (self.config.get(section) or {}).get(key, default)
        return default if value is None else value

    @property
    def embedding_dim(self) -> int | None:
        dim = self.setting("model", "embedding_dim")
        return int(dim) if dim is not None else None

    @property
    def total_params(self) -> int | None:
        """Embedding elements of all tables: summary.json, else kept / kept_share of an evaluation."""
        if self.summary.get("embedding_params_total"):
            return int(self.summary["embedding_params_total"])
        for m in self.metrics:
            if m.get("kept") and m.get("kept_share"):
                return int(round(m["kept"] / m["kept_share"]))
        return None


@contextlib.contextmanager
def _as_report_error() -> Iterator[None]:
    """The run directory's errors (`RunDirError`) as `ReportError`s: one message, the report's type."""
    try:
        yield
    except RunDirError as e:
        raise ReportError(str(e)) from None


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read config.yaml, metrics.jsonl and (if present) summary.json of a run directory."""
    run = RunDir(run_dir)
    with _as_report_error():
        run.require()
        config = run.config_data()
        metrics = run.metrics()
        summary = run.summary()
        stage = run.stage(summary=summary, config=config)
    return Run(run_dir=run.path, config=config, summary=summary, metrics=metrics, stage=stage)


# ---------------------------------------------------------------------------------------------------
# masks and per-row sizes


@dataclass
class Mask:
    """One mask directory: `<table>.npy` bool [R, D] (True = kept) and meta.json.

    Attributes:
        label: how plots and tables name it ("budget 0.1").
        path: the directory.
        meta: meta.json.
        tables: table → rows, in model order.
    """

    label: str
    path: Path
    meta: dict[str, Any]
    tables: dict[str, int]

    @property
    def budget(self) -> float | None:
        return self.meta.get("budget")


def load_mask(path: Path) -> Mask:
    with _as_report_error():
        meta = read_meta(path)
    if meta.get("tables"):
        tables = {t: int(info["rows"]) for t, info in meta["tables"].items()}
    else:  # older metas: take the arrays' own shapes
        tables = {p.stem: int(np.load(p, mmap_mode="r").shape[0]) for p in sorted(path.glob("*.npy"))}
    if not tables:
        raise ReportError(f"{path}: no <table>.npy arrays")
    budget = meta.get("budget")
    label = f"budget {budget:g}" if isinstance(budget, (int, float)) else path.name
    return Mask(label=label, path=path, meta=meta, tables=tables)


def find_masks(run: Run, notes: list[str]) -> list[Mask]:
    """The masks a report covers: a search's snapshots (largest budget first) or a retrain's mask."""
    if run.stage == "search":
        masks = []
        for path in sorted(RunDir(run.run_dir).mask_dirs(complete=False), key=lambda p: p.name):
            if not (path / "meta.json").is_file():
                notes.append(f"`{path.name}` skipped: incomplete (no meta.json)")
                continue
            masks.append(load_mask(path))
        return sorted(masks, key=lambda m: -(m.budget if m.budget is not None else math.inf))
    if run.stage == "retrain":
        recorded = run.summary.get("mask") or run.setting("pep", "mask", "")
        if not recorded:
            notes.append("the retrain records no mask (dense retrain?): no embedding-size plots")
            return []
        path = RunDir(run.run_dir).resolve(recorded)
        if path is None:
            notes.append(f"the retrain's mask `{recorded}` was not found: no embedding-size plots")
            return []
        return [load_mask(path)]
    return []


def row_sizes(path: Path, rows: int) -> np.ndarray:
    """Kept dimensions of every row of one mask table, [R] int32, from the memory-mapped .npy in chunks."""
    if not path.is_file():
        raise ReportError(f"{path}: missing")
    mask_RD = np.load(path, mmap_mode="r")
    if mask_RD.dtype != np.bool_ or mask_RD.ndim != 2 or mask_RD.shape[0] != rows:
        raise ReportError(
            f"{path}: want a bool [{rows}, D] mask, found {mask_RD.dtype} {tuple(mask_RD.shape)}"
        )
    sizes_R = np.empty(rows, np.int32)
    step = max(1, _CHUNK_ELEMENTS // max(1, mask_RD.shape[1]))
    for start in range(0, rows, step):
        sizes_R[start : start + step] = np.count_nonzero(mask_RD[start : start + step], axis=1)
    return sizes_R


def find_dataset(run: Run, data: str | os.PathLike | None, notes: list[str]) -> tuple[Path, Schema] | None:
    """The prepared dataset and its schema: `data` if given (an error if it is not one), else the run's
    data.path, or None with a note when that cannot be found (the report goes on without frequencies)."""
    recorded = data if data is not None else run.setting("data", "path", "")
    if not recorded:
        notes.append("config.yaml names no data.path: no frequency analysis")
        return None
    path = Path(recorded) if data is not None else RunDir(run.run_dir).resolve(recorded)
    if data is not None and not (Path(data) / "schema.json").is_file():
        raise ReportError(f"{data}: not a prepared dataset (schema.json missing)")
    if path is None or not (path / "schema.json").is_file():
        notes.append(f"prepared dataset `{recorded}` not found (pass --data): no frequency analysis")
        return None
    try:
        return path, Schema.load(path)
    except SchemaError as e:
        notes.append(f"dataset schema unreadable ({e}): no frequency analysis")
        return None


def run_snapshots(run: Run, masks: Sequence[Mask]) -> list[dict[str, Any]]:
    """summary.json's snapshots, else the masks' meta.json (a search still running)."""
    if run.summary.get("snapshots"):
        return list(run.summary["snapshots"])
    if run.stage != "search":
        return []
    keys = ("budget", "kept", "step", "valid_auc")
    return [{k: m.meta.get(k) for k in keys} | {"path": str(m.path)} for m in masks]


def run_numbers(run: Run) -> dict[str, Any]:
    """The headline numbers of a run (summary.json, else the last evaluation)."""
    s, last = run.summary, run.metrics[-1]
    total = run.total_params
    kept = s.get("embedding_params_kept", last.get("kept", total if run.stage == "baseline" else None))
    return {
        "stage": run.stage,
        "model": s.get("model") or run.setting("model", "name"),
        "dataset": s.get("dataset") or Path(str(run.setting("data", "path", ""))).name or None,
        "embedding_dim": run.embedding_dim,
        "steps": s.get("steps", last["step"]),
        "best_step": s.get("best_step"),
        "stop_reason": s.get("stop_reason"),
        "valid_auc": s.get("valid_auc", last.get("valid_auc")),
        "best_valid_auc": last.get("best_valid_auc"),
        "valid_logloss": s.get("valid_logloss", last.get("valid_logloss")),
        "test_auc": s.get("test_auc"),
        "test_logloss": s.get("test_logloss"),
        "embedding_params_total": total,
        "embedding_params_kept": kept,
        "kept_share": kept / total if kept is not None and total else None,
        "train_seconds": s.get("train_seconds", last.get("train_seconds")),
        "mask": s.get("mask") or (run.setting("pep", "mask") if run.stage == "retrain" else None),
        "finished": bool(s),
    }
