"""`make_report`: a run directory → OUT (plots + report.md, and a search's search_diagnostics.json),
written atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pep_torchrec.report.markdown import report_markdown
from pep_torchrec.report.plots import (
    PLOT_FILES,
    plot_embedding_sizes,
    plot_kept_and_auc,
    plot_kept_by_table,
    plot_size_vs_frequency,
)
from pep_torchrec.report.runs import (
    TABLE_PREFIX,
    Mask,
    ReportError,
    Run,
    find_dataset,
    find_masks,
    load_run,
    run_numbers,
    run_snapshots,
)
from pep_torchrec.report.stats import MaskStats, mask_stats, train_frequencies
from pep_torchrec.utils.atomic import replace_dir


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
    frequencies, signal = _frequencies(run, masks, data, notes)
    stats = [mask_stats(m, frequencies) for m in masks]
    snapshots = run_snapshots(run, masks)
    numbers = run_numbers(run)
    learned = None
    if search_diagnostics and run.stage == "search" and snapshots:
        from pep_torchrec.pep import diagnostics  # torch: only for search runs

        learned = diagnostics.analyse_search(run.run_dir, run.config, snapshots, frequencies, notes)
    names = _write(out, run, numbers, snapshots, stats, signal, notes, learned)
    return {
        "out": str(out),
        "report_md": str(out / "report.md"),
        "plots": {k: str(out / name) for k, name in names.items()},
        "run": numbers,
        "snapshots": snapshots,
        "masks": [_mask_result(s) for s in stats],
        "search_diagnostics": learned,
        "notes": notes,
        "seconds": time.perf_counter() - start,
    }


def _frequencies(
    run: Run, masks: list[Mask], data: str | os.PathLike | None, notes: list[str]
) -> tuple[dict[str, np.ndarray] | None, set[str]]:
    """Train-split frequencies of the masks' tables (None without masks or a dataset) and the dataset's
    signal fields."""
    frequencies = None
    signal: set[str] = set()
    if masks:
        found = find_dataset(run, data, notes)
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
    return frequencies, signal


def _write(
    out: Path,
    run: Run,
    numbers: dict[str, Any],
    snapshots: list[dict[str, Any]],
    stats: list[MaskStats],
    signal: set[str],
    notes: list[str],
    learned: dict[str, Any] | None,
) -> dict[str, str]:
    """Write the plots, report.md and search_diagnostics.json into a temporary sibling of `out`, then swap
    it in. Returns plot key → file name."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the report private to its writer
    try:
        plots = _plots(run, snapshots, stats, signal, tmp)
        names = {k: p.name for k, p in plots.items()}
        learned_md: list[str] = []
        if learned is not None:
            from pep_torchrec.pep import diagnostics  # torch: only for search runs

            learned_md = diagnostics.markdown(learned)
            (tmp / "search_diagnostics.json").write_text(json.dumps(learned, indent=1) + "\n")
        (tmp / "report.md").write_text(
            report_markdown(run, numbers, snapshots, stats, signal, names, notes, learned_md),
            encoding="utf-8",
        )
        replace_dir(tmp, out)  # a reader sees the old report or the new one, never a mix
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return names


def _plots(
    run: Run, snapshots: list[dict[str, Any]], stats: list[MaskStats], signal: set[str], tmp: Path
) -> dict[str, Path]:
    """Every plot the run has the data for, written into `tmp`."""
    plots = {"kept_and_auc": plot_kept_and_auc(run, snapshots, tmp / PLOT_FILES["kept_and_auc"])}
    if stats:
        plots["embedding_sizes"] = plot_embedding_sizes(run, stats, tmp / PLOT_FILES["embedding_sizes"])
        plots["kept_by_table"] = plot_kept_by_table(run, stats, tmp / PLOT_FILES["kept_by_table"], signal)
    if any(s.pairs is not None for s in stats):
        plots["size_vs_frequency"] = plot_size_vs_frequency(run, stats, tmp / PLOT_FILES["size_vs_frequency"])
    return plots


def _mask_result(s: MaskStats) -> dict[str, Any]:
    return {
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
