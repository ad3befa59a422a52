"""report.md: the run's summary, snapshots, kept parameters per table, embedding sizes and their rank
correlation with id frequency, as Markdown tables."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pep_torchrec.report.runs import TABLE_PREFIX, Run
from pep_torchrec.report.stats import MaskStats


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


def format_share(part: float, whole: float) -> str:
    """`part / whole` as a percentage with one decimal; a dash when `whole` is 0."""
    return f"{part / whole:.1%}" if whole else "–"


def format_rho(rho: float | None) -> str:
    """A rank correlation with its sign; a dash without frequencies, "– (constant)" for NaN."""
    if rho is None:
        return "–"
    return "– (constant)" if math.isnan(rho) else f"{rho:+.3f}"


def report_markdown(
    run: Run,
    numbers: dict[str, Any],
    snapshots: Sequence[dict[str, Any]],
    stats: Sequence[MaskStats],
    signal: set[str],
    plots: dict[str, str],
    notes: Sequence[str],
    learned: Sequence[str] = (),
) -> str:
    """report.md's text: summary, snapshots, kept per table, embedding sizes, size vs frequency, what the
    search learned (`learned`, already Markdown) and notes; a section without data is left out.

    Args:
        run: the run.
        numbers: `run_numbers(run)`.
        snapshots: the search's snapshots (empty for other stages).
        stats: one `MaskStats` per mask, in report order.
        signal: the synthetic generator's informative fields (marked in the per-table table).
        plots: plot key → file name relative to report.md, for the plots written.
        notes: what the report had to leave out, and why.
    """
    md = _summary(run, numbers, plots) + _snapshots(snapshots)
    if stats:
        md += _kept_per_table(stats, signal, plots) + _embedding_sizes(stats, plots)
    md += _size_vs_frequency(stats, plots)
    md += list(learned)
    if notes:
        md += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(md)


def _summary(run: Run, n: dict[str, Any], plots: dict[str, str]) -> list[str]:
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
            None if kept is None else f"{kept:,} ({format_share(kept, n['embedding_params_total'] or 0)})",
        ],
        ["mask", None if n["mask"] is None else f"`{n['mask']}`"],
        ["train seconds", None if n["train_seconds"] is None else f"{n['train_seconds']:.1f}"],
    ]
    md += _table(["", "value"], [r for r in rows if r[1] is not None])
    if "kept_and_auc" in plots:
        md += [f"![kept parameters and valid AUC over steps]({plots['kept_and_auc']})", ""]
    return md


def _snapshots(snapshots: Sequence[dict[str, Any]]) -> list[str]:
    if not snapshots:
        return []
    md = [
        "## Snapshots",
        "",
        "Masks saved when the learned kept count first fell below a budget; each keeps "
        "exactly the budget's count (the top PEP margins).",
        "",
    ]
    return md + _table(
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


def _kept_per_table(stats: Sequence[MaskStats], signal: set[str], plots: dict[str, str]) -> list[str]:
    labels = [s.mask.label for s in stats]
    tables = list(stats[0].tables)
    is_signal = ["yes" if t.removeprefix(TABLE_PREFIX) in signal else "" for t in tables]
    md = [
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
            + [f"{s.kept:,} ({format_share(s.kept, s.rows * s.dim)})" for s in stats]
        ],
    )
    if "kept_by_table" in plots:
        md += [f"![kept share per table]({plots['kept_by_table']})", ""]
    return md


def _embedding_sizes(stats: Sequence[MaskStats], plots: dict[str, str]) -> list[str]:
    labels = [s.mask.label for s in stats]
    tables = list(stats[0].tables)
    md = [
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
                f"{s.pruned_rows:,} ({format_share(s.pruned_rows, s.rows)})",
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
                f"{s.tables[t].pruned_rows:,} ({format_share(s.tables[t].pruned_rows, s.tables[t].rows)})"
                for s in stats
            ]
            for t in tables
        ],
    )
    if "embedding_sizes" in plots:
        md += [f"![histogram of kept dimensions per id]({plots['embedding_sizes']})", ""]
    return md


def _size_vs_frequency(stats: Sequence[MaskStats], plots: dict[str, str]) -> list[str]:
    with_pairs = [s for s in stats if s.pairs is not None]
    if not with_pairs:
        return []
    md = [
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
            [f"`{t}`", with_pairs[0].tables[t].rows] + [format_rho(s.table_spearman(t)) for s in with_pairs]
            for t in tables
        ]
        + [
            ["**within tables**", "", *[format_rho(s.within_table_spearman()) for s in with_pairs]],
            ["**all tables**", "", *[format_rho(s.pooled_spearman()) for s in with_pairs]],
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
    return md
