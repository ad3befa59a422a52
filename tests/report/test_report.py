"""`pep-torchrec report` on tiny hand-built run directories (search, baseline, retrain) and their dataset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

pytest.importorskip("matplotlib")

from pep_torchrec import report  # noqa: E402
from pep_torchrec.commands import report_command  # noqa: E402
from pep_torchrec.data.schema import Schema  # noqa: E402
from pep_torchrec.report import Pairs, ReportError, make_report, spearman, train_frequencies  # noqa: E402
from pep_torchrec.report.runs import find_dataset  # noqa: E402
from tests.helpers.data import FEATURES, write_dataset  # noqa: E402

D = 8
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# ---------------------------------------------------------------------------------------------------
# helpers


def write_mask(directory: Path, budget: float, sizes: dict[str, np.ndarray], step: int, auc: float) -> int:
    """A mask directory keeping the first sizes[t][r] dimensions of row r of each table; returns kept."""
    directory.mkdir(parents=True)
    tables = {}
    for feature, size_R in sizes.items():
        mask_RD = np.arange(D)[None, :] < size_R[:, None]
        np.save(directory / f"t_{feature}.npy", mask_RD)
        tables[f"t_{feature}"] = {"rows": int(size_R.size), "kept": int(mask_RD.sum())}
    kept = sum(t["kept"] for t in tables.values())
    total = sum(card for card, _ in FEATURES.values()) * D
    (directory / "meta.json").write_text(
        json.dumps(
            {
                "kind": "mask",
                "criterion": "pep_margin",
                "budget": budget,
                "kept": kept,
                "step": step,
                "valid_auc": auc,
                "dim": D,
                "embedding_params_total": total,
                "tables": tables,
            }
        )
    )
    return kept


def write_run(
    run_dir: Path, stage: str, data_path: str, *, extra_summary: dict | None = None, config_mask: str = ""
) -> Path:
    run_dir.mkdir(parents=True)
    config = {
        "data": {"path": data_path},
        "model": {"name": "fm", "embedding_dim": D},
        "pep": {"mask": config_mask},
        "train": {"stage": stage},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    total = sum(card for card, _ in FEATURES.values()) * D
    lines = []
    for i, step in enumerate(range(10, 110, 10)):
        record = {
            "step": step,
            "epoch": step / 50,
            "train_loss": 0.6 - 0.01 * i,
            "valid_auc": 0.6 + 0.01 * i,
            "valid_logloss": 0.6 - 0.01 * i,
            "best_valid_auc": 0.6 + 0.01 * i,
        }
        if stage == "search":
            kept = int(total * 0.7**i)
            record |= {
                "kept": kept,
                "kept_share": kept / total,
                "kept_by_table": {},
                "gk": 1e-3,
                "snapshots": 0,
            }
        lines.append(json.dumps(record))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    summary = {
        "stage": stage,
        "dataset": "synthetic",
        "model": "fm",
        "steps": 100,
        "best_step": 100,
        "valid_auc": 0.6876,
        "valid_logloss": 0.51,
        "test_auc": 0.6543,
        "test_logloss": 0.52,
        "embedding_params_total": total,
        "embedding_params_kept": total,
    } | (extra_summary or {})
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """tmp/prepared_tiny (dataset), tmp/runs/{search,baseline,retrain}; config paths are relative to tmp,
    as training records them relative to where it was launched."""
    root = tmp_path_factory.mktemp("report")
    counts = write_dataset(root / "prepared_tiny")
    search = write_run(root / "runs" / "search", "search", "prepared_tiny")
    # budget 0.5: planted "frequent ids keep more dims"; budget 0.25: the opposite, on `user` only.
    rising = {"user": np.minimum(counts["user"] * D // 29, D), "genre": np.full(6, 2)}
    falling = {"user": D - rising["user"], "genre": np.full(6, 1)}
    kept_a = write_mask(search / "masks" / "budget_0.5", 0.5, rising, step=40, auc=0.63)
    kept_b = write_mask(search / "masks" / "budget_0.25", 0.25, falling, step=70, auc=0.66)
    (search / "masks" / "budget_0.1.tmp").mkdir()  # an interrupted snapshot: skipped
    snapshots = [
        {"budget": 0.5, "kept": kept_a, "step": 40, "valid_auc": 0.63, "path": "x"},
        {"budget": 0.25, "kept": kept_b, "step": 70, "valid_auc": 0.66, "path": "x"},
    ]
    summary = json.loads((search / "summary.json").read_text())
    summary |= {"snapshots": snapshots, "embedding_params_kept": kept_b}
    (search / "summary.json").write_text(json.dumps(summary))
    baseline = write_run(root / "runs" / "baseline", "baseline", "prepared_tiny")
    mask = search / "masks" / "budget_0.5"
    retrain = write_run(
        root / "runs" / "retrain",
        "retrain",
        "prepared_tiny",
        extra_summary={"mask": str(mask), "embedding_params_kept": kept_a},
    )
    return {
        "root": root,
        "counts": counts,
        "search": search,
        "baseline": baseline,
        "retrain": retrain,
        "rising": rising,
        "kept": (kept_a, kept_b),
    }


@pytest.fixture(scope="module")
def search_report(runs: dict) -> dict:
    return make_report(runs["search"])


def assert_png(path: str | Path) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000, path


# ---------------------------------------------------------------------------------------------------
# statistics


def test_spearman_matches_scipy_with_ties() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 5, 300), rng.integers(0, 7, 300) + rng.integers(0, 5, 300) // 2
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert spearman(x, x) == pytest.approx(1.0) and spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(spearman(x, np.zeros_like(x))) and math.isnan(spearman([1.0], [2.0]))


def test_weighted_spearman_equals_expanded_data() -> None:
    rng = np.random.default_rng(2)
    freq, size = rng.integers(0, 20, 500), rng.integers(0, D + 1, 500)
    pairs = Pairs.merge([Pairs.of(freq[:200], size[:200]), Pairs.of(freq[200:], size[200:])])
    assert pairs.rows == 500 and pairs.count.size < 500
    assert pairs.spearman() == pytest.approx(spearman(freq, size), abs=1e-12)


def test_train_frequencies_stream_row_groups_and_flatten_bags(runs: dict) -> None:
    data = runs["root"] / "prepared_tiny"
    assert pq.ParquetFile(data / "train" / "part-00000.parquet").num_row_groups > 1
    counts = train_frequencies(data, Schema.load(data), {"user": 30, "genre": 6})
    np.testing.assert_array_equal(counts["user"], runs["counts"]["user"])
    np.testing.assert_array_equal(counts["genre"], runs["counts"]["genre"])
    with pytest.raises(ReportError, match="outside the table's"):
        train_frequencies(data, Schema.load(data), {"user": 20})


# ---------------------------------------------------------------------------------------------------
# reports


def test_search_report_files_and_numbers(runs: dict, search_report: dict) -> None:
    out = runs["search"] / "report"
    assert search_report["out"] == str(out)
    assert set(search_report["plots"]) == set(report.PLOT_FILES)
    for path in search_report["plots"].values():
        assert_png(path)
    md = (out / "report.md").read_text()
    for name in report.PLOT_FILES.values():
        assert f"]({name})" in md  # embedded with a relative link
    kept_a, kept_b = runs["kept"]
    for text in (
        "| search |",
        "0.6876",
        "0.6543",
        f"{kept_a:,}",
        f"{kept_b:,}",
        "| 0.5 |",
        "| 0.25 |",
        "`t_user`",
        "`t_genre`",
        "Spearman",
        "| yes |",
    ):
        assert text in md, text
    # only the two complete masks, largest budget first; the interrupted one is named in the notes
    assert [m["budget"] for m in search_report["masks"]] == [0.5, 0.25]
    assert "budget_0.1.tmp" in md
    a = search_report["masks"][0]
    assert a["kept"] == kept_a and a["rows"] == 36
    assert a["pruned_rows"] == int((runs["rising"]["user"] == 0).sum())
    assert a["tables"]["t_genre"]["kept"] == 6 * 2
    assert not list(out.parent.glob(".report.*"))  # no temporary directories left behind
    # Hand-built: no checkpoints, so no search diagnostics, and the notes say why.
    assert search_report["search_diagnostics"] is None and "## What the search learned" not in md
    assert "search diagnostics, budget 0.5: checkpoint step_00000040 missing" in md
    assert not (out / "search_diagnostics.json").exists()


def test_search_diagnostics_size_histograms() -> None:
    from pep_torchrec.pep.diagnostics import SIZE_LABELS, size_report

    sizes = {"t_user": np.array([0, 0, 1, 2, 3, 5, 7, 8, 15, 16, 32, 3]), "t_genre": np.array([4, 4, 4, 4])}
    freq = {"user": np.arange(12), "genre": np.array([3, 1, 2, 0])}
    got = size_report(sizes, freq)
    assert SIZE_LABELS == ("0", "1", "2", "3", "4-7", "8-15", "16+")
    assert got["tables"]["t_user"]["hist"] == pytest.approx(
        [2 / 12, 1 / 12, 1 / 12, 2 / 12, 2 / 12, 2 / 12, 2 / 12]
    )
    assert got["hist"] == pytest.approx([2 / 16, 1 / 16, 1 / 16, 2 / 16, 6 / 16, 2 / 16, 2 / 16])
    # t_user: sizes 0 and 3 hold 2 of 12 rows (>= 10 %), the others 1 each; pooled: 4 holds 4 of 16, 0 and 3 2 of 16.
    assert got["tables"]["t_user"]["major_sizes"] == 2 and got["major_sizes"] == 3
    assert got["tables"]["t_genre"]["major_sizes"] == 1 and math.isnan(
        got["tables"]["t_genre"]["spearman_freq_size"]
    )
    assert got["tables"]["t_user"]["spearman_freq_size"] == pytest.approx(
        spearman(np.arange(12), sizes["t_user"])
    )
    assert got["spearman_freq_size"] == pytest.approx(
        spearman(np.r_[np.arange(12), [3, 1, 2, 0]], np.r_[sizes["t_user"], sizes["t_genre"]])
    )
    assert size_report(sizes, None)["spearman_freq_size"] is None


def test_planted_frequency_size_correlation_sign(search_report: dict) -> None:
    rising, falling = search_report["masks"]
    # Sizes are a non-decreasing function of the frequency; ties among the sizes keep rho just below 1.
    assert rising["tables"]["t_user"]["spearman"] > 0.99
    assert rising["spearman"] > 0.3 and rising["spearman_within_tables"] > 0.3
    assert falling["tables"]["t_user"]["spearman"] < -0.99
    assert falling["spearman"] < 0
    assert math.isnan(rising["tables"]["t_genre"]["spearman"])  # constant sizes: undefined, not 0


def test_baseline_report_has_auc_only_and_is_replaced_atomically(runs: dict, tmp_path: Path) -> None:
    out = tmp_path / "rep"
    first = make_report(runs["baseline"], out)
    assert list(first["plots"]) == ["kept_and_auc"] and first["masks"] == []
    assert_png(first["plots"]["kept_and_auc"])
    md = (out / "report.md").read_text()
    assert "| baseline |" in md and "0.6876" in md and "Snapshots" not in md
    (out / "stale.png").write_bytes(b"old")
    make_report(runs["baseline"], out)  # an earlier report is replaced as a whole
    assert not (out / "stale.png").exists() and (out / "report.md").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


def test_retrain_report_uses_its_mask(runs: dict, tmp_path: Path) -> None:
    result = make_report(runs["retrain"], tmp_path / "rep")
    assert set(result["plots"]) == set(report.PLOT_FILES)
    assert [m["label"] for m in result["masks"]] == ["budget 0.5"]
    assert result["masks"][0]["tables"]["t_user"]["spearman"] > 0.99
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| retrain |" in md and "budget_0.5" in md


def test_missing_dataset_is_a_note_and_data_overrides(runs: dict, tmp_path: Path) -> None:
    run = write_run(
        tmp_path / "moved",
        "retrain",
        "no/such/dataset",
        extra_summary={"mask": str(runs["search"] / "masks" / "budget_0.5")},
    )
    result = make_report(run)
    assert "size_vs_frequency" not in result["plots"] and "embedding_sizes" in result["plots"]
    assert result["masks"][0]["spearman"] is None
    assert "no/such/dataset" in (run / "report" / "report.md").read_text()
    found = find_dataset(report.load_run(run), runs["root"] / "prepared_tiny", [])
    assert found is not None and found[1].feature_names == ["user", "genre"]
    with pytest.raises(ReportError, match="not a prepared dataset"):
        make_report(run, data=tmp_path)


# ---------------------------------------------------------------------------------------------------
# errors and the command line


def test_missing_run_dir_and_metrics_are_clear_errors(runs: dict, tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="run directory not found"):
        make_report(tmp_path / "nope")
    run = write_run(tmp_path / "r", "baseline", "prepared_tiny")
    (run / "metrics.jsonl").unlink()
    with pytest.raises(ReportError, match=r"metrics\.jsonl: missing"):
        make_report(run)
    (run / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ReportError, match=r"metrics\.jsonl:2: invalid JSON"):
        make_report(run)
    assert not (run / "report").exists()


def test_refuses_to_replace_a_directory_that_is_not_a_report(runs: dict, tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ReportError, match="not an earlier report"):
        make_report(runs["baseline"], tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_cli_exit_codes(runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report_command.main(["--run-dir", str(runs["baseline"]), "--out", str(tmp_path / "rep")]) == 0
    assert "report.md" in capsys.readouterr().out
    assert report_command.main(["--run-dir", str(tmp_path / "missing")]) == 2
    assert "run directory not found" in capsys.readouterr().err
