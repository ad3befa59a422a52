"""What a PEP search learned: do its thresholds decide which elements and row sizes stay?

For every budget snapshot of a search run, from the checkpoint of the snapshot's step (the weights and
gk the snapshot's mask was ranked with; a checkpoint of any world size):

* the threshold units sigmoid(s) (g(s) = gk·sigmoid(s)): percentiles over every element, and how many
  decades g(s) spans next to |v| (5th to 95th percentile of log10): when g varies far less than |v|,
  the ranking by margin |v| − g(s) is the ranking by |v|, and the search is magnitude pruning;
* the overlap of the K best elements by margin with the K largest |v| of the same checkpoint (K = the
  snapshot's kept count, no row rules), and the share of the saved mask the search kept itself
  (margin > 0: the rest came from the row floor and layout);
* row sizes (kept elements per row) of the top-K by margin ("what the thresholds chose") and of the saved
  mask ("what the retrain gets"), per table: the share of rows at 0, 1, 2, 3, 4-7, 8-15, 16+ dims, and
  how many distinct sizes (0 counts) each hold >= 10 % of the rows;
* Spearman(train frequency of the id, row size) over every row, where the train frequencies are known.

`pep-torchrec report` adds these to a search run's report (a Markdown section and
search_diagnostics.json). Memory: whole tables of one checkpoint at a time, [R, W] float32 plus a few
[R, D] temporaries per table; runs with more than `MAX_ELEMENTS` embedding elements are skipped with a note.

Legend: R = rows of a table, D = embedding_dim, W = stored row width, K = kept elements.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp

from pep_torchrec.modules.pep_embedding_modules import canonical_granularity, threshold_mode
from pep_torchrec.ops import ThresholdMode
from pep_torchrec.ops import margins as margins_op
from pep_torchrec.pep.masks import select_top_k
from pep_torchrec.training.run_dir import RunDir, read_meta

#: Row-size bins (inclusive; None = no upper end) of the histograms.
SIZE_BINS: tuple[tuple[int, int | None], ...] = ((0, 0), (1, 1), (2, 2), (3, 3), (4, 7), (8, 15), (16, None))
SIZE_LABELS = tuple(
    str(lo) if lo == hi else (f"{lo}+" if hi is None else f"{lo}-{hi}") for lo, hi in SIZE_BINS
)
#: A distinct row size "holds" a share of rows from this share up.
MAJOR_SIZE_SHARE = 0.10
#: Larger runs are not analysed (the analysis holds a checkpoint's tables in memory).
MAX_ELEMENTS = 200_000_000
PERCENTILES = (5, 25, 50, 75, 95)
TABLE_PREFIX = "t_"
# A PEP module's stored table (under the checkpoint's "model" entry) and its coarse thresholds.
_TABLE_KEY = re.compile(
    r"^model\.(?P<module>.+)\._embedding_bag_collection\.embedding_bags\.(?P<table>[^.]+)\.weight$"
)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from pep_torchrec.report import spearman

    return spearman(x, y)


def load_search_tables(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The PEP module's stored tables ([R, W] float32, table → tensor) and its coarse threshold
    parameters (checkpoint key under the module → tensor) from a DCP checkpoint of any world size."""
    metadata = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    tables: dict[str, str] = {}
    modules = set()
    for key in metadata:
        match = _TABLE_KEY.match(key)
        if match:
            tables[match["table"]] = key
            modules.add(match["module"])
    if len(modules) != 1:
        raise ValueError(
            f"{checkpoint}: expected one PEP embedding module, found {sorted(modules) or 'none'}"
        )
    prefix = f"model.{modules.pop()}."
    coarse = [k for k in metadata if k.startswith(prefix + "threshold")]
    keys = [*tables.values(), *coarse]
    state = {"model": {k.removeprefix("model."): torch.empty(tuple(metadata[k].size)) for k in keys}}
    with warnings.catch_warnings():  # a single-process load of a sharded checkpoint is the point here
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    loaded = state["model"]
    return (
        {t: loaded[k.removeprefix("model.")] for t, k in tables.items()},
        {k.removeprefix(prefix): loaded[k.removeprefix("model.")] for k in coarse},
    )


def _coarse_s(
    granularity: str, params: Mapping[str, torch.Tensor], table: str, dim: int
) -> torch.Tensor | None:
    """The [D] threshold logits of a coarse granularity (None for row granularities)."""
    if granularity in ("feature", "feature_dim"):
        return None
    if granularity in ("global", "dimension"):
        return params["threshold"].reshape(-1).expand(dim)
    return params[f"thresholds.{table}"].reshape(-1).expand(dim)


def _element_s(
    stored_RW: torch.Tensor, mode: ThresholdMode, coarse_D: torch.Tensor | None, dim: int
) -> torch.Tensor:
    """[R, D] threshold logit of every element."""
    if mode is ThresholdMode.ROW_DIM:
        return stored_RW[:, dim : 2 * dim]
    if mode is ThresholdMode.ROW:
        return stored_RW[:, dim : dim + 1].expand(-1, dim)
    assert coarse_D is not None
    return coarse_D.expand(stored_RW.shape[0], -1)


def size_report(
    sizes: Mapping[str, np.ndarray], frequencies: Mapping[str, np.ndarray] | None
) -> dict[str, Any]:
    """Row-size histograms (shares of rows per `SIZE_BINS`), the distinct sizes holding >= 10 % of the
    rows, and Spearman(train frequency, size), pooled over every table and per table."""

    def one(sizes_R: np.ndarray, freq_R: np.ndarray | None) -> dict[str, Any]:
        n = max(1, sizes_R.size)
        hist = [
            float(((sizes_R >= lo) & (sizes_R <= (hi if hi is not None else np.inf))).sum()) / n
            for lo, hi in SIZE_BINS
        ]
        _, counts = np.unique(sizes_R, return_counts=True)
        return {
            "rows": int(sizes_R.size),
            "mean": float(sizes_R.mean()) if sizes_R.size else 0.0,
            "hist": hist,
            "major_sizes": int((counts >= MAJOR_SIZE_SHARE * sizes_R.size).sum()),
            "spearman_freq_size": None if freq_R is None else _spearman(freq_R, sizes_R),
        }

    def freq(table: str) -> np.ndarray | None:
        return None if frequencies is None else frequencies.get(table.removeprefix(TABLE_PREFIX))

    known = [t for t in sizes if freq(t) is not None]
    pooled = one(np.concatenate([sizes[t] for t in sizes]), None)
    if known:  # pooled over the tables with frequencies only, so the pairs line up
        pooled["spearman_freq_size"] = _spearman(
            np.concatenate([freq(t) for t in known]), np.concatenate([sizes[t] for t in known])
        )
    return {**pooled, "tables": {t: one(s, freq(t)) for t, s in sizes.items()}}


def analyse_snapshot(
    run_dir: Path,
    snapshot: Mapping[str, Any],
    *,
    granularity: str,
    dim: int,
    frequencies: Mapping[str, np.ndarray] | None,
) -> dict[str, Any]:
    """The diagnostics of one snapshot (see the module docstring). Raises FileNotFoundError when the
    snapshot's checkpoint or mask is missing."""
    step, budget = int(snapshot["step"]), float(snapshot["budget"])
    run = RunDir(run_dir)
    checkpoint = run.checkpoint(step)
    if not (checkpoint / "trainer_state.json").is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint.name} missing")
    mask_dir = run.mask_dir(budget)
    if not (mask_dir / "meta.json").is_file():
        raise FileNotFoundError(f"mask {mask_dir.name} missing")
    meta = read_meta(mask_dir, "mask")
    gk = float(json.loads((checkpoint / "trainer_state.json").read_text())["trainer"]["gk"])
    stored, coarse = load_search_tables(checkpoint)
    order = [t for t in meta["tables"] if t in stored]
    missing = sorted(set(meta["tables"]) - set(stored))
    if missing:
        raise FileNotFoundError(f"tables {missing} of the mask are not in {checkpoint.name}")
    mode = threshold_mode(granularity)
    margin, absv, unit = {}, {}, []
    for t in order:
        coarse_D = _coarse_s(granularity, coarse, t, dim)
        margin[t] = margins_op(stored[t], dim=dim, mode=mode, gk=gk, coarse_s=coarse_D).float()
        absv[t] = stored[t][:, :dim].abs().float()
        unit.append(torch.sigmoid(_element_s(stored[t], mode, coarse_D, dim).float()).flatten())
    k = int(meta["kept"])
    unit_N = torch.cat(unit).numpy()
    absv_N = torch.cat([absv[t].flatten() for t in order]).numpy()
    log_g = np.log10(np.maximum(gk * unit_N.astype(np.float64), 1e-300))
    log_v = np.log10(absv_N[absv_N > 0].astype(np.float64))
    top_margin = select_top_k({t: [(0, 0, margin[t])] for t in order}, k, order)
    top_v = select_top_k({t: [(0, 0, absv[t])] for t in order}, k, order)
    saved = {t: np.load(mask_dir / f"{t}.npy") for t in order}
    both = sum(int((top_margin[t][0][2] & top_v[t][0][2]).sum()) for t in order)
    by_search = sum(int((torch.from_numpy(saved[t]) & (margin[t] > 0)).sum()) for t in order)
    return {
        "budget": budget,
        "step": step,
        "kept": k,
        "gk": gk,
        "valid_auc": snapshot.get("valid_auc"),
        "mask_layout": meta.get("layout"),
        "mask_min_row_dims": meta.get("min_row_dims"),
        "sigmoid_s_percentiles": {
            str(p): float(v) for p, v in zip(PERCENTILES, np.percentile(unit_N, PERCENTILES))
        },
        "log10_g_decades_p5_p95": float(np.percentile(log_g, 95) - np.percentile(log_g, 5)),
        "log10_absv_decades_p5_p95": float(np.percentile(log_v, 95) - np.percentile(log_v, 5))
        if log_v.size
        else None,
        "overlap_topk_margin_vs_topk_absv": both / k if k else None,
        "mask_share_kept_by_search": by_search / k if k else None,
        "sizes_top_k_margin": size_report(
            {t: top_margin[t][0][2].sum(1).numpy() for t in order}, frequencies
        ),
        "sizes_saved_mask": size_report({t: saved[t].sum(1) for t in order}, frequencies),
    }


def analyse_search(
    run_dir: str | Path,
    config: Mapping[str, Any],
    snapshots: Sequence[Mapping[str, Any]],
    frequencies: Mapping[str, np.ndarray] | None,
    notes: list[str],
) -> dict[str, Any] | None:
    """Every snapshot's diagnostics (see `analyse_snapshot`); a snapshot that cannot be analysed is a
    note. None when there is nothing to analyse.

    Args:
        run_dir: the search run.
        config: its config.yaml, as plain data (model.embedding_dim, pep.granularity).
        snapshots: summary.json's snapshots (budget, step, valid_auc).
        frequencies: feature → [R] train occurrences of each id, or None.
        notes: where the reasons for skipped snapshots go.
    Returns:
        {"granularity", "snapshots": [per snapshot]} or None.
    """
    run_dir = Path(run_dir)
    dim = int((config.get("model") or {}).get("embedding_dim") or 0)
    granularity = canonical_granularity(str((config.get("pep") or {}).get("granularity") or "feature_dim"))
    if not snapshots or not dim:
        return None
    total = RunDir(run_dir).summary().get("embedding_params_total")
    if total and total > MAX_ELEMENTS:
        notes.append(f"search diagnostics skipped: {total:,} embedding elements (more than {MAX_ELEMENTS:,})")
        return None
    out = []
    for snapshot in snapshots:
        if snapshot.get("step") is None or snapshot.get("budget") is None:
            continue
        try:
            out.append(
                analyse_snapshot(run_dir, snapshot, granularity=granularity, dim=dim, frequencies=frequencies)
            )
        except FileNotFoundError as e:
            notes.append(f"search diagnostics, budget {snapshot['budget']:g}: {e}")
    return {"granularity": granularity, "snapshots": out} if out else None


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.1%}"


def _rho(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.3f}"


def _size_rows(report: Mapping[str, Any]) -> list[list[str]]:
    rows = [
        [
            "**all**",
            f"{report['rows']:,}",
            f"{report['mean']:.2f}",
            *(f"{h:.1%}" for h in report["hist"]),
            str(report["major_sizes"]),
            _rho(report["spearman_freq_size"]),
        ]
    ]
    for t, e in report["tables"].items():
        rows.append(
            [
                f"`{t}`",
                f"{e['rows']:,}",
                f"{e['mean']:.2f}",
                *(f"{h:.1%}" for h in e["hist"]),
                str(e["major_sizes"]),
                _rho(e["spearman_freq_size"]),
            ]
        )
    return rows


def markdown(diagnostics: Mapping[str, Any]) -> list[str]:
    """The report's "What the search learned" section, as Markdown lines."""

    def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
        return (
            ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join(r) + " |" for r in rows]
            + [""]
        )

    snaps = diagnostics["snapshots"]
    md = [
        "## What the search learned",
        "",
        f"From the checkpoint of each snapshot's step (granularity {diagnostics['granularity']}). "
        "σ(s): the threshold units, g(s) = gk·σ(s). *decades*: 5th to 95th percentile of log10 g(s) and of "
        "log10 |v|; when g spans far fewer decades than |v|, ranking by the margin |v| − g(s) is ranking by |v|. "
        "*overlap*: the K best elements by margin that are also among the K largest |v| (K = the budget, no "
        "row rules). *kept by search*: share of the saved mask with margin > 0 (the rest is the row rules'). "
        f"*sizes ≥ {MAJOR_SIZE_SHARE:.0%}*: distinct row sizes (0 counts) each holding at least "
        f"{MAJOR_SIZE_SHARE:.0%} of the rows, for the top-K by margin / the saved mask; ρ: Spearman(train "
        "frequency of the id, row size) over every row, same order.",
        "",
    ]
    md += table(
        [
            "budget",
            "step",
            "gk",
            "σ(s) p5 / p50 / p95",
            "decades g(s) / \\|v\\|",
            "overlap",
            "kept by search",
            f"sizes ≥ {MAJOR_SIZE_SHARE:.0%}",
            "ρ(freq, size)",
        ],
        [
            [
                f"{s['budget']:g}",
                str(s["step"]),
                f"{s['gk']:.4g}",
                " / ".join(f"{s['sigmoid_s_percentiles'][p]:.3g}" for p in ("5", "50", "95")),
                f"{s['log10_g_decades_p5_p95']:.2f} / "
                + (
                    "–" if s["log10_absv_decades_p5_p95"] is None else f"{s['log10_absv_decades_p5_p95']:.2f}"
                ),
                _pct(s["overlap_topk_margin_vs_topk_absv"]),
                _pct(s["mask_share_kept_by_search"]),
                f"{s['sizes_top_k_margin']['major_sizes']} / {s['sizes_saved_mask']['major_sizes']}",
                f"{_rho(s['sizes_top_k_margin']['spearman_freq_size'])} / "
                f"{_rho(s['sizes_saved_mask']['spearman_freq_size'])}",
            ]
            for s in snaps
        ],
    )
    header = ["table", "rows", "mean", *SIZE_LABELS, f"sizes ≥ {MAJOR_SIZE_SHARE:.0%}", "ρ(freq, size)"]
    for s in snaps:
        for key, what in (
            ("sizes_top_k_margin", "top-K by margin, no row rules (what the thresholds chose)"),
            ("sizes_saved_mask", f"the saved mask ({s['mask_layout']}, floor {s['mask_min_row_dims']})"),
        ):
            md += [f"Row sizes at budget {s['budget']:g}, {what}: share of rows per kept-dims bin.", ""]
            md += table(header, _size_rows(s[key]))
    return md
