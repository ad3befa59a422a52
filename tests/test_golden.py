"""Golden metrics: fixed-seed debug runs of the three stages (baseline, search, retrain) whose every
eval and final metric is checked in (`tests/assets/golden/*.json`) and asserted exactly, as
torchtitan keeps its loss curves. A change meant to move nothing (a refactor, a faster kernel with
the same arithmetic) must leave them bit-identical; a change to the math updates them on purpose:

    PEP_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py   # rewrite, then review the diff

One process, one thread (OpenMP reductions of a different thread count round differently), the
synthetic debug data the pipeline generates itself; wall-clock fields are left out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pep_torchrec import cli

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "assets" / "golden"
UPDATE = os.environ.get("PEP_UPDATE_GOLDEN") == "1"
COMMON = ["--set", "train.progress=false", "train.num_threads=1"]
# stage → (config, extra arguments); retrain takes the search's 20 % mask.
STAGES = {
    "baseline": ("debug_cpu.yaml", ["--set", "train.max_steps=50"]),
    "search": ("debug_cpu_search.yaml", ["--set", "train.max_steps=100"]),
    "retrain": ("debug_cpu_retrain.yaml", ["--set", "train.max_steps=50"]),
    # The shipped searches' mechanism: s on its own optimizer (the C++ row map, gather and step).
    "search_own_s": (
        "debug_cpu_search.yaml",
        [
            "--set",
            "train.max_steps=100",
            "pep.target_epochs=0",
            "pep.gk_growth=1.05",
            "pep.s_optimizer=sgd",
            "pep.s_lr=0.05",
            "pep.s0=-10.0",
            "pep.gk=1.0",
            "pep.min_row_dims=0",
        ],
    ),  # fmt: skip
}
WALL_CLOCK = {"examples_per_sec", "train_seconds", "wall_seconds", "duration_s"}
SUMMARY_KEYS = ("steps", "best_step", "valid_auc", "valid_logloss", "test_auc", "test_logloss",
                "embedding_params_total", "embedding_params_kept")  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("golden")
    data = root / "data"
    assert cli.main(["data", "prepare", "--dataset", "synthetic", "--out", str(data), "--rows", "20000",
                     "--num-sparse", "8", "--num-dense", "4", "--cardinality", "1000"]) == 0  # fmt: skip
    out = {}
    for stage, (config, extra) in STAGES.items():
        run = root / stage
        mask = ["--mask", str(root / "search" / "masks" / "budget_0.2")] if stage == "retrain" else []
        assert cli.main(["train", "--config", str(REPO / "configs" / config), "--data", str(data),
                         "--run-dir", str(run), *mask, *COMMON, *extra]) == 0  # fmt: skip
        evals = [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK}
                 for line in (run / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
        summary = json.loads((run / "summary.json").read_text())
        out[stage] = {"evals": evals, "summary": {k: summary[k] for k in SUMMARY_KEYS}}
    return out


@pytest.mark.parametrize("stage", list(STAGES))
def test_golden_metrics(runs: dict[str, dict], stage: str) -> None:
    path = GOLDEN / f"debug_{stage}.json"
    got = runs[stage]
    if UPDATE:
        path.write_text(json.dumps(got, indent=1) + "\n")
    want = json.loads(path.read_text())
    assert len(got["evals"]) == len(want["evals"]) and got["evals"], stage
    for g, w in zip(got["evals"], want["evals"]):
        assert g == w, f"{stage} step {w.get('step')}: {g} != {w}"
    assert got["summary"] == want["summary"]
