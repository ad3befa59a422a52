"""The report's plots: matplotlib's object API with the Agg canvas (no pyplot, no display, no global
state)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pep_torchrec.report.markdown import format_rho, format_share
from pep_torchrec.report.runs import TABLE_PREFIX, ReportError, Run
from pep_torchrec.report.stats import MaskStats, frequency_edges

#: File name of every plot, by the key make_report returns it under.
PLOT_FILES = {
    "kept_and_auc": "kept_and_auc.png",
    "embedding_sizes": "embedding_sizes.png",
    "size_vs_frequency": "size_vs_frequency.png",
    "kept_by_table": "kept_by_table.png",
}
_DPI = 110


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
            f"{s.mask.label}: Spearman ρ = {format_rho(s.pooled_spearman())} all ids, "
            f"{format_rho(s.within_table_spearman())} within tables",
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
            label=f"{s.mask.label} (all tables: {format_share(s.kept, s.rows * s.dim)})",
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
