"""The PEP workflow end to end on the debug data: search → exact-budget masks → lottery-ticket retrain
(masked elements exactly zero in the checkpoint) → magnitude-pruning baseline → report; and the same
search + retrain on 2 ranks under torchx."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pep_torchrec import cli
from pep_torchrec.pep.controls import load_full_tables
from pep_torchrec.training.run_dir import RunDir
from tests.helpers.launch import launch_torchx_ddp, needs_torchx

REPO = Path(__file__).resolve().parents[2]
SEARCH = str(REPO / "configs" / "debug_cpu_search.yaml")
RETRAIN = str(REPO / "configs" / "debug_cpu_retrain.yaml")
BASE = str(REPO / "configs" / "debug_cpu.yaml")
QUIET = ["--set", "train.progress=false"]


@pytest.fixture(scope="module")
def search(tmp_path_factory, debug_data) -> Path:
    run = tmp_path_factory.mktemp("search") / "run"
    assert (
        cli.main(["train", "--config", SEARCH, "--data", str(debug_data), "--run-dir", str(run), *QUIET]) == 0
    )
    return run


def _tables(run: Path) -> dict[str, int]:
    meta = json.loads((run / "init" / "meta.json").read_text())
    return {t: v["rows"] for t, v in meta["tables"].items()}


def test_search_snapshots_keep_exactly_the_budget(search):
    summary = json.loads((search / "summary.json").read_text())
    total = summary["embedding_params_total"]
    assert [s["budget"] for s in summary["snapshots"]] == [0.5, 0.2]
    assert summary["stop_reason"] == "budgets_reached"
    for snap in summary["snapshots"]:
        mask_dir = Path(snap["path"])
        meta = json.loads((mask_dir / "meta.json").read_text())
        masks = np.concatenate([np.load(mask_dir / f"{t}.npy") for t in meta["tables"]])
        assert masks.sum() == snap["kept"] == round(snap["budget"] * total) == meta["kept"]
        # The config's row rules: every row keeps >= the affordable floor, in one shared column order.
        assert meta["layout"] == "aligned" and meta["min_row_dims"] == min(2, snap["kept"] // len(masks))
        assert masks.sum(1).min() >= meta["min_row_dims"]
        order = np.argsort(-masks.sum(0), kind="stable")
        prefix = np.arange(masks.shape[1])[None, :] < masks.sum(1, keepdims=True)
        np.testing.assert_array_equal(masks[:, order], prefix)
    evals = [json.loads(line) for line in (search / "metrics.jsonl").read_text().splitlines()]
    assert all("kept_by_table" in e and sum(e["kept_by_table"].values()) == e["kept"] for e in evals)
    assert evals[-1]["kept"] < evals[0]["kept"]
    assert (
        summary["embedding_params_kept"] <= summary["snapshots"][-1]["kept"]
    )  # the search ends past its last budget


def test_retrain_from_mask_keeps_masked_elements_at_zero(tmp_path, debug_data, search):
    mask_dir = search / "masks" / "budget_0.2"
    run = tmp_path / "retrain"
    assert (
        cli.main(
            [
                "train",
                "--config",
                RETRAIN,
                "--data",
                str(debug_data),
                "--run-dir",
                str(run),
                "--mask",
                str(mask_dir),
                *QUIET,
            ]
        )
        == 0
    )
    summary = json.loads((run / "summary.json").read_text())
    expected = json.loads((mask_dir / "meta.json").read_text())["kept"]
    assert summary["embedding_params_kept"] == expected == summary["nonzero_embedding_params"]

    dim = 8
    tables = _tables(search)
    stored = load_full_tables(
        RunDir(run).best_checkpoint(),
        {t: (n, 2 * dim) for t, n in tables.items()},
        key="model.ebc._embedding_bag_collection.embedding_bags.{table}.weight",
    )
    for table, weight in stored.items():
        mask = np.load(mask_dir / f"{table}.npy")
        v, m = weight[:, :dim].numpy(), weight[:, dim:].numpy()
        assert (v[~mask] == 0).all(), table  # pruned elements never moved
        np.testing.assert_array_equal(m > 0.5, mask)
        init = np.load(search / "init" / f"{table}.npy")
        assert (v[mask] != init[mask]).any(), table  # kept elements trained


def test_retrain_refuses_a_missing_or_foreign_mask(tmp_path, debug_data, search, capsys):
    assert (
        cli.main(
            [
                "train",
                "--config",
                RETRAIN,
                "--data",
                str(debug_data),
                "--run-dir",
                str(tmp_path / "r"),
                *QUIET,
            ]
        )
        == 2
    )
    assert "needs a mask" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "train",
                "--config",
                RETRAIN,
                "--data",
                str(debug_data),
                "--run-dir",
                str(tmp_path / "r2"),
                "--mask",
                str(search / "init"),
                *QUIET,
            ]
        )
        == 2
    )
    assert "not a mask directory" in capsys.readouterr().err


def test_budget_override_and_magnitude_baseline_and_report(tmp_path, debug_data, search, caplog):
    base = tmp_path / "base"
    assert (
        cli.main(
            [
                "train",
                "--config",
                BASE,
                "--data",
                str(debug_data),
                "--run-dir",
                str(base),
                *QUIET,
                "train.max_steps=50",
            ]
        )
        == 0
    )
    assert (
        cli.main(["prune", "--run-dir", str(base), "--budgets", "0.2", "--out", str(tmp_path / "mag")]) == 0
    )
    mask = tmp_path / "mag" / "masks" / "budget_0.2"
    meta = json.loads((mask / "meta.json").read_text())
    assert meta["criterion"] == "magnitude" and meta["kept"] == 12800 and meta["warnings"] == []
    # A floor of 4 dims over 8,000 rows: 12,800 elements afford 1 each, 1,280 none; both are said.
    with caplog.at_level("WARNING", logger="pep_torchrec.pep.controls"):
        assert (
            cli.main(
                [
                    "prune",
                    "--run-dir",
                    str(base),
                    "--budgets",
                    "0.2,0.02",
                    "--out",
                    str(tmp_path / "floor"),
                    "--layout",
                    "aligned",
                    "--min-row-dims",
                    "4",
                ]
            )
            == 0
        )
    said = [r.getMessage() for r in caplog.records]
    assert any("budget 0.2: row floor clipped: 4 dims per row requested, 1 applied" in m for m in said), said
    assert any("budget 0.02: row floor clipped: 4 dims per row requested, 0 applied" in m for m in said), said
    floor_meta = json.loads((tmp_path / "floor" / "masks" / "budget_0.02" / "meta.json").read_text())
    assert floor_meta["min_row_dims"] == 0 and floor_meta["min_row_dims_requested"] == 4
    run = tmp_path / "mag_retrain"
    assert (
        cli.main(
            [
                "train",
                "--config",
                RETRAIN,
                "--data",
                str(debug_data),
                "--run-dir",
                str(run),
                "--mask",
                str(mask),
                *QUIET,
                "train.max_steps=25",
            ]
        )
        == 0
    )
    assert json.loads((run / "summary.json").read_text())["nonzero_embedding_params"] == 12800

    assert cli.main(["report", "--run-dir", str(search), "--out", str(tmp_path / "report")]) == 0
    for name in ("report.md", "kept_and_auc.png", "embedding_sizes.png", "size_vs_frequency.png"):
        assert (tmp_path / "report" / name).is_file(), name


@needs_torchx
def test_torchx_two_rank_search_and_retrain(tmp_path, debug_data):
    def launch(config: str, run: Path, *extra: str) -> None:
        launch_torchx_ddp(
            "--config", config, "--data", str(debug_data), "--run-dir", str(run), *extra,
            "--set", "train.progress=false",
        )  # fmt: skip

    search = tmp_path / "search2"
    launch(SEARCH, search)
    summary = json.loads((search / "summary.json").read_text())
    assert summary["world_size"] == 2 and [s["budget"] for s in summary["snapshots"]] == [0.5, 0.2]
    mask_dir = search / "masks" / "budget_0.2"
    kept = sum(int(np.load(p).sum()) for p in mask_dir.glob("*.npy"))
    assert kept == 12800
    retrain = tmp_path / "retrain2"
    launch(RETRAIN, retrain, "--mask", str(mask_dir))
    summary = json.loads((retrain / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["nonzero_embedding_params"] == 12800


def test_report_says_what_the_search_learned(tmp_path, debug_data, search):
    """The report's search diagnostics against a direct computation from the snapshot's checkpoint."""
    import pyarrow.parquet as pq
    from scipy.stats import spearmanr

    from pep_torchrec.report import make_report

    result = make_report(search, tmp_path / "report")
    learned = result["search_diagnostics"]
    assert json.loads((tmp_path / "report" / "search_diagnostics.json").read_text()) == learned
    text = (tmp_path / "report" / "report.md").read_text()
    assert (
        "## What the search learned" in text
        and "Row sizes at budget 0.2, the saved mask (aligned, floor 1)" in text
    )
    dim, tables = 8, _tables(search)
    summary = json.loads((search / "summary.json").read_text())
    assert (
        [s["budget"] for s in learned["snapshots"]]
        == [s["budget"] for s in summary["snapshots"]]
        == [0.5, 0.2]
    )
    train = pq.read_table(debug_data / "train" / "part-00000.parquet")
    for snap, diag in zip(summary["snapshots"], learned["snapshots"]):
        checkpoint = search / "checkpoints" / f"step_{snap['step']:08d}"
        gk = json.loads((checkpoint / "trainer_state.json").read_text())["trainer"]["gk"]
        stored = load_full_tables(
            checkpoint,
            {t: (n, 2 * dim) for t, n in tables.items()},
            key="model.ebc._embedding_bag_collection.embedding_bags.{table}.weight",
        )
        v = np.concatenate([stored[t][:, :dim].numpy() for t in tables]).astype(np.float64)
        unit = 1 / (
            1 + np.exp(-np.concatenate([stored[t][:, dim:].numpy() for t in tables]).astype(np.float64))
        )
        k = snap["kept"]
        assert diag["kept"] == k and diag["gk"] == gk and diag["step"] == snap["step"]
        np.testing.assert_allclose(
            [diag["sigmoid_s_percentiles"][p] for p in ("5", "50", "95")],
            np.percentile(unit, [5, 50, 95]),
            rtol=1e-5,
        )
        top_margin = np.argsort(-(np.abs(v) - gk * unit).ravel(), kind="stable")[:k]
        top_v = np.argsort(-np.abs(v).ravel(), kind="stable")[:k]
        assert diag["overlap_topk_margin_vs_topk_absv"] == pytest.approx(
            np.intersect1d(top_margin, top_v).size / k, abs=2 / k
        )
        sizes_top = np.zeros(v.size, bool)
        sizes_top[top_margin] = True
        sizes_top = sizes_top.reshape(v.shape).sum(1)
        mask = np.concatenate(
            [np.load(search / "masks" / f"budget_{snap['budget']:g}" / f"{t}.npy") for t in tables]
        )
        sizes_mask = mask.sum(1)
        freq = np.concatenate(
            [np.bincount(train[t.removeprefix("t_")].to_numpy(), minlength=n) for t, n in tables.items()]
        )
        for key, sizes in (("sizes_top_k_margin", sizes_top), ("sizes_saved_mask", sizes_mask)):
            got = diag[key]
            assert got["rows"] == sizes.size and got["mean"] == pytest.approx(
                sizes.mean(), abs=2 / sizes.size
            )
            expected_hist = [np.mean(sizes == s) for s in (0, 1, 2, 3)] + [
                np.mean((sizes >= 4) & (sizes <= 7)),
                np.mean(sizes == 8),
                0.0,
            ]
            np.testing.assert_allclose(got["hist"], expected_hist, atol=2 / sizes.size)
            assert got["major_sizes"] == int((np.bincount(sizes) >= 0.1 * sizes.size).sum())
            assert got["spearman_freq_size"] == pytest.approx(spearmanr(freq, sizes).statistic, abs=0.02)
        assert diag["sizes_saved_mask"]["hist"][0] == 0.0  # the affordable floor (2, then 1): no row is empty
        share = (mask & ((np.abs(v) - gk * unit) > 0)).sum() / k
        assert diag["mask_share_kept_by_search"] == pytest.approx(share, abs=2 / k)
