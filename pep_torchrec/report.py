"""Plots and a Markdown summary of one run: kept parameters, AUC and the learned embedding sizes.

    pep-torchrec report --run-dir runs/mlsearch                 # writes runs/mlsearch/report/
    pep-torchrec report --run-dir runs/mlsearch --out /tmp/rep  # anywhere else

OUT/report.md embeds each plot for which the run has the data:

    kept_and_auc.png       search: kept share of the embedding parameters (log) and valid AUC over the
                           steps, snapshots marked; baseline and retrain: valid AUC
    embedding_sizes.png    per mask: how many ids (rows) keep 0..D dimensions; 0 = pruned from the id space
    size_vs_frequency.png  per mask: kept dimensions of an id against its frequency in the train split
    kept_by_table.png      per mask: share of each table's elements kept

A search run's report also says what the search learned (pep_torchrec/pep/diagnostics.py: threshold
spread, overlap with magnitude, row-size histograms, Spearman(frequency, size) per snapshot, from the
snapshot's checkpoint), in report.md and OUT/search_diagnostics.json.

A search's masks are its snapshots (RUN/masks/budget_*/, complete ones only); a retrain's is the mask it
trained with (summary.json or config pep.mask). Frequencies are counted in the train split of the prepared
dataset named by config data.path (a relative path is tried against the working directory, then against
each parent of the run directory; `--data` overrides it). When the dataset cannot be found the frequency
plot is left out and report.md says why. A run without summary.json (still training) is reported from
metrics.jsonl alone.

Memory stays bounded for huge tables: masks are memory-mapped and reduced in row chunks to one size per
row, Parquet is read one row group and one column at a time, and the frequency/size statistics are kept
as histograms of distinct (frequency, size) pairs. The peak is a few int64 arrays of the largest table's
row count, plus one int64 count per id of every table.

OUT is written atomically: everything goes to a temporary sibling directory that is renamed into place.
An existing OUT is replaced only if it is empty or an earlier report (flat, with report.md).

Legend: R = rows (ids) of one table, D = embedding_dim, P = distinct (frequency, size) pairs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pep_torchrec.data.schema import Schema, SchemaError

log = logging.getLogger(__name__)

#: File name of every plot, by the key make_report returns it under.
PLOT_FILES = {
    "kept_and_auc": "kept_and_auc.png",
    "embedding_sizes": "embedding_sizes.png",
    "size_vs_frequency": "size_vs_frequency.png",
    "kept_by_table": "kept_by_table.png",
}
TABLE_PREFIX = "t_"
# Mask elements reduced per chunk (bools): 32 MiB whatever the table's shape.
_CHUNK_ELEMENTS = 1 << 25
_DPI = 110


class ReportError(ValueError):
    """The run directory (or its dataset) cannot be reported on; the message names the file and why."""


# ---------------------------------------------------------------------------------------------------
# reading a run


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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Parse metrics.jsonl; a half-written last line (a run still writing) is skipped with a warning."""
    if not path.is_file():
        raise ReportError(f"{path}: missing (not a training run, or it has not evaluated yet)")
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = []
    for i, (lineno, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                log.warning("%s:%d: skipping an incomplete last line (%s)", path, lineno, e.msg)
                continue
            raise ReportError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
        if not isinstance(record, dict) or "step" not in record:
            raise ReportError(f"{path}:{lineno}: an evaluation record needs a 'step'")
        records.append(record)
    if not records:
        raise ReportError(f"{path}: no evaluations yet")
    return records


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read config.yaml, metrics.jsonl and (if present) summary.json of a run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: run directory not found")
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ReportError(f"{config_path}: missing (is {run_dir} a run directory?)")
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ReportError(f"{config_path}: invalid YAML ({e})") from e
    if not isinstance(config, dict):
        raise ReportError(f"{config_path}: top level must be a mapping")
    metrics = read_metrics(run_dir / "metrics.jsonl")
    summary_path = run_dir / "summary.json"
    summary = _read_json(summary_path) if summary_path.is_file() else {}
    stage = summary.get("stage") or (config.get("train") or {}).get("stage") or "baseline"
    if stage not in ("baseline", "search", "retrain"):
        raise ReportError(f"{run_dir}: unknown stage {stage!r} (want baseline, search or retrain)")
    return Run(run_dir=run_dir, config=config, summary=summary, metrics=metrics, stage=stage)


def resolve_path(path: str | os.PathLike, run_dir: Path) -> Path | None:
    """A path recorded in a run: absolute, else relative to the working directory, else to a parent of
    the run directory (runs record paths relative to where training was launched). None if not found."""
    p = Path(path)
    if p.is_absolute():
        return p if p.exists() else None
    for base in (Path.cwd(), *run_dir.resolve().parents):
        if (base / p).exists():
            return base / p
    return None


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
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise ReportError(f"{path}: not a complete mask directory (meta.json missing)")
    meta = _read_json(meta_path)
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
        for path in sorted((run.run_dir / "masks").glob("budget_*")):
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
        path = resolve_path(recorded, run.run_dir)
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


# ---------------------------------------------------------------------------------------------------
# frequencies and rank correlation


def train_frequencies(dataset_dir: Path, schema: Schema, rows: dict[str, int]) -> dict[str, np.ndarray]:
    """Occurrences of every id in the train split, streamed one row group and one column at a time.

    Args:
        dataset_dir: the prepared dataset.
        schema: its schema.
        rows: feature → number of ids to count (the table's rows); multi-hot bags count every element.
    Returns:
        feature → [R] int64 counts.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    counts = {name: np.zeros(n, np.int64) for name, n in rows.items()}
    files = schema.splits["train"].files
    if not files:
        raise ReportError(f"{dataset_dir}/schema.json: the train split lists no files")
    for rel in files:
        path = dataset_dir / rel
        if not path.is_file():
            raise ReportError(f"{path}: train file listed in schema.json is missing")
        parquet = pq.ParquetFile(path)
        missing = [name for name in counts if name not in parquet.schema_arrow.names]
        if missing:
            raise ReportError(f"{path}: columns {missing} missing")
        for group in range(parquet.num_row_groups):
            for name, acc_R in counts.items():
                column = parquet.read_row_group(group, columns=[name]).column(0)
                for chunk in column.chunks:
                    if pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type):
                        chunk = chunk.flatten()
                    ids = chunk.drop_null().to_numpy(zero_copy_only=False)
                    if ids.size == 0:
                        continue
                    low, high = int(ids.min()), int(ids.max())
                    if low < 0 or high >= acc_R.size:
                        bad = low if low < 0 else high
                        raise ReportError(
                            f"{path}: row group {group}: {name!r} holds id {bad}, outside "
                            f"the table's [0, {acc_R.size})"
                        )
                    counted = np.bincount(ids)  # only up to the largest id seen, not the table's length
                    acc_R[: counted.size] += counted
    return counts


def _average_ranks(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """1-based ranks of `values` where element i stands for weights[i] tied observations (mid-ranks)."""
    unique, inverse = np.unique(values, return_inverse=True)
    weight_U = np.bincount(inverse.ravel(), weights=weights, minlength=unique.size)
    # A tie group of weight w after c observations holds ranks c+1..c+w; its mean is cumsum - (w - 1) / 2.
    rank_U = np.cumsum(weight_U) - (weight_U - 1) / 2
    return rank_U[inverse.ravel()]


def spearman(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    weights: Sequence[float] | np.ndarray | None = None,
) -> float:
    """Spearman rank correlation with mid-ranks for ties (scipy.stats.spearmanr's definition).

    Args:
        x, y: [P] paired observations.
        weights: [P] how many observations each pair stands for (a histogram of pairs); default 1 each.
    Returns:
        rho in [-1, 1]; NaN when fewer than 2 observations or either side is constant.
    """
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    w = np.ones_like(x) if weights is None else np.asarray(weights, np.float64).ravel()
    if not x.shape == y.shape == w.shape:
        raise ValueError(f"x, y and weights must have one shape; got {x.shape}, {y.shape}, {w.shape}")
    n = w.sum()
    if n < 2:
        return math.nan
    rank_x, rank_y = _average_ranks(x, w), _average_ranks(y, w)
    dx = rank_x - (w * rank_x).sum() / n
    dy = rank_y - (w * rank_y).sum() / n
    var_x, var_y = (w * dx * dx).sum(), (w * dy * dy).sum()
    if var_x <= 0 or var_y <= 0:
        return math.nan
    return float(np.clip((w * dx * dy).sum() / math.sqrt(var_x * var_y), -1.0, 1.0))


@dataclass
class Pairs:
    """Histogram of (train frequency, kept dimensions) over a table's rows: [P] arrays."""

    freq: np.ndarray
    size: np.ndarray
    count: np.ndarray

    @classmethod
    def of(cls, freq_R: np.ndarray, sizes_R: np.ndarray) -> Pairs:
        base = int(sizes_R.max(initial=0)) + 1
        unique, count = np.unique(freq_R.astype(np.int64) * base + sizes_R, return_counts=True)
        return cls(unique // base, unique % base, count.astype(np.int64))

    @classmethod
    def merge(cls, parts: Sequence[Pairs]) -> Pairs:
        freq = np.concatenate([p.freq for p in parts])
        size = np.concatenate([p.size for p in parts])
        base = int(size.max(initial=0)) + 1
        unique, inverse = np.unique(freq * base + size, return_inverse=True)
        count = np.bincount(inverse.ravel(), weights=np.concatenate([p.count for p in parts]))
        return cls(unique // base, unique % base, np.rint(count).astype(np.int64))

    @property
    def rows(self) -> int:
        return int(self.count.sum())

    def spearman(self) -> float:
        return spearman(self.freq, self.size, self.count)

    def binned_means(self, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mean kept dims per bin of frequency + 1 ([e_i, e_i+1)); x = the bin's geometric-mean freq + 1.

        Returns:
            (x, mean size, rows) of the non-empty bins.
        """
        which = np.digitize(self.freq + 1, edges) - 1
        rows = np.bincount(which, weights=self.count, minlength=edges.size)[: edges.size - 1]
        sizes = np.bincount(which, weights=self.count * self.size, minlength=edges.size)[: edges.size - 1]
        logs = np.bincount(which, weights=self.count * np.log(self.freq + 1.0), minlength=edges.size)
        keep = rows > 0
        return np.exp(logs[: edges.size - 1][keep] / rows[keep]), sizes[keep] / rows[keep], rows[keep]

    def by_decade(self) -> list[tuple[str, int, float]]:
        """(frequency range, rows, mean kept dims) for 0, 1–9, 10–99, … (non-empty ranges only)."""
        decade = np.where(self.freq > 0, np.floor(np.log10(np.maximum(self.freq, 1))).astype(np.int64) + 1, 0)
        out = []
        for d in range(int(decade.max(initial=0)) + 1):
            sel = decade == d
            rows = int(self.count[sel].sum())
            if rows:
                label = "0" if d == 0 else f"{10 ** (d - 1):,}–{10**d - 1:,}"
                out.append((label, rows, float((self.count[sel] * self.size[sel]).sum() / rows)))
        return out


def frequency_edges(max_freq: int, bins: int = 16) -> np.ndarray:
    """Integer log-spaced edges over frequency + 1; the first bin [1, 2) holds the ids unseen in train."""
    return np.unique(np.rint(np.geomspace(1, max_freq + 2, bins + 1)).astype(np.int64))


# ---------------------------------------------------------------------------------------------------
# statistics of a mask


@dataclass
class TableStats:
    """One table of one mask: ids, kept elements, ids with nothing kept, the size histogram and, where the
    train frequencies are known, the (frequency, size) pairs."""

    rows: int
    dim: int
    kept: int
    pruned_rows: int
    size_hist: np.ndarray  # [D + 1] rows per kept-dims count
    pairs: Pairs | None = None

    @property
    def kept_share(self) -> float:
        return self.kept / max(1, self.rows * self.dim)


@dataclass
class MaskStats:
    """Every table of one mask (model order), with totals and the rank correlations."""

    mask: Mask
    dim: int
    tables: dict[str, TableStats] = field(default_factory=dict)
    _pooled: Pairs | None = field(default=None, repr=False)

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables.values())

    @property
    def kept(self) -> int:
        return sum(t.kept for t in self.tables.values())

    @property
    def pruned_rows(self) -> int:
        return sum(t.pruned_rows for t in self.tables.values())

    @property
    def size_hist(self) -> np.ndarray:
        return np.sum([t.size_hist for t in self.tables.values()], axis=0)

    @property
    def pairs(self) -> Pairs | None:
        """The (frequency, size) histogram of every table with known frequencies, pooled."""
        if self._pooled is None:
            parts = [t.pairs for t in self.tables.values() if t.pairs is not None]
            self._pooled = Pairs.merge(parts) if parts else None
        return self._pooled

    def table_spearman(self, table: str) -> float | None:
        pairs = self.tables[table].pairs
        return pairs.spearman() if pairs is not None else None

    def pooled_spearman(self) -> float | None:
        return self.pairs.spearman() if self.pairs is not None else None

    def within_table_spearman(self) -> float | None:
        """Per-table rho averaged with rows as weights (tables where rho is undefined left out)."""
        rhos = [(t.pairs.spearman(), t.rows) for t in self.tables.values() if t.pairs is not None]
        rhos = [(r, n) for r, n in rhos if not math.isnan(r)]
        if not rhos:
            return None
        return sum(r * n for r, n in rhos) / sum(n for _, n in rhos)


def mask_stats(mask: Mask, frequencies: dict[str, np.ndarray] | None) -> MaskStats:
    """Per-table sizes of one mask, with (frequency, size) pairs where the table's frequencies are known."""
    dims = {
        int(np.load(mask.path / f"{t}.npy", mmap_mode="r").shape[1])
        for t in mask.tables
        if (mask.path / f"{t}.npy").is_file()
    }
    if len(dims) > 1:
        raise ReportError(f"{mask.path}: tables have different widths {sorted(dims)}")
    dim = dims.pop() if dims else int(mask.meta.get("dim", 0))
    stats = MaskStats(mask=mask, dim=dim)
    for table, rows in mask.tables.items():
        sizes_R = row_sizes(mask.path / f"{table}.npy", rows)
        freq_R = (frequencies or {}).get(table.removeprefix(TABLE_PREFIX))
        stats.tables[table] = TableStats(
            rows=rows,
            dim=dim,
            kept=int(sizes_R.sum(dtype=np.int64)),
            pruned_rows=int((sizes_R == 0).sum()),
            size_hist=np.bincount(sizes_R, minlength=dim + 1),
            pairs=Pairs.of(freq_R, sizes_R) if freq_R is not None else None,
        )
    return stats


def _dataset(run: Run, data: str | os.PathLike | None, notes: list[str]) -> tuple[Path, Schema] | None:
    """The prepared dataset and its schema: `data` if given (an error if it is not one), else the run's
    data.path, or None with a note when that cannot be found (the report goes on without frequencies)."""
    recorded = data if data is not None else run.setting("data", "path", "")
    if not recorded:
        notes.append("config.yaml names no data.path: no frequency analysis")
        return None
    path = Path(recorded) if data is not None else resolve_path(recorded, run.run_dir)
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


# ---------------------------------------------------------------------------------------------------
# plots (matplotlib's object API with the Agg canvas: no pyplot, no display, no global state)


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ReportError("the report needs matplotlib: pip install matplotlib") from e
    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=_DPI)
    return path


def _title(run: Run) -> str:
    model = run.summary.get("model") or run.setting("model", "name", "?")
    dataset = run.summary.get("dataset") or Path(str(run.setting("data", "path", "?"))).name
    return f"{run.run_dir.name}: {run.stage} · {model} on {dataset}"


def _snapshots(run: Run, masks: Sequence[Mask]) -> list[dict[str, Any]]:
    """summary.json's snapshots, else the masks' meta.json (a search still running)."""
    if run.summary.get("snapshots"):
        return list(run.summary["snapshots"])
    if run.stage != "search":
        return []
    keys = ("budget", "kept", "step", "valid_auc")
    return [{k: m.meta.get(k) for k in keys} | {"path": str(m.path)} for m in masks]


def plot_kept_and_auc(run: Run, snapshots: Sequence[dict[str, Any]], path: Path) -> Path:
    from matplotlib.ticker import PercentFormatter

    fig = _figure(8.5, 4.4)
    ax = fig.add_subplot()
    steps = np.array([m["step"] for m in run.metrics])
    auc = np.array([m.get("valid_auc", np.nan) for m in run.metrics], dtype=float)
    kept = [(m["step"], m["kept_share"]) for m in run.metrics if m.get("kept_share")]
    total = run.total_params
    if run.stage == "search" and kept:
        auc_ax = ax.twinx()
        ks, share = zip(*kept)
        handles = ax.plot(ks, share, color="C0", label="kept share (left, log)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))
        ax.set_ylabel("kept share of embedding parameters (log)")
        auc_color = "C1"
        handles += auc_ax.plot(steps, auc, color=auc_color, label="valid AUC (right)")
        auc_ax.set_ylabel("valid AUC")
        snaps = [s for s in snapshots if s.get("step") is not None]
        if snaps and total:
            xs = [s["step"] for s in snaps]
            handles.append(
                ax.scatter(
                    xs,
                    [s["kept"] / total for s in snaps],
                    marker="o",
                    s=36,
                    color="C0",
                    edgecolor="black",
                    zorder=4,
                    label="snapshot (mask saved)",
                )
            )
            for s in snaps:
                ax.axhline(s["kept"] / total, color="C0", lw=0.6, ls=":", alpha=0.6)
                ax.annotate(
                    f"{s['budget']:g}",
                    (s["step"], s["kept"] / total),
                    textcoords="offset points",
                    xytext=(-6, -13),
                    ha="right",
                    fontsize=8,
                    color="C0",
                )
            if any(s.get("valid_auc") is not None for s in snaps):
                auc_ax.scatter(
                    xs,
                    [s.get("valid_auc", np.nan) for s in snaps],
                    marker="D",
                    s=30,
                    color=auc_color,
                    edgecolor="black",
                    zorder=4,
                )
        ax.legend(handles=handles, loc="lower left", fontsize=8)
    else:
        ax.plot(steps, auc, color="C1", marker="." if len(steps) < 60 else None, label="valid AUC")
        ax.set_ylabel("valid AUC")
        best = run.summary.get("best_step")
        if best is not None:
            ax.axvline(best, color="gray", ls="--", lw=0.8, label=f"best step {best}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.set_title(_title(run), fontsize=10)
    return _save(fig, path)


def _grid(n: int) -> tuple[int, int]:
    cols = 1 if n == 1 else 2
    return math.ceil(n / cols), cols


def plot_embedding_sizes(run: Run, stats: Sequence[MaskStats], path: Path) -> Path:
    nrows, ncols = _grid(len(stats))
    fig = _figure(5.2 * ncols, 3.4 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax, s in zip(axes, stats):
        hist = s.size_hist
        colors = ["C3"] + ["C0"] * (hist.size - 1)
        ax.bar(np.arange(hist.size), np.where(hist > 0, hist, np.nan), width=0.85, color=colors)
        ax.set_yscale("log")
        ax.set_xlim(-0.8, s.dim + 0.8)
        kept_rows = s.rows - s.pruned_rows
        mean = (np.arange(hist.size) * hist).sum() / kept_rows if kept_rows else 0.0
        ax.text(
            0.98,
            0.97,
            f"pruned ids (0 dims, red): {s.pruned_rows:,} of {s.rows:,} "
            f"({s.pruned_rows / max(1, s.rows):.0%})\nmean dims of the kept ids: {mean:.2f}",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=8,
            bbox={"boxstyle": "round", "fc": "white", "alpha": 0.85, "ec": "0.8"},
        )
        ax.set_title(f"{s.mask.label}: {s.kept:,} kept ({s.kept / max(1, s.rows * s.dim):.1%})", fontsize=9)
        ax.set_xlabel(f"kept dimensions of an id (0..{s.dim})")
        ax.set_ylabel("ids (rows), log")
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(stats) :]:
        ax.set_visible(False)
    fig.suptitle(f"{_title(run)}: embedding size per id", fontsize=10)
    return _save(fig, path)


def plot_size_vs_frequency(run: Run, stats: Sequence[MaskStats], path: Path) -> Path:
    stats = [s for s in stats if s.pairs is not None]
    nrows, ncols = _grid(len(stats))
    fig = _figure(5.2 * ncols + 1.6, 3.6 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel())
    tables = list(stats[0].tables)
    cmap = _colors(len(tables))
    handles: dict[str, Any] = {}
    for ax, s in zip(axes, stats):
        pooled = s.pairs
        assert pooled is not None
        edges = frequency_edges(int(pooled.freq.max(initial=0)))
        for i, (table, t) in enumerate(s.tables.items()):
            if t.pairs is None:
                continue
            x, mean, _ = t.pairs.binned_means(edges)
            (handles[table],) = ax.plot(
                x, mean, color=cmap[i % len(cmap)], lw=1, alpha=0.75, marker=".", ms=3, label=table
            )
        x, mean, rows = pooled.binned_means(edges)
        (handles["all tables"],) = ax.plot(
            x, mean, color="black", lw=2.2, marker="o", ms=4, label="all tables"
        )
        ax.set_xscale("log")
        ax.set_ylim(-0.5, s.dim + 0.5)
        ax.set_title(
            f"{s.mask.label}: Spearman ρ = {_rho(s.pooled_spearman())} all ids, "
            f"{_rho(s.within_table_spearman())} within tables",
            fontsize=9,
        )
        ax.set_xlabel("occurrences in train + 1 (log; 1 = unseen)")
        ax.set_ylabel("mean kept dimensions")
        ax.grid(alpha=0.3)
    for ax in axes[len(stats) :]:
        ax.set_visible(False)
    fig.legend(handles=list(handles.values()), loc="outside right center", fontsize=8, frameon=False)
    fig.suptitle(f"{_title(run)}: kept dimensions vs id frequency (log-binned means)", fontsize=10)
    return _save(fig, path)


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(max(n, 1))]


def plot_kept_by_table(
    run: Run, stats: Sequence[MaskStats], path: Path, signal: set[str] = frozenset()
) -> Path:
    from matplotlib.ticker import PercentFormatter

    tables = list(stats[0].tables)
    names = [f"{t} (signal)" if t.removeprefix(TABLE_PREFIX) in signal else t for t in tables]
    fig = _figure(max(6.0, 0.55 * len(tables) * max(1, len(stats)) ** 0.5 + 2.5), 4.2)
    ax = fig.add_subplot()
    width = 0.8 / len(stats)
    x = np.arange(len(tables))
    shares = np.array([[s.tables[t].kept_share if t in s.tables else np.nan for t in tables] for s in stats])
    positive = shares[shares > 0]
    # Log only when the shares span more than a decade; otherwise bar lengths on a log axis mislead.
    log = positive.size > 0 and positive.max() / positive.min() > 10
    for i, (s, share) in enumerate(zip(stats, shares)):
        ax.bar(
            x + (i - (len(stats) - 1) / 2) * width,
            np.where(share > 0, share, np.nan),
            width=width,
            color=f"C{i % 10}",
            label=f"{s.mask.label} (all tables: {_share(s.kept, s.rows * s.dim)})",
        )
    if log:
        ax.set_yscale("log")
        ax.set_ylim(top=1.5)
    else:
        ax.set_ylim(0, min(1.0, 1.15 * positive.max()) if positive.size else 1.0)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))
    ax.yaxis.set_minor_formatter(PercentFormatter(1.0, decimals=None) if not log else "")
    ax.set_xticks(
        x, names, rotation=30 if len(tables) > 6 else 0, ha="right" if len(tables) > 6 else "center"
    )
    ax.set_ylabel("kept share of the table's elements" + (" (log)" if log else ""))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{_title(run)}: kept share per table", fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------
# Markdown


def _fmt(value: Any) -> str:
    """Markdown cell: counts with thousands separators, metrics to 4 decimals, None/NaN as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    return f"{value:.4f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines + [""]


def _share(part: float, whole: float) -> str:
    return f"{part / whole:.1%}" if whole else "–"


def _rho(rho: float | None) -> str:
    if rho is None:
        return "–"
    return "– (constant)" if math.isnan(rho) else f"{rho:+.3f}"


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


def _markdown(
    run: Run,
    numbers: dict[str, Any],
    snapshots: Sequence[dict[str, Any]],
    stats: Sequence[MaskStats],
    signal: set[str],
    plots: dict[str, str],
    notes: Sequence[str],
    learned: Sequence[str] = (),
) -> str:
    n = numbers
    md = [
        f"# Run report: `{run.run_dir.name}`",
        "",
        f"`{run.run_dir}` · {n['stage']} · {n['model']} on {n['dataset']}"
        + (
            ""
            if n["finished"]
            else " · **still running** (no summary.json yet: numbers of the last evaluation)"
        ),
        "",
        "## Summary",
        "",
    ]
    kept = n["embedding_params_kept"]
    rows: list[list[Any]] = [
        ["stage", n["stage"]],
        ["model", n["model"]],
        ["dataset", n["dataset"]],
        ["embedding dim D", n["embedding_dim"]],
        ["steps", n["steps"]],
        ["best step", n["best_step"]],
        ["stop reason", n["stop_reason"]],
        ["valid AUC", n["valid_auc"]],
        ["valid logloss", n["valid_logloss"]],
        ["test AUC", n["test_auc"]],
        ["test logloss", n["test_logloss"]],
        ["embedding params, total", n["embedding_params_total"]],
        [
            "embedding params, kept",
            None if kept is None else f"{kept:,} ({_share(kept, n['embedding_params_total'] or 0)})",
        ],
        ["mask", None if n["mask"] is None else f"`{n['mask']}`"],
        ["train seconds", None if n["train_seconds"] is None else f"{n['train_seconds']:.1f}"],
    ]
    md += _table(["", "value"], [r for r in rows if r[1] is not None])
    if "kept_and_auc" in plots:
        md += [f"![kept parameters and valid AUC over steps]({plots['kept_and_auc']})", ""]
    if snapshots:
        md += [
            "## Snapshots",
            "",
            "Masks saved when the learned kept count first fell below a budget; each keeps "
            "exactly the budget's count (the top PEP margins).",
            "",
        ]
        md += _table(
            ["budget", "kept", "step", "valid AUC"],
            [
                [
                    f"{s['budget']:g}" if s.get("budget") is not None else None,
                    s.get("kept"),
                    s.get("step"),
                    s.get("valid_auc"),
                ]
                for s in snapshots
            ],
        )
    if stats:
        labels = [s.mask.label for s in stats]
        tables = list(stats[0].tables)
        is_signal = ["yes" if t.removeprefix(TABLE_PREFIX) in signal else "" for t in tables]
        md += [
            "## Kept per table",
            "",
            "Elements kept, and their share of the table's rows × D."
            + (" `signal`: the synthetic generator's informative fields." if signal else ""),
            "",
        ]
        md += _table(
            ["table", "rows"] + (["signal"] if signal else []) + labels,
            [
                [f"`{t}`", stats[0].tables[t].rows]
                + ([is_signal[i]] if signal else [])
                + [f"{s.tables[t].kept:,} ({s.tables[t].kept_share:.1%})" for s in stats]
                for i, t in enumerate(tables)
            ]
            + [
                ["**all**", stats[0].rows]
                + ([""] if signal else [])
                + [f"{s.kept:,} ({_share(s.kept, s.rows * s.dim)})" for s in stats]
            ],
        )
        if "kept_by_table" in plots:
            md += [f"![kept share per table]({plots['kept_by_table']})", ""]
        md += [
            "## Embedding sizes",
            "",
            "Kept dimensions per id (row). An id with 0 kept dimensions is pruned from the id space: "
            "its lookups contribute nothing.",
            "",
        ]
        md += _table(
            ["mask", "ids", "pruned ids", "full-width ids (D)", "mean dims, all ids", "mean dims, kept ids"],
            [
                [
                    s.mask.label,
                    s.rows,
                    f"{s.pruned_rows:,} ({_share(s.pruned_rows, s.rows)})",
                    int(s.size_hist[-1]),
                    f"{s.kept / max(1, s.rows):.2f}",
                    f"{s.kept / max(1, s.rows - s.pruned_rows):.2f}",
                ]
                for s in stats
            ],
        )
        md += ["Pruned ids per table:", ""]
        md += _table(
            ["table", "rows"] + labels,
            [
                [f"`{t}`", stats[0].tables[t].rows]
                + [
                    f"{s.tables[t].pruned_rows:,} ({_share(s.tables[t].pruned_rows, s.tables[t].rows)})"
                    for s in stats
                ]
                for t in tables
            ],
        )
        if "embedding_sizes" in plots:
            md += [f"![histogram of kept dimensions per id]({plots['embedding_sizes']})", ""]
    with_pairs = [s for s in stats if s.pairs is not None]
    if with_pairs:
        md += [
            "## Embedding size vs id frequency",
            "",
            "Spearman rank correlation between an id's occurrences in the train split and its kept "
            "dimensions, over the ids (rows) of a table, ties at mid-ranks. PEP's observation: frequent ids "
            "keep more dimensions (ρ > 0). *all tables* pools every id, so it also reflects differences "
            "between tables; *within tables* is the per-table ρ averaged with the tables' rows as weights. "
            "Id 0 (the OOV bucket) counts like any other id.",
            "",
        ]
        tables = [t for t in with_pairs[0].tables if with_pairs[0].tables[t].pairs is not None]
        md += _table(
            ["table", "rows"] + [s.mask.label for s in with_pairs],
            [
                [f"`{t}`", with_pairs[0].tables[t].rows] + [_rho(s.table_spearman(t)) for s in with_pairs]
                for t in tables
            ]
            + [
                ["**within tables**", "", *[_rho(s.within_table_spearman()) for s in with_pairs]],
                ["**all tables**", "", *[_rho(s.pooled_spearman()) for s in with_pairs]],
            ],
        )
        md += ["Mean kept dimensions by train frequency (all tables):", ""]
        decades = [
            {label: (rows, mean) for label, rows, mean in s.pairs.by_decade()}  # type: ignore[union-attr]
            for s in with_pairs
        ]
        ranges = list(dict.fromkeys(label for d in decades for label in d))
        md += _table(
            ["occurrences in train", "ids"] + [s.mask.label for s in with_pairs],
            [
                [r, max(d.get(r, (0, 0.0))[0] for d in decades)]
                + [f"{d[r][1]:.2f}" if r in d else "–" for d in decades]
                for r in ranges
            ],
        )
        if "size_vs_frequency" in plots:
            md += [f"![kept dimensions vs id frequency]({plots['size_vs_frequency']})", ""]
    md += list(learned)
    if notes:
        md += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(md)


# ---------------------------------------------------------------------------------------------------
# entry points


def _replaceable(out: Path) -> bool:
    """An existing OUT may be replaced only if it is empty or a flat directory holding an earlier report."""
    entries = list(out.iterdir())
    return not entries or ((out / "report.md").is_file() and all(e.is_file() for e in entries))


def make_report(
    run_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    data: str | os.PathLike | None = None,
    search_diagnostics: bool = True,
) -> dict[str, Any]:
    """Write the plots and report.md of one run directory into `out` (default RUN/report), atomically.

    Args:
        run_dir: a baseline, search or retrain run directory (config.yaml + metrics.jsonl at least).
        out: output directory; replaced if it holds an earlier report, refused if it holds anything else.
        data: the prepared dataset, overriding config.yaml's data.path (for the frequency analysis).
        search_diagnostics: a search run: add what the search learned (reads each snapshot's checkpoint).
    Returns:
        {"out", "report_md", "plots": {name: path}, "run": headline numbers, "snapshots": [...],
         "masks": [{"label", "path", "budget", "dim", "rows", "kept", "kept_share", "pruned_rows",
                    "spearman" (all ids pooled), "spearman_within_tables" (row-weighted mean of the tables'),
                    "tables": {table: {"rows", "kept", "kept_share", "pruned_rows", "spearman"}}}],
         "search_diagnostics": pep_torchrec.pep.diagnostics.analyse_search's result or None,
         "notes": [...], "seconds"}; a spearman is None without frequencies, NaN where a side is constant.
    Raises:
        ReportError: the run directory, its metrics or a mask is missing or malformed; OUT is not replaceable.
    """
    start = time.perf_counter()
    run = load_run(run_dir)
    out = Path(out) if out is not None else run.run_dir / "report"
    if out.exists() and not (out.is_dir() and _replaceable(out)):
        raise ReportError(f"{out}: exists and is not an earlier report; refusing to replace it")
    notes: list[str] = []
    masks = find_masks(run, notes)
    if run.stage == "search" and not masks:
        notes.append("no complete snapshot masks under masks/ yet: no embedding-size plots")

    frequencies = None
    signal: set[str] = set()
    if masks:
        found = _dataset(run, data, notes)
        if found is not None:
            dataset_dir, schema = found
            signal = set(schema.extra.get("signal_fields") or [])
            features = set(schema.feature_names)
            rows: dict[str, int] = {}
            for m in masks:
                for table, n in m.tables.items():
                    feature = table.removeprefix(TABLE_PREFIX)
                    if feature in features:
                        rows[feature] = max(rows.get(feature, 0), n)
                    elif table.startswith(TABLE_PREFIX):
                        notes.append(
                            f"table `{table}` has no feature `{feature}` in the schema: no frequencies"
                        )
            frequencies = train_frequencies(dataset_dir, schema, rows)
            notes.append(
                f"frequencies: train split of `{dataset_dir}` ({schema.splits['train'].rows:,} rows)"
            )
    stats = [mask_stats(m, frequencies) for m in masks]
    snapshots = _snapshots(run, masks)
    numbers = run_numbers(run)
    learned = None
    if search_diagnostics and run.stage == "search" and snapshots:
        from pep_torchrec.pep import diagnostics  # torch: only for search runs

        learned = diagnostics.analyse_search(run.run_dir, run.config, snapshots, frequencies, notes)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the report private to its writer
    try:
        plots = {"kept_and_auc": plot_kept_and_auc(run, snapshots, tmp / PLOT_FILES["kept_and_auc"])}
        if stats:
            plots["embedding_sizes"] = plot_embedding_sizes(run, stats, tmp / PLOT_FILES["embedding_sizes"])
            plots["kept_by_table"] = plot_kept_by_table(run, stats, tmp / PLOT_FILES["kept_by_table"], signal)
        if any(s.pairs is not None for s in stats):
            plots["size_vs_frequency"] = plot_size_vs_frequency(
                run, stats, tmp / PLOT_FILES["size_vs_frequency"]
            )
        names = {k: p.name for k, p in plots.items()}
        learned_md: list[str] = []
        if learned is not None:
            learned_md = diagnostics.markdown(learned)
            (tmp / "search_diagnostics.json").write_text(json.dumps(learned, indent=1) + "\n")
        (tmp / "report.md").write_text(
            _markdown(run, numbers, snapshots, stats, signal, names, notes, learned_md), encoding="utf-8"
        )
        # Swap in: a directory cannot be renamed over a non-empty one, so move the old report aside first.
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    mask_results = [
        {
            "label": s.mask.label,
            "path": str(s.mask.path),
            "budget": s.mask.budget,
            "dim": s.dim,
            "rows": s.rows,
            "kept": s.kept,
            "kept_share": s.kept / max(1, s.rows * s.dim),
            "pruned_rows": s.pruned_rows,
            "spearman": s.pooled_spearman(),
            "spearman_within_tables": s.within_table_spearman(),
            "tables": {
                t: {
                    "rows": ts.rows,
                    "kept": ts.kept,
                    "kept_share": ts.kept_share,
                    "pruned_rows": ts.pruned_rows,
                    "spearman": s.table_spearman(t),
                }
                for t, ts in s.tables.items()
            },
        }
        for s in stats
    ]
    return {
        "out": str(out),
        "report_md": str(out / "report.md"),
        "plots": {k: str(out / name) for k, name in names.items()},
        "run": numbers,
        "snapshots": snapshots,
        "masks": mask_results,
        "search_diagnostics": learned,
        "notes": notes,
        "seconds": time.perf_counter() - start,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, help="a baseline, search or retrain run directory")
    parser.add_argument(
        "--out", default=None, help="output directory (default RUN_DIR/report); replaced atomically"
    )
    parser.add_argument(
        "--data",
        default=None,
        help="prepared dataset for the frequency analysis (default: config.yaml's data.path)",
    )
    parser.add_argument(
        "--no-search-diagnostics",
        dest="search_diagnostics",
        action="store_false",
        help="a search run: leave out what the search learned (it reads every snapshot's checkpoint)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        result = make_report(
            args.run_dir,
            args.out,
            data=args.data,
            search_diagnostics=getattr(args, "search_diagnostics", True),
        )
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{result['report_md']}: {len(result['plots'])} plots in {result['seconds']:.1f}s")
    for m in result["masks"]:
        rho = m["spearman"]
        print(
            f"  {m['label']}: {m['kept']:,} kept, {m['pruned_rows']:,} of {m['rows']:,} ids pruned"
            + (f", Spearman(freq, dims) = {rho:+.3f}" if rho is not None else "")
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pep-torchrec report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
