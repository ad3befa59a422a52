"""Base-model quality on the real data in ../shared/data: dataset x model → valid/test AUC, logloss,
steps, examples/s. Writes benchmarks/results/baselines.{json,md}.

    python -m benchmarks.baselines [--datasets movielens,criteo] [--models fm,deepfm,autoint,dlrm]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, SHARED_DATA, machine_info, markdown_table, write_results
from pep_torchrec import cli
from pep_torchrec.training.run_dir import RunDir

RAW = {"movielens": SHARED_DATA / "ml-100k", "criteo": SHARED_DATA / "criteo_kaggle_head10k"}
LABEL = {"movielens": "ml-100k", "criteo": "criteo 10k"}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", default="movielens,criteo")
    parser.add_argument("--models", default="fm,deepfm,autoint,dlrm")
    parser.add_argument("--work", default=str(REPO / "out" / "bench"), help="prepared data and runs go here")
    parser.add_argument("--name", default="baselines")
    return parser.parse_args(argv)


def _train_base(dataset: str, model: str, data: Path, work: Path) -> dict | None:
    """Train the dataset's base config for `model`; its summary as a table row (None: training failed)."""
    run = work / "runs" / f"{dataset}_{model}"
    config = REPO / "configs" / f"{dataset}_{model}.yaml"
    argv_train = [
        "train",
        "--config",
        str(config.relative_to(REPO)),
        "--data",
        str(data),
        "--run-dir",
        str(run),
        "--overwrite",
        "--set",
        "train.progress=false",
    ]
    t0 = time.perf_counter()
    if cli.main(argv_train) != 0:
        return None
    summary = RunDir(run).summary(required=True)
    return {
        "dataset": LABEL[dataset],
        "model": model,
        "valid_auc": summary["valid_auc"],
        "valid_logloss": summary["valid_logloss"],
        "test_auc": summary["test_auc"],
        "test_logloss": summary["test_logloss"],
        "steps": summary["steps"],
        "best_step": summary["best_step"],
        "examples_per_sec": summary["examples_per_sec"],
        "wall_s": time.perf_counter() - t0,
        "embedding_params": summary["embedding_params_total"],
        "command": "pep-torchrec " + " ".join(argv_train[:-2]),
    }


def _write_table(rows: list[dict], name: str) -> None:
    info = machine_info()
    columns = [
        ("dataset", "dataset", ""),
        ("model", "model", ""),
        ("valid_auc", "valid AUC", ".4f"),
        ("valid_logloss", "valid logloss", ".4f"),
        ("test_auc", "test AUC", ".4f"),
        ("test_logloss", "test logloss", ".4f"),
        ("steps", "steps", "d"),
        ("best_step", "best step", "d"),
        ("examples_per_sec", "train ex/s", ",.0f"),
        ("embedding_params", "emb. params", ",d"),
    ]
    md = "\n".join(
        [
            "# Base models on the shared real data",
            "",
            f"{info['date']}, {info['host_cpu']} ({info['cpu_count']} cores), torch {info['versions']['torch']}, "
            f"torchrec {info['versions'].get('torchrec')}, commit {info['git_commit']}.",
            "1 process (world size 1), CPU, fused Adagrad tables + Adam dense; test metrics are those of the",
            "best-on-valid checkpoint. ml-100k test AUC has a sampling error of about 0.004; Criteo 10k about 0.02.",
            "Reproduce: `python -m benchmarks.baselines` (each row's training command is in baselines.json).",
            "",
            markdown_table(rows, columns),
            "",
        ]
    )
    write_results(name, {"machine": info, "rows": rows}, md)
    print(md)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    work = Path(args.work)
    rows = []
    for dataset in args.datasets.split(","):
        raw = RAW[dataset]
        if not raw.exists():
            print(f"skip {dataset}: {raw} absent", file=sys.stderr)
            continue
        data = work / "data" / dataset
        if not (data / "schema.json").exists():
            prep = ["data", "prepare", "--dataset", dataset, "--raw", str(raw), "--out", str(data)]
            if cli.main(prep) != 0:
                return 1
        for model in args.models.split(","):
            row = _train_base(dataset, model, data, work)
            if row is None:
                return 1
            rows.append(row)
    _write_table(rows, args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
