"""Paper-style quality table: base model vs PEP (search, then lottery-ticket retrain) vs the controls,
at 20/10/5/2% of the embedding parameters, for FM, DeepFM and AutoInt on ml-100k and the Criteo 10k
sample; FM on ml-100k at 10/5/2% over seeds (mean ± sd); plus, on the synthetic data, the share of kept
parameters in signal vs noise fields.

Mask sources at every budget (`pep-torchrec prune --method ...`, each retrained with the same retrain
config): PEP retrain (the search's mask, a lottery ticket); magnitude (top-|v| of the trained base,
fine-tuned); magnitude under PEP's row rules; uniform-k (every row the same k = K / rows dims); frequency
sizes (row sizes from train id frequency alone, no learning); PEP sizes, random elements (each row keeps
the search mask's count at random columns). The last three are lottery tickets from the search's init.

    python -m benchmarks.quality [--datasets movielens,criteo] [--models fm,deepfm,autoint] [--budgets 0.1]
                                 [--seeds 0,1,2] [--no-synthetic] [--results DIR] [--work DIR]
    make quality

Writes RESULTS/quality_<dataset>.{json,md}, quality_movielens_fm_seeds.{json,md} and
quality_synthetic.{json,md} (RESULTS = benchmarks/results unless --results; a restricted run belongs
elsewhere). Every training command it runs is recorded in the JSON. Search and retrain use the base config
of each dataset x model plus the PEP settings of configs/<dataset>_fm_search.yaml / _retrain.yaml (pep,
train stage and schedule).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks.common import REPO, RESULTS, SHARED_DATA, machine_info, markdown_table, write_results
from pep_torchrec import cli
from pep_torchrec.training.run_dir import RunDir, read_meta

RAW = {"movielens": SHARED_DATA / "ml-100k", "criteo": SHARED_DATA / "criteo_kaggle_head10k"}
LABEL = {"movielens": "ml-100k", "criteo": "Criteo 10k", "synthetic": "synthetic"}
BUDGETS = [0.2, 0.1, 0.05, 0.02]
SEED_BUDGETS = [0.1, 0.05, 0.02]  # issue 10's acceptance budgets for the comparison over seeds


def _overrides_from(config: Path, sections: tuple[str, ...]) -> list[str]:
    """The given sections of a YAML config as dotted `--set` overrides (flattened one level)."""
    data = yaml.safe_load(config.read_text())
    out = []
    for section in sections:
        for key, value in (data.get(section) or {}).items():
            if section == "train" and key not in ("stage", "epochs", "eval_every", "patience"):
                continue
            out.append(f"{section}.{key}={json.dumps(value)}")
    return out


def _row_rules(search_cfg: Path) -> list[str]:
    """The search config's mask row rules as `pep-torchrec prune` flags."""
    pep = yaml.safe_load(search_cfg.read_text()).get("pep") or {}
    return [
        "--layout",
        str(pep.get("mask_layout", "elementwise")),
        "--min-row-dims",
        str(pep.get("min_row_dims", 0)),
        "--max-row-dims",
        str(pep.get("max_row_dims", 0)),
    ]


def _prune(run: Path, out: Path, budgets: list[float], flags: list[str]) -> None:
    argv = [
        "prune",
        "--run-dir",
        str(run),
        "--budgets",
        ",".join(map(str, budgets)),
        "--out",
        str(out),
        *flags,
    ]
    if cli.main(argv) != 0:
        raise SystemExit(f"prune failed: pep-torchrec {' '.join(argv)}")


# Mask sources compared at every budget: (method label, run subdirectory holding masks/).
METHODS = (
    ("PEP retrain", "search"),
    ("magnitude", "magnitude"),
    ("magnitude, PEP's row rules", "magnitude_rules"),
    ("uniform-k", "uniform"),
    ("frequency sizes", "frequency"),
    ("PEP sizes, random elements", "random_elements"),
)


def _control_prunes(runs: Path, data: Path, budgets: list[float], seed: int) -> None:
    """The lottery-ticket controls from the search run (its init): uniform-k, frequency sizes, and PEP's
    row sizes at random elements (for the budgets the search reached)."""
    _prune(runs / "search", runs / "uniform", budgets, ["--method", "uniform", "--seed", str(seed)])
    _prune(runs / "search", runs / "frequency", budgets, ["--method", "frequency", "--data", str(data)])
    search = RunDir(runs / "search")
    reached = [b for b in budgets if (search.mask_dir(b) / "meta.json").is_file()]
    if reached:
        argv = [
            "prune",
            "--method",
            "random-elements",
            "--sizes-from",
            str(search.masks_dir),
            "--budgets",
            ",".join(map(str, reached)),
            "--out",
            str(runs / "random_elements"),
            "--seed",
            str(seed),
        ]
        if cli.main(argv) != 0:
            raise SystemExit(f"prune failed: pep-torchrec {' '.join(argv)}")


def _train(argv: list[str], log: list[dict]) -> dict:
    started = time.perf_counter()
    if cli.main(["train", *argv, "--overwrite", "--set", "train.progress=false"]) != 0:
        raise SystemExit(f"training failed: pep-torchrec train {' '.join(argv)}")
    run_dir = Path(argv[argv.index("--run-dir") + 1])
    summary = RunDir(run_dir).summary(required=True)
    summary["wall_s"] = time.perf_counter() - started
    log.append({"command": "pep-torchrec train " + " ".join(argv), "wall_s": summary["wall_s"]})
    return summary


def _prepare(dataset: str, work: Path) -> Path:
    data = work / "data" / dataset
    if not (data / "schema.json").exists():
        argv = ["data", "prepare", "--dataset", dataset, "--out", str(data)]
        argv += (
            ["--raw", str(RAW[dataset])] if dataset in RAW else ["--rows", "200000", "--cardinality", "5000"]
        )
        if cli.main(argv) != 0:
            raise SystemExit(f"prepare failed: {argv}")
    return data


def _base_search_prunes(
    base_cfg: str,
    data: Path,
    runs: Path,
    search_set: list[str],
    rules: list[str],
    budgets: list[float],
    search_extra: list[str],
    seed_set: list[str],
    log: list[dict],
    seed: int = 0,
) -> tuple[dict, dict]:
    """One model's base run, PEP search, magnitude masks (plain and under the search's row rules) and the
    controls' masks."""
    base = _train(
        [
            "--config",
            base_cfg,
            "--data",
            str(data),
            "--run-dir",
            str(runs / "base"),
            *(["--set", *seed_set] if seed_set else []),
        ],
        log,
    )
    search = _train(
        [
            "--config",
            base_cfg,
            "--data",
            str(data),
            "--run-dir",
            str(runs / "search"),
            "--set",
            *search_set,
            *search_extra,
            *seed_set,
        ],
        log,
    )
    _prune(runs / "base", runs / "magnitude", budgets, [])
    _prune(runs / "base", runs / "magnitude_rules", budgets, rules)
    _control_prunes(runs, data, budgets, seed)
    return base, search


def _retrain(
    base_cfg: str,
    data: Path,
    run_dir: Path,
    mask: Path,
    retrain_set: list[str],
    seed_set: list[str],
    log: list[dict],
) -> dict:
    """A retrain of `mask` (lottery ticket) with the retrain config's train and optim settings."""
    return _train(
        [
            "--config",
            base_cfg,
            "--data",
            str(data),
            "--run-dir",
            str(run_dir),
            "--mask",
            str(mask),
            "--set",
            *retrain_set,
            *seed_set,
        ],
        log,
    )


def _retrain_rows(
    model: str,
    budgets: list[float],
    reached: set[float],
    base: dict,
    base_cfg: str,
    data: Path,
    runs: Path,
    retrain_set: list[str],
    log: list[dict],
) -> list[dict]:
    """One model's retrain of every method's mask at every budget (a note where the search never
    reached the budget)."""
    rows = []
    for budget in budgets:
        for method, source in METHODS:
            if source in ("search", "random_elements") and budget not in reached:
                rows.append(
                    {
                        "model": model,
                        "method": method,
                        "budget": budget,
                        "note": "search never reached it",
                    }
                )
                continue
            result = _retrain(
                base_cfg,
                data,
                runs / f"{source}_retrain_{budget:g}",
                RunDir(runs / source).mask_dir(budget),
                retrain_set,
                [],
                log,
            )
            rows.append(
                {
                    "model": model,
                    "method": method,
                    "budget": budget,
                    "kept": result["embedding_params_kept"],
                    "test_auc": result["test_auc"],
                    "test_logloss": result["test_logloss"],
                    "valid_auc": result["valid_auc"],
                    "train_s": result["train_seconds"],
                    "delta_auc": result["test_auc"] - base["test_auc"],
                }
            )
    return rows


def _search_row(model: str, search: dict, base: dict, search_budgets: list[float]) -> dict:
    """The search run itself at its smallest budget, with its time against the base run's."""
    return {
        "model": model,
        "method": "PEP search",
        "budget": min(search_budgets),
        "kept": search["embedding_params_kept"],
        "test_auc": search["test_auc"],
        "test_logloss": search["test_logloss"],
        "valid_auc": search["valid_auc"],
        "train_s": search["train_seconds"],
        "search_over_base_time": search["train_seconds"] / base["train_seconds"],
        "search_steps": search["steps"],
        "base_steps": base["steps"],
        "search_step_time_over_base": (search["train_seconds"] / search["steps"])
        / (base["train_seconds"] / base["steps"]),
    }


def run_dataset(dataset: str, models: list[str], work: Path, budgets: list[float]) -> dict:
    data = _prepare(dataset, work)
    search_cfg = REPO / "configs" / f"{dataset}_fm_search.yaml"
    retrain_cfg = REPO / "configs" / f"{dataset}_fm_retrain.yaml"
    search_set = _overrides_from(search_cfg, ("pep", "train"))
    retrain_set = _overrides_from(retrain_cfg, ("train", "optim"))
    rules = _row_rules(search_cfg)
    log: list[dict] = []
    rows = []
    for model in models:
        base_cfg = f"configs/{dataset}_{model}.yaml"
        runs = work / "runs" / dataset / model
        # The search always runs the full schedule (its budgets shape the controller's), whatever is compared.
        search_budgets = sorted(set(BUDGETS) | set(budgets), reverse=True)
        base, search = _base_search_prunes(
            base_cfg,
            data,
            runs,
            search_set,
            rules,
            budgets,
            [f"pep.budgets={json.dumps(search_budgets)}"],
            [],
            log,
        )
        rows.append(
            {
                "model": model,
                "method": "base",
                "budget": 1.0,
                "kept": base["embedding_params_kept"],
                "test_auc": base["test_auc"],
                "test_logloss": base["test_logloss"],
                "valid_auc": base["valid_auc"],
                "train_s": base["train_seconds"],
            }
        )
        reached = {s["budget"] for s in search["snapshots"]}
        rows += _retrain_rows(model, budgets, reached, base, base_cfg, data, runs, retrain_set, log)
        rows.append(_search_row(model, search, base, search_budgets))
    return {"dataset": LABEL[dataset], "rows": rows, "commands": log}


def search_learned(run: Path, data: Path) -> dict[float, dict]:
    """What the search learned at each snapshot (pep_torchrec/pep/diagnostics.py), per budget."""
    from pep_torchrec.data.schema import Schema
    from pep_torchrec.pep.diagnostics import analyse_search
    from pep_torchrec.report import train_frequencies

    run_dir = RunDir(run)
    _, init = run_dir.init()
    rows = {t.removeprefix("t_"): int(e["rows"]) for t, e in init["tables"].items()}
    frequencies = train_frequencies(data, Schema.load(data), rows)
    notes: list[str] = []
    found = analyse_search(
        run,
        run_dir.config_data(),
        run_dir.summary(required=True)["snapshots"],
        frequencies,
        notes,
    )
    if notes:
        print(f"{run}: " + "; ".join(notes), file=sys.stderr)
    return {
        s["budget"]: {
            "overlap": s["overlap_topk_margin_vs_topk_absv"],
            "kept_by_search": s["mask_share_kept_by_search"],
            "sigmoid_s_p5_p50_p95": [s["sigmoid_s_percentiles"][p] for p in ("5", "50", "95")],
            "major_sizes_top_k": s["sizes_top_k_margin"]["major_sizes"],
            "major_sizes_mask": s["sizes_saved_mask"]["major_sizes"],
            "rho_top_k": s["sizes_top_k_margin"]["spearman_freq_size"],
            "rho_mask": s["sizes_saved_mask"]["spearman_freq_size"],
        }
        for s in (found or {}).get("snapshots", [])
    }


def _seed_runs(
    seed: int,
    runs: Path,
    base_cfg: str,
    data: Path,
    search_cfg: Path,
    search_set: list[str],
    search_budgets: list[float],
    retrain_set: list[str],
    budgets: list[float],
    log: list[dict],
) -> list[dict]:
    """One seed of `seed_check`: its base, search and controls, then every reached mask retrained."""
    started = time.perf_counter()
    seed_set = [f"train.seed={seed}"]
    base, search = _base_search_prunes(
        base_cfg,
        data,
        runs,
        search_set,
        _row_rules(search_cfg),
        budgets,
        [f"pep.budgets={json.dumps(search_budgets)}"],
        seed_set,
        log,
        seed,
    )
    rows = [
        {
            "seed": seed,
            "method": "base",
            "budget": 1.0,
            "test_auc": base["test_auc"],
            "valid_auc": base["valid_auc"],
            "kept": base["embedding_params_kept"],
        }
    ]
    reached = {s["budget"] for s in search["snapshots"]}
    learned = search_learned(runs / "search", data)
    for budget in budgets:
        for method, source in METHODS:
            if source in ("search", "random_elements") and budget not in reached:
                continue
            result = _retrain(
                base_cfg,
                data,
                runs / f"{source}_retrain_{budget:g}",
                RunDir(runs / source).mask_dir(budget),
                retrain_set,
                seed_set,
                log,
            )
            rows.append(
                {
                    "seed": seed,
                    "method": method,
                    "budget": budget,
                    "test_auc": result["test_auc"],
                    "valid_auc": result["valid_auc"],
                    "kept": result["embedding_params_kept"],
                    "delta_auc": result["test_auc"] - base["test_auc"],
                    **({"learned": learned[budget]} if source == "search" and budget in learned else {}),
                }
            )
    log.append({"seed": seed, "seed_wall_s": time.perf_counter() - started})
    return rows


def _seed_summary(rows: list[dict], budgets: list[float]) -> list[dict]:
    """Per (method, budget): test AUC mean / std / min over the seeds, and what the search learned."""
    summary = []
    for budget in [1.0, *budgets]:
        for method in ["base", *(m for m, _ in METHODS)]:
            mine = [r for r in rows if r["method"] == method and r["budget"] == budget]
            if not mine:
                continue
            test = np.array([r["test_auc"] for r in mine])
            summary.append(
                {
                    "method": method,
                    "budget": budget,
                    "seeds": len(mine),
                    "kept": mine[0]["kept"],
                    "test_auc_mean": float(test.mean()),
                    "test_auc_std": float(test.std(ddof=1)) if len(test) > 1 else None,
                    "test_auc_min": float(test.min()),
                    "valid_auc_mean": float(np.mean([r["valid_auc"] for r in mine])),
                    **_learned_summary([r["learned"] for r in mine if "learned" in r]),
                }
            )
    return summary


def seed_check(dataset: str, model: str, budgets: list[float], seeds: list[int], work: Path) -> dict:
    """The acceptance comparison (base, PEP retrain and every control at each budget) over several
    seeds: each seed seeds the base, the search, the controls' random choices and the retrains (init,
    data order)."""
    data = _prepare(dataset, work)
    search_cfg = REPO / "configs" / f"{dataset}_{model}_search.yaml"
    retrain_set = _overrides_from(REPO / "configs" / f"{dataset}_{model}_retrain.yaml", ("train", "optim"))
    search_set = _overrides_from(search_cfg, ("pep", "train"))
    search_budgets = sorted(set(BUDGETS) | set(budgets), reverse=True)
    base_cfg = f"configs/{dataset}_{model}.yaml"
    log: list[dict] = []
    rows = []
    for seed in seeds:
        runs = work / "runs" / f"{dataset}_seeds" / model / f"seed_{seed}"
        rows += _seed_runs(
            seed, runs, base_cfg, data, search_cfg, search_set, search_budgets, retrain_set, budgets, log
        )
    return {
        "dataset": LABEL[dataset],
        "model": model,
        "budgets": budgets,
        "rows": rows,
        "summary": _seed_summary(rows, budgets),
        "commands": log,
    }


def _learned_summary(learned: list[dict]) -> dict:
    """Over seeds: mean overlap with top-|v|, and per seed the sizes holding >= 10 % of rows and rho."""
    if not learned:
        return {}
    return {
        "overlap_mean": float(np.mean([x["overlap"] for x in learned])),
        "major_sizes": " / ".join(f"{x['major_sizes_top_k']},{x['major_sizes_mask']}" for x in learned),
        "rho": " / ".join(f"{x['rho_top_k']:+.2f},{x['rho_mask']:+.2f}" for x in learned),
    }


def _seeds_markdown(result: dict, info: dict) -> str:
    seeds = sorted({r["seed"] for r in result["rows"]})
    budgets = ",".join(f"{b:g}" for b in result["budgets"])
    return "\n".join(
        [
            f"# {result['model'].upper()} on {result['dataset']} at {budgets} of the embedding parameters, "
            f"{len(seeds)} seeds",
            "",
            f"{info['date']}, {info['host_cpu']} ({info['cpu_count']} cores), torch {info['versions']['torch']}, "
            f"commit {info['git_commit']}. One process, CPU. Each seed seeds the base, the search, the controls'",
            "random choices and the retrains. The search uses the search config's row rules; 'magnitude' is plain",
            "top-|v| element-wise, fine-tuned; 'magnitude, PEP's row rules' ranks by |v| under the same layout and",
            "floor as the PEP masks. Lottery tickets from the search's init: 'uniform-k' (every row the same",
            "k = K / rows dims, the remainder one each on random rows), 'frequency sizes' (row sizes from train id",
            "frequency, no learning), 'PEP sizes, random elements' (the PEP mask's row counts at random columns:",
            "with an aligned PEP mask, PEP's sizes by construction - a diagnostic). Every retrain uses the retrain",
            "config. sd: sample standard deviation over seeds. FM's first-order weights (one per row) are outside",
            "every budget. For PEP, what the search learned (pep_torchrec/pep/diagnostics.py, from the snapshot's",
            "checkpoint): overlap of its top-K by margin with the top-K |v| (mean over seeds); per seed, the distinct",
            "row sizes holding >= 10 % of the rows and Spearman(train id frequency, row size), each as 'top-K by",
            "margin,saved mask'.",
            f"Reproduce: `python -m benchmarks.quality --datasets= --no-synthetic --seeds {','.join(map(str, seeds))} "
            f"--budgets {budgets}`.",
            "",
            markdown_table(
                result["summary"],
                [
                    ("budget", "budget", "g"),
                    ("method", "method", ""),
                    ("seeds", "seeds", "d"),
                    ("kept", "kept params", ",d"),
                    ("test_auc_mean", "test AUC mean", ".4f"),
                    ("test_auc_std", "sd", ".4f"),
                    ("test_auc_min", "min", ".4f"),
                    ("valid_auc_mean", "valid AUC mean", ".4f"),
                    ("overlap_mean", "overlap top-K vs top-\\|v\\|", ".1%"),
                    ("major_sizes", "sizes ≥ 10 % rows", ""),
                    ("rho", "ρ(freq, size)", ""),
                ],
            ),
            "",
            "Per seed:",
            "",
            markdown_table(
                result["rows"],
                [
                    ("seed", "seed", "d"),
                    ("budget", "budget", "g"),
                    ("method", "method", ""),
                    ("kept", "kept params", ",d"),
                    ("test_auc", "test AUC", ".4f"),
                    ("delta_auc", "Δ vs base", "+.4f"),
                    ("valid_auc", "valid AUC", ".4f"),
                ],
            ),
            "",
        ]
    )


def synthetic_signal_share(work: Path) -> dict:
    """Share of kept elements in the generator's signal vs noise fields at each budget."""
    data = _prepare("synthetic", work)
    schema = json.loads((data / "schema.json").read_text())
    signal = set(schema["extra"]["signal_fields"])
    run = work / "runs" / "synthetic" / "fm_search"
    log: list[dict] = []
    search_set = _overrides_from(REPO / "configs" / "movielens_fm_search.yaml", ("pep", "train"))
    # The learned ranking alone: no row floor (it would spread the budget evenly by construction).
    _train(
        [
            "--config",
            "configs/criteo_fm.yaml",
            "--data",
            str(data),
            "--run-dir",
            str(run),
            "--set",
            *search_set,
            "model.embedding_dim=16",
            "model.options={use_dense: false}",
            "pep.mask_layout=elementwise",
            "pep.min_row_dims=0",
        ],
        log,
    )
    rows = []
    for budget in BUDGETS:
        mask_dir = RunDir(run).mask_dir(budget)
        if not (mask_dir / "meta.json").exists():
            continue
        meta = read_meta(mask_dir)
        kept_signal = sum(
            t["kept"] for name, t in meta["tables"].items() if name.removeprefix("t_") in signal
        )
        total_signal = sum(
            t["rows"] for name, t in meta["tables"].items() if name.removeprefix("t_") in signal
        )
        total = sum(t["rows"] for t in meta["tables"].values())
        rows.append(
            {
                "budget": budget,
                "kept": meta["kept"],
                "signal_fields": len(signal),
                "noise_fields": len(meta["tables"]) - len(signal),
                "kept_share_in_signal": kept_signal / meta["kept"],
                "signal_share_of_params": total_signal / total,
            }
        )
    return {"dataset": "synthetic", "rows": rows, "commands": log}


def _markdown(result: dict, info: dict) -> str:
    columns = [
        ("model", "model", ""),
        ("method", "method", ""),
        ("budget", "budget", "g"),
        ("kept", "kept params", ",d"),
        ("test_auc", "test AUC", ".4f"),
        ("delta_auc", "Δ vs base", "+.4f"),
        ("test_logloss", "test logloss", ".4f"),
        ("valid_auc", "valid AUC", ".4f"),
        ("search_over_base_time", "search/base time", ".2f"),
        ("search_step_time_over_base", "search/base per step", ".2f"),
    ]
    return "\n".join(
        [
            f"# PEP quality on {result['dataset']}",
            "",
            f"{info['date']}, {info['host_cpu']} ({info['cpu_count']} cores), torch {info['versions']['torch']}, "
            f"torchrec {info['versions'].get('torchrec')}, commit {info['git_commit']}. One process, CPU.",
            "Test metrics of the best-on-valid checkpoint of each run. 'PEP retrain': lottery ticket from the",
            "search's exact-budget mask (step-0 embedding x mask; the search config's row rules: layout, floor).",
            "'magnitude': top-|v| elements of the trained base embedding, fine-tuned with the mask fixed from all",
            "trained parameters; 'magnitude, PEP's row rules': the same ranking under the PEP masks' layout and",
            "floor. Lottery tickets from the search's init: 'uniform-k' (every row the same k = K / rows dims),",
            "'frequency sizes' (row sizes from train id frequency, no learning), 'PEP sizes, random elements' (the",
            "PEP mask's row counts at random columns). Every retrain uses the retrain config's train and optim",
            "settings. FM's first-order weights (one per row) are outside every budget. Reproduce: `make quality`.",
            "",
            markdown_table(result["rows"], columns),
            "",
        ]
    )


def _budget_list(text: str) -> list[float]:
    budgets = [float(x) for x in text.split(",") if x.strip()]
    if not budgets or not all(0 < b < 1 for b in budgets):
        raise SystemExit(f"--budgets {text!r}: shares of the embedding in (0, 1), e.g. 0.1,0.05")
    return budgets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", default="movielens,criteo", help="per-dataset tables (empty: none)")
    parser.add_argument("--models", default="fm,deepfm,autoint", help="models of the per-dataset tables")
    parser.add_argument(
        "--budgets",
        default=None,
        help=f"restrict the budgets (default: {','.join(map(str, BUDGETS))} in the tables, "
        f"{','.join(map(str, SEED_BUDGETS))} over seeds); the search always runs its full schedule",
    )
    parser.add_argument("--synthetic", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--seeds", default="0,1,2", help="seeds of the ml-100k FM comparison over seeds (empty: skip it)"
    )
    parser.add_argument("--work", default=str(REPO / "out" / "quality"))
    parser.add_argument(
        "--results",
        default=str(RESULTS),
        help="where the Markdown and JSON go (a restricted run: not benchmarks/results)",
    )
    args = parser.parse_args(argv)
    work, results = Path(args.work), Path(args.results)
    table_budgets = _budget_list(args.budgets) if args.budgets else BUDGETS
    seed_budgets = _budget_list(args.budgets) if args.budgets else SEED_BUDGETS
    info = machine_info()
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    if seeds and RAW["movielens"].exists():
        started = time.perf_counter()
        result = seed_check("movielens", "fm", seed_budgets, seeds, work)
        result["wall_s"] = time.perf_counter() - started
        md = _seeds_markdown(result, info)
        write_results("quality_movielens_fm_seeds", {"machine": info, **result}, md, directory=results)
        print(md)
    for dataset in [d for d in args.datasets.split(",") if d]:
        if not RAW[dataset].exists():
            print(f"skip {dataset}: {RAW[dataset]} absent", file=sys.stderr)
            continue
        started = time.perf_counter()
        result = run_dataset(dataset, [m for m in args.models.split(",") if m], work, table_budgets)
        result["wall_s"] = time.perf_counter() - started
        md = _markdown(result, info)
        write_results(f"quality_{dataset}", {"machine": info, **result}, md, directory=results)
        print(md)
    if args.synthetic:
        result = synthetic_signal_share(work)
        md = "\n".join(
            [
                "# PEP on synthetic data: where the kept parameters go",
                "",
                "FM search on the synthetic generator's data (some fields carry the planted signal, the others are",
                "noise). A share of kept parameters in signal fields above their share of all parameters means",
                "PEP keeps what matters. The masks use PEP's ranking alone (element-wise, no row floor).",
                "Reproduce: `python -m benchmarks.quality --datasets= --seeds= --synthetic`.",
                "",
                markdown_table(
                    result["rows"],
                    [
                        ("budget", "budget", "g"),
                        ("kept", "kept", ",d"),
                        ("signal_fields", "signal fields", "d"),
                        ("noise_fields", "noise fields", "d"),
                        ("kept_share_in_signal", "kept in signal fields", ".3f"),
                        ("signal_share_of_params", "signal fields' share of params", ".3f"),
                    ],
                ),
                "",
            ]
        )
        write_results("quality_synthetic", {"machine": info, **result}, md, directory=results)
        print(md)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
