"""Paper-style quality table: base model vs PEP (search, then lottery-ticket retrain) vs magnitude
pruning (top-|v| of the trained base embedding, fine-tuned with the mask fixed), at 20/10/5/2% of the
embedding parameters, for FM, DeepFM and AutoInt on ml-100k and the Criteo 10k sample; plus, on the
synthetic data, the share of kept parameters in signal vs noise fields.

    python benchmarks/quality.py [--datasets movielens,criteo] [--models fm,deepfm,autoint]
    make quality

Writes benchmarks/results/quality_<dataset>.{json,md} and quality_synthetic.{json,md}. Every training
command it runs is recorded in the JSON. Search and retrain use the base config of each dataset x model
plus the PEP settings of configs/<dataset>_fm_search.yaml / _retrain.yaml (pep, train stage and schedule).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, SHARED_DATA, machine_info, markdown_table, write_results  # noqa: E402
from pep_torchrec import cli  # noqa: E402

RAW = {"movielens": SHARED_DATA / "ml-100k", "criteo": SHARED_DATA / "criteo_kaggle_head10k"}
LABEL = {"movielens": "ml-100k", "criteo": "Criteo 10k", "synthetic": "synthetic"}
BUDGETS = [0.2, 0.1, 0.05, 0.02]


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
    return ["--layout", str(pep.get("mask_layout", "elementwise")), "--min-row-dims", str(pep.get("min_row_dims", 0)),
            "--max-row-dims", str(pep.get("max_row_dims", 0))]


def _prune(base_run: Path, out: Path, budgets: list[float], flags: list[str]) -> None:
    argv = ["prune", "--run-dir", str(base_run), "--budgets", ",".join(map(str, budgets)), "--out", str(out), *flags]
    if cli.main(argv) != 0:
        raise SystemExit(f"prune failed: pep-torchrec {' '.join(argv)}")


# Mask sources compared at every budget: (method label, run subdirectory holding masks/).
METHODS = (("PEP retrain", "search"), ("magnitude", "magnitude"), ("magnitude, PEP's row rules", "magnitude_rules"))


def _train(argv: list[str], log: list[dict]) -> dict:
    started = time.perf_counter()
    if cli.main(["train", *argv, "--overwrite", "--set", "train.progress=false"]) != 0:
        raise SystemExit(f"training failed: pep-torchrec train {' '.join(argv)}")
    run_dir = Path(argv[argv.index("--run-dir") + 1])
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["wall_s"] = time.perf_counter() - started
    log.append({"command": "pep-torchrec train " + " ".join(argv), "wall_s": summary["wall_s"]})
    return summary


def _prepare(dataset: str, work: Path) -> Path:
    data = work / "data" / dataset
    if not (data / "schema.json").exists():
        argv = ["data", "prepare", "--dataset", dataset, "--out", str(data)]
        argv += ["--raw", str(RAW[dataset])] if dataset in RAW else ["--rows", "200000", "--cardinality", "5000"]
        if cli.main(argv) != 0:
            raise SystemExit(f"prepare failed: {argv}")
    return data


def _base_search_prunes(base_cfg: str, data: Path, runs: Path, search_set: list[str], rules: list[str],
                        budgets: list[float], search_extra: list[str], seed_set: list[str],
                        log: list[dict]) -> tuple[dict, dict]:
    """One model's base run, PEP search and magnitude masks (plain and under the search's row rules)."""
    base = _train(["--config", base_cfg, "--data", str(data), "--run-dir", str(runs / "base"),
                   *(["--set", *seed_set] if seed_set else [])], log)
    search = _train(["--config", base_cfg, "--data", str(data), "--run-dir", str(runs / "search"),
                     "--set", *search_set, *search_extra, *seed_set], log)
    _prune(runs / "base", runs / "magnitude", budgets, [])
    _prune(runs / "base", runs / "magnitude_rules", budgets, rules)
    return base, search


def _retrain(base_cfg: str, data: Path, run_dir: Path, mask: Path, retrain_set: list[str], seed_set: list[str],
             log: list[dict]) -> dict:
    """A retrain of `mask` (lottery ticket) with the retrain config's train and optim settings."""
    return _train(["--config", base_cfg, "--data", str(data), "--run-dir", str(run_dir), "--mask", str(mask),
                   "--set", *retrain_set, *seed_set], log)


def run_dataset(dataset: str, models: list[str], work: Path) -> dict:
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
        base, search = _base_search_prunes(base_cfg, data, runs, search_set, rules, BUDGETS,
                                           [f"pep.budgets={json.dumps(BUDGETS)}"], [], log)
        rows.append({"model": model, "method": "base", "budget": 1.0, "kept": base["embedding_params_kept"],
                     "test_auc": base["test_auc"], "test_logloss": base["test_logloss"],
                     "valid_auc": base["valid_auc"], "train_s": base["train_seconds"]})
        snapshots = {s["budget"]: s for s in search["snapshots"]}
        for budget in BUDGETS:
            tag = f"budget_{budget:g}"
            for method, source in METHODS:
                if method == "PEP retrain" and budget not in snapshots:
                    rows.append({"model": model, "method": method, "budget": budget, "note": "search never reached it"})
                    continue
                result = _retrain(base_cfg, data, runs / f"{source}_retrain_{budget:g}", runs / source / "masks" / tag,
                                  retrain_set, [], log)
                rows.append({"model": model, "method": method, "budget": budget,
                             "kept": result["embedding_params_kept"], "test_auc": result["test_auc"],
                             "test_logloss": result["test_logloss"], "valid_auc": result["valid_auc"],
                             "train_s": result["train_seconds"],
                             "delta_auc": result["test_auc"] - base["test_auc"]})
        rows.append({"model": model, "method": "PEP search", "budget": min(BUDGETS),
                     "kept": search["embedding_params_kept"], "test_auc": search["test_auc"],
                     "test_logloss": search["test_logloss"], "valid_auc": search["valid_auc"],
                     "train_s": search["train_seconds"],
                     "search_over_base_time": search["train_seconds"] / base["train_seconds"],
                     "search_steps": search["steps"], "base_steps": base["steps"],
                     "search_step_time_over_base": (search["train_seconds"] / search["steps"])
                     / (base["train_seconds"] / base["steps"])})
    return {"dataset": LABEL[dataset], "rows": rows, "commands": log}


def seed_check(dataset: str, model: str, budget: float, seeds: list[int], work: Path) -> dict:
    """The acceptance comparison (base vs PEP retrain vs magnitude at one budget) over several seeds:
    each seed seeds the base, the search and the retrains (init, data order)."""
    data = _prepare(dataset, work)
    search_cfg = REPO / "configs" / f"{dataset}_{model}_search.yaml"
    retrain_set = _overrides_from(REPO / "configs" / f"{dataset}_{model}_retrain.yaml", ("train", "optim"))
    search_set = _overrides_from(search_cfg, ("pep", "train"))
    base_cfg = f"configs/{dataset}_{model}.yaml"
    tag = f"budget_{budget:g}"
    log: list[dict] = []
    rows = []
    for seed in seeds:
        runs = work / "runs" / f"{dataset}_seeds" / model / f"seed_{seed}"
        seed_set = [f"train.seed={seed}"]
        base, _ = _base_search_prunes(base_cfg, data, runs, search_set, _row_rules(search_cfg), [budget], [],
                                      seed_set, log)
        rows.append({"seed": seed, "method": "base", "test_auc": base["test_auc"], "valid_auc": base["valid_auc"],
                     "kept": base["embedding_params_kept"]})
        for method, source in METHODS:
            result = _retrain(base_cfg, data, runs / f"{source}_retrain", runs / source / "masks" / tag, retrain_set,
                              seed_set, log)
            rows.append({"seed": seed, "method": method, "test_auc": result["test_auc"],
                         "valid_auc": result["valid_auc"], "kept": result["embedding_params_kept"],
                         "delta_auc": result["test_auc"] - base["test_auc"]})
    summary = []
    for method in ["base", *(m for m, _ in METHODS)]:
        mine = [r for r in rows if r["method"] == method]
        test = np.array([r["test_auc"] for r in mine])
        summary.append({"method": method, "seeds": len(mine), "kept": mine[0]["kept"],
                        "test_auc_mean": float(test.mean()), "test_auc_std": float(test.std(ddof=1)) if len(test) > 1 else 0.0,
                        "test_auc_min": float(test.min()),
                        "valid_auc_mean": float(np.mean([r["valid_auc"] for r in mine]))})
    return {"dataset": LABEL[dataset], "model": model, "budget": budget, "rows": rows, "summary": summary,
            "commands": log}


def _seeds_markdown(result: dict, info: dict) -> str:
    return "\n".join([
        f"# {result['model'].upper()} on {result['dataset']} at {result['budget']:g} of the embedding parameters, "
        f"{len({r['seed'] for r in result['rows']})} seeds", "",
        f"{info['date']}, {info['host_cpu']} ({info['cpu_count']} cores), torch {info['versions']['torch']}, "
        f"commit {info['git_commit']}. One process, CPU. Each seed seeds the base, the search and the retrains.",
        "The search uses the search config's row rules; 'magnitude' is plain top-|v| element-wise; 'magnitude,",
        "PEP's row rules' ranks by |v| under the same layout and floor as the PEP masks.",
        "Reproduce: `python benchmarks/quality.py --datasets= --no-synthetic --seeds 0,1,2`.", "",
        markdown_table(result["summary"], [("method", "method", ""), ("seeds", "seeds", "d"), ("kept", "kept params", ",d"),
                                           ("test_auc_mean", "test AUC mean", ".4f"), ("test_auc_std", "std", ".4f"),
                                           ("test_auc_min", "min", ".4f"), ("valid_auc_mean", "valid AUC mean", ".4f")]),
        "", "Per seed:", "",
        markdown_table(result["rows"], [("seed", "seed", "d"), ("method", "method", ""), ("kept", "kept params", ",d"),
                                        ("test_auc", "test AUC", ".4f"), ("delta_auc", "Δ vs base", "+.4f"),
                                        ("valid_auc", "valid AUC", ".4f")]),
        "",
    ])


def synthetic_signal_share(work: Path) -> dict:
    """Share of kept elements in the generator's signal vs noise fields at each budget."""
    data = _prepare("synthetic", work)
    schema = json.loads((data / "schema.json").read_text())
    signal = set(schema["extra"]["signal_fields"])
    run = work / "runs" / "synthetic" / "fm_search"
    log: list[dict] = []
    search_set = _overrides_from(REPO / "configs" / "movielens_fm_search.yaml", ("pep", "train"))
    # The learned ranking alone: no row floor (it would spread the budget evenly by construction).
    _train(["--config", "configs/criteo_fm.yaml", "--data", str(data), "--run-dir", str(run),
            "--set", *search_set, "model.embedding_dim=16", "model.options={use_dense: false}",
            "pep.mask_layout=elementwise", "pep.min_row_dims=0"], log)
    rows = []
    for budget in BUDGETS:
        meta_path = run / "masks" / f"budget_{budget:g}" / "meta.json"
        if not meta_path.exists():
            continue
        meta = json.loads(meta_path.read_text())
        kept_signal = sum(t["kept"] for name, t in meta["tables"].items() if name.removeprefix("t_") in signal)
        total_signal = sum(t["rows"] for name, t in meta["tables"].items() if name.removeprefix("t_") in signal)
        total = sum(t["rows"] for t in meta["tables"].values())
        rows.append({"budget": budget, "kept": meta["kept"], "signal_fields": len(signal),
                     "noise_fields": len(meta["tables"]) - len(signal),
                     "kept_share_in_signal": kept_signal / meta["kept"],
                     "signal_share_of_params": total_signal / total})
    return {"dataset": "synthetic", "rows": rows, "commands": log}


def _markdown(result: dict, info: dict) -> str:
    columns = [("model", "model", ""), ("method", "method", ""), ("budget", "budget", "g"),
               ("kept", "kept params", ",d"), ("test_auc", "test AUC", ".4f"), ("delta_auc", "Δ vs base", "+.4f"),
               ("test_logloss", "test logloss", ".4f"), ("valid_auc", "valid AUC", ".4f"),
               ("search_over_base_time", "search/base time", ".2f"),
               ("search_step_time_over_base", "search/base per step", ".2f")]
    return "\n".join([
        f"# PEP quality on {result['dataset']}", "",
        f"{info['date']}, {info['host_cpu']} ({info['cpu_count']} cores), torch {info['versions']['torch']}, "
        f"torchrec {info['versions'].get('torchrec')}, commit {info['git_commit']}. One process, CPU.",
        "Test metrics of the best-on-valid checkpoint of each run. 'PEP retrain': lottery ticket from the",
        "search's exact-budget mask (step-0 embedding x mask; the search config's row rules: layout, floor).",
        "'magnitude': top-|v| elements of the trained base embedding, fine-tuned with the mask fixed from all",
        "trained parameters; 'magnitude, PEP's row rules': the same ranking under the PEP masks' layout and",
        "floor. Every retrain uses the retrain config's train and optim settings. Reproduce: `make quality`.", "",
        markdown_table(result["rows"], columns), "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="movielens,criteo")
    parser.add_argument("--models", default="fm,deepfm,autoint")
    parser.add_argument("--synthetic", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seeds", default="0,1,2",
                        help="seeds for the ml-100k FM 10%% comparison over seeds (empty: skip it)")
    parser.add_argument("--work", default=str(REPO / "out" / "quality"))
    args = parser.parse_args(argv)
    work = Path(args.work)
    info = machine_info()
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    if seeds and RAW["movielens"].exists():
        result = seed_check("movielens", "fm", 0.1, seeds, work)
        md = _seeds_markdown(result, info)
        write_results("quality_movielens_fm_seeds", {"machine": info, **result}, md)
        print(md)
    for dataset in [d for d in args.datasets.split(",") if d]:
        if not RAW[dataset].exists():
            print(f"skip {dataset}: {RAW[dataset]} absent", file=sys.stderr)
            continue
        result = run_dataset(dataset, args.models.split(","), work)
        md = _markdown(result, info)
        write_results(f"quality_{dataset}", {"machine": info, **result}, md)
        print(md)
    if args.synthetic:
        result = synthetic_signal_share(work)
        md = "\n".join([
            "# PEP on synthetic data: where the kept parameters go", "",
            "FM search on the synthetic generator's data (some fields carry the planted signal, the others are",
            "noise). A share of kept parameters in signal fields above their share of all parameters means",
            "PEP keeps what matters. The masks use PEP's ranking alone (element-wise, no row floor).",
            "Reproduce: `python benchmarks/quality.py --datasets= --seeds= --synthetic`.", "",
            markdown_table(result["rows"], [("budget", "budget", "g"), ("kept", "kept", ",d"),
                                            ("signal_fields", "signal fields", "d"), ("noise_fields", "noise fields", "d"),
                                            ("kept_share_in_signal", "kept in signal fields", ".3f"),
                                            ("signal_share_of_params", "signal fields' share of params", ".3f")]),
            "",
        ])
        write_results("quality_synthetic", {"machine": info, **result}, md)
        print(md)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
