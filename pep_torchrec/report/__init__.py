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

# The package: runs.py reads a run directory (config, metrics, summary, masks, dataset), stats.py counts
# frequencies and computes rank correlations and mask statistics, plots.py and markdown.py draw and write
# them, build.py (make_report) puts it all into OUT atomically.
from pep_torchrec.report.build import make_report
from pep_torchrec.report.plots import PLOT_FILES
from pep_torchrec.report.runs import (
    TABLE_PREFIX,
    Mask,
    ReportError,
    Run,
    find_masks,
    load_mask,
    load_run,
    row_sizes,
    run_numbers,
)
from pep_torchrec.report.stats import (
    MaskStats,
    Pairs,
    TableStats,
    frequency_edges,
    mask_stats,
    spearman,
    train_frequencies,
)

__all__ = [
    "PLOT_FILES",
    "TABLE_PREFIX",
    "Mask",
    "MaskStats",
    "Pairs",
    "ReportError",
    "Run",
    "TableStats",
    "find_masks",
    "frequency_edges",
    "load_mask",
    "load_run",
    "make_report",
    "mask_stats",
    "row_sizes",
    "run_numbers",
    "spearman",
    "train_frequencies",
]
