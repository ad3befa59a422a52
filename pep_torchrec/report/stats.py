"""Statistics of a run's masks: train frequencies of the ids, rank correlation (Spearman, weighted), and
per-table sizes of a mask.

Memory stays bounded for huge tables: frequencies are counted one row group and one column at a time,
and the frequency/size statistics are kept as histograms of distinct (frequency, size) pairs.

Legend: R = rows (ids) of one table, D = embedding_dim, P = distinct (frequency, size) pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pep_torchrec.data.schema import Schema
from pep_torchrec.report.runs import TABLE_PREFIX, Mask, ReportError, row_sizes


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
