"""The control masks of `pep-torchrec prune` (uniform-k, frequency sizes, random elements at given
sizes) and its warnings: exact budgets, each row's count as specified, determinism per seed, frequency
sizes monotone in frequency, bad input as one error line naming the flag."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pep_torchrec import cli
from pep_torchrec.pep.masks import (
    floor_clip_note,
    frequency_sizes,
    interaction_warning,
    random_columns_mask,
    uniform_sizes,
    write_arrays,
)
from tests.helpers.data import write_dataset

D = 8
ROWS = {"t_user": 30, "t_genre": 6}  # the tables of test_report's tiny dataset (user id i occurs i times)

# ---------------------------------------------------------------------------------------------------
# the size rules


@pytest.mark.parametrize("count", [0, 1, 35, 36, 37, 100, 287, 288])
def test_uniform_sizes_are_k_or_k_plus_one_and_exact(count):
    sizes = uniform_sizes(ROWS, count, D, seed=3)
    all_N = np.concatenate(list(sizes.values()))
    k = count // 36
    assert all_N.sum() == count and set(np.unique(all_N)) <= {k, k + 1}
    assert (all_N == k + 1).sum() == count - 36 * k
    assert [s.size for s in sizes.values()] == list(ROWS.values())


def test_uniform_sizes_depend_on_the_seed_only():
    a, b, c = (uniform_sizes(ROWS, 50, D, seed=s) for s in (0, 0, 1))
    assert all(np.array_equal(a[t], b[t]) for t in ROWS)
    assert not all(np.array_equal(a[t], c[t]) for t in ROWS)  # 14 of 36 rows: another seed, another draw
    with pytest.raises(ValueError, match="outside"):
        uniform_sizes(ROWS, 36 * D + 1, D, seed=0)


def _reference_frequency_sizes(freq: dict[str, np.ndarray], count: int) -> np.ndarray:
    """The research's definition, element by element: score log(1+f)/(j+1), the `count` best kept."""
    f_N = np.concatenate(list(freq.values())).astype(np.float64)
    score = (np.log1p(f_N)[:, None] / np.arange(1, D + 1)[None, :]).ravel()
    keep = np.zeros(score.size, bool)
    keep[np.argsort(-score, kind="stable")[:count]] = True
    return keep.reshape(-1, D).sum(1)


@pytest.mark.parametrize("count", [1, 17, 60, 150, 200])
def test_frequency_sizes_are_exact_and_match_the_elementwise_definition(count):
    rng = np.random.default_rng(0)
    freq = {"t_a": rng.integers(1, 500, 40), "t_b": rng.integers(1, 50, 25)}  # no zero: no ties at 0
    sizes = frequency_sizes(freq, count, D)
    all_N = np.concatenate(list(sizes.values()))
    assert all_N.sum() == count
    np.testing.assert_array_equal(all_N, _reference_frequency_sizes(freq, count))


@pytest.mark.parametrize("count", [0, 5, 64, 123, 301, 520])
def test_frequency_sizes_are_monotone_in_frequency_with_ties_and_unseen_ids(count):
    rng = np.random.default_rng(1)
    freq = {"t_a": rng.integers(0, 6, 50), "t_b": np.repeat([0, 3, 7], 5)}  # many equal frequencies, zeros
    sizes = frequency_sizes(freq, count, D)
    f_N = np.concatenate(list(freq.values()))
    s_N = np.concatenate(list(sizes.values()))
    assert s_N.sum() == count and s_N.max(initial=0) <= D
    order = np.argsort(f_N, kind="stable")
    for lo, hi in zip(order[:-1], order[1:]):  # a more frequent id never keeps fewer dimensions
        if f_N[hi] > f_N[lo]:
            assert s_N[hi] >= s_N[lo]
    for f in np.unique(f_N):  # ids seen equally often differ by at most the one tie dimension
        assert np.ptp(s_N[f_N == f]) <= 1
    if count and count < (f_N > 0).sum():
        assert s_N[f_N == 0].sum() == 0  # unseen ids get nothing while seen ones lack their first dim


def test_random_columns_keep_each_rows_count_at_seeded_columns():
    sizes = np.array([0, 1, 3, 8, 5, 5, 2])
    a = random_columns_mask(sizes, D, np.random.default_rng(4))
    b = random_columns_mask(sizes, D, np.random.default_rng(4))
    c = random_columns_mask(sizes, D, np.random.default_rng(5))
    np.testing.assert_array_equal(a.sum(1), sizes)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_interaction_and_floor_messages():
    assert interaction_warning({"t_a": 10, "t_b": 1}) is None
    assert "every kept element is in table t_b" in interaction_warning({"t_a": 0, "t_b": 7, "t_c": 0})
    assert "no feature interactions" in interaction_warning({"t_a": 0, "t_b": 0})
    assert interaction_warning({"t_a": 5}) is None  # a one-table model: nothing the mask took away
    assert floor_clip_note(3, 3, 1000, 100) is None
    note = floor_clip_note(3, 2, 250, 100)
    assert note is not None and "3 dims per row requested, 2 applied" in note
    assert "250 elements over 100 rows afford 2 each" in note


# ---------------------------------------------------------------------------------------------------
# the command line, on a hand-built search run over test_report's tiny dataset


@pytest.fixture(scope="module")
def search_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("controls")
    counts = write_dataset(root / "data")
    run = root / "search"
    run.mkdir()
    (run / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "data": {"path": str(root / "data")},
                "model": {"name": "fm", "embedding_dim": D},
                "train": {"stage": "search"},
            }
        )
    )
    g = torch.Generator().manual_seed(0)
    write_arrays(
        run / "init",
        {t: (n, D) for t, n in ROWS.items()},
        np.float32,
        {t: [(0, 0, torch.randn(n, D, generator=g))] for t, n in ROWS.items()},
        {"kind": "init", "dim": D, "tables": {t: {"rows": n} for t, n in ROWS.items()}},
        rank=0,
    )
    return {"root": root, "run": run, "counts": counts}


def _prune(*argv: str) -> int:
    return cli.main(["prune", *map(str, argv)])


def _masks(directory: Path) -> tuple[dict, dict[str, np.ndarray]]:
    meta = json.loads((directory / "meta.json").read_text())
    return meta, {t: np.load(directory / f"{t}.npy") for t in meta["tables"]}


@pytest.mark.parametrize("method", ["uniform", "frequency"])
def test_size_controls_write_exact_aligned_lottery_tickets(tmp_path, search_run, method):
    run = search_run["run"]
    assert _prune("--method", method, "--run-dir", run, "--budgets", "0.3,0.05", "--out", tmp_path / "a") == 0
    for budget, count in ((0.3, round(0.3 * 36 * D)), (0.05, round(0.05 * 36 * D))):
        meta, masks = _masks(tmp_path / "a" / "masks" / f"budget_{budget:g}")
        assert meta["kind"] == "mask" and meta["criterion"] == method and meta["kept"] == count
        assert Path(meta["init"]) == (run / "init").resolve() and "warm_start" not in meta
        assert sum(int(m.sum()) for m in masks.values()) == count
        for m in masks.values():  # aligned: each row's first columns
            np.testing.assert_array_equal(m, np.arange(D)[None, :] < m.sum(1, keepdims=True))
        sizes = np.concatenate([masks["t_user"].sum(1), masks["t_genre"].sum(1)])
        if method == "uniform":
            assert set(np.unique(sizes)) <= {count // 36, count // 36 + 1}
        else:
            f_N = np.concatenate([search_run["counts"]["user"], search_run["counts"]["genre"]])
            np.testing.assert_array_equal(
                sizes,
                np.concatenate(
                    list(
                        frequency_sizes(
                            {
                                "t_user": search_run["counts"]["user"],
                                "t_genre": search_run["counts"]["genre"],
                            },
                            count,
                            D,
                        ).values()
                    )
                ),
            )
            assert sizes[f_N.argmax()] == sizes.max() and sizes[f_N == 0].sum() == 0
    # Deterministic per seed: the same seed rewrites the same masks; uniform's extra columns move with it.
    assert _prune("--method", method, "--run-dir", run, "--budgets", "0.3", "--out", tmp_path / "b") == 0
    assert (
        _prune(
            "--method",
            method,
            "--run-dir",
            run,
            "--budgets",
            "0.3",
            "--out",
            tmp_path / "c",
            *(["--seed", "7"] if method == "uniform" else []),
        )
        == 0
    )
    _, a = _masks(tmp_path / "a" / "masks" / "budget_0.3")
    _, b = _masks(tmp_path / "b" / "masks" / "budget_0.3")
    _, c = _masks(tmp_path / "c" / "masks" / "budget_0.3")
    assert all(np.array_equal(a[t], b[t]) for t in ROWS)
    assert all(np.array_equal(a[t], c[t]) for t in ROWS) == (method == "frequency")


def test_random_elements_keep_the_source_row_sizes(tmp_path, search_run):
    run = search_run["run"]
    assert (
        _prune("--method", "frequency", "--run-dir", run, "--budgets", "0.3,0.1", "--out", tmp_path / "f")
        == 0
    )
    source = tmp_path / "f" / "masks"
    assert (
        _prune("--method", "random-elements", "--sizes-from", source, "--out", tmp_path / "r", "--seed", "1")
        == 0
    )
    assert (
        _prune(
            "--method",
            "random-elements",
            "--sizes-from",
            source / "budget_0.1",
            "--out",
            tmp_path / "r2",
            "--seed",
            "1",
        )
        == 0
    )
    for budget in (0.3, 0.1):
        src_meta, src = _masks(source / f"budget_{budget:g}")
        meta, masks = _masks(tmp_path / "r" / "masks" / f"budget_{budget:g}")
        assert meta["criterion"] == "random_elements" and meta["kept"] == src_meta["kept"]
        assert meta["init"] == str((run / "init").resolve()) and meta["sizes_from_criterion"] == "frequency"
        for t in ROWS:
            np.testing.assert_array_equal(masks[t].sum(1), src[t].sum(1))
        assert not all(np.array_equal(masks[t], src[t]) for t in ROWS)  # columns are no longer the first ones
    _, one = _masks(tmp_path / "r2" / "masks" / "budget_0.1")
    _, all_ = _masks(tmp_path / "r" / "masks" / "budget_0.1")
    assert all(np.array_equal(one[t], all_[t]) for t in ROWS)  # same seed, same draw


def test_a_mask_without_interactions_is_a_warning(tmp_path, search_run, caplog):
    source = tmp_path / "one_table"
    sizes = {"t_user": np.full(30, 2), "t_genre": np.zeros(6, np.int64)}
    write_arrays(
        source,
        {t: (n, D) for t, n in ROWS.items()},
        np.bool_,
        {t: [(0, 0, torch.from_numpy(np.arange(D)[None, :] < sizes[t][:, None]))] for t in ROWS},
        {
            "kind": "mask",
            "criterion": "magnitude",
            "budget": 0.2,
            "kept": 60,
            "dim": D,
            "init": str(search_run["run"] / "init"),
            "tables": {t: {"rows": n} for t, n in ROWS.items()},
        },
        rank=0,
    )
    with caplog.at_level(logging.WARNING, logger="pep_torchrec.pep.controls"):
        assert _prune("--method", "random-elements", "--sizes-from", source, "--out", tmp_path / "r") == 0
    assert any("budget 0.2: every kept element is in table t_user" in r.getMessage() for r in caplog.records)
    meta, _ = _masks(tmp_path / "r" / "masks" / "budget_0.2")
    assert len(meta["warnings"]) == 1 and "no feature interactions" in meta["warnings"][0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pep_torchrec.pep.controls"):  # both tables kept: no warning
        assert (
            _prune(
                "--method",
                "uniform",
                "--run-dir",
                search_run["run"],
                "--budgets",
                "0.1",
                "--out",
                tmp_path / "u",
            )
            == 0
        )
    assert not caplog.records and _masks(tmp_path / "u" / "masks" / "budget_0.1")[0]["warnings"] == []


def _bad(tmp_path: Path, search_run: dict, case: str) -> tuple[list[str], str]:
    run, root = search_run["run"], search_run["root"]
    cases = {
        "no sizes": (["--method", "random-elements"], "--sizes-from: --method random-elements needs"),
        "missing sizes": (
            ["--method", "random-elements", "--sizes-from", tmp_path / "nope"],
            f"--sizes-from {tmp_path / 'nope'}: no such directory",
        ),
        "budget absent": (
            ["--method", "random-elements", "--sizes-from", run, "--budgets", "0.1"],
            "--budgets: ",
        ),
        "no run": (["--method", "uniform"], "--run-dir: --method uniform needs a run directory"),
        "not a search": (["--method", "frequency", "--run-dir", root / "data"], "--run-dir "),
        "no data": (["--method", "frequency", "--run-dir", run, "--data", root], "--data "),
        "layout": (
            ["--method", "uniform", "--run-dir", run, "--layout", "aligned"],
            "--layout: not an option",
        ),
        "data elsewhere": (
            ["--method", "uniform", "--run-dir", run, "--data", root / "data"],
            "--data: not an option",
        ),
        "seed": (["--method", "uniform", "--run-dir", run, "--seed", "-1"], "--seed -1: must be >= 0"),
        "seed elsewhere": (
            ["--method", "frequency", "--run-dir", run, "--seed", "1"],
            "--seed: not an option",
        ),
        "budget": (
            ["--method", "uniform", "--run-dir", run, "--budgets", "0.1,2"],
            "--budgets: 2 is not a share",
        ),
    }
    argv, message = cases[case]
    return [str(a) for a in argv], message


@pytest.mark.parametrize(
    "case",
    [
        "no sizes",
        "missing sizes",
        "budget absent",
        "no run",
        "not a search",
        "no data",
        "layout",
        "data elsewhere",
        "seed",
        "seed elsewhere",
        "budget",
    ],
)
def test_bad_control_input_is_one_error_line_naming_the_flag(tmp_path, capsys, search_run, case):
    argv, message = _bad(tmp_path, search_run, case)
    assert cli.main(["prune", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err and err.count("\n") == 1, (
        err
    )
    assert not (tmp_path / "out").exists()
