"""Exact-budget selection (one rank and two ranks agree), row rules (floor, cap, aligned layout), k-th
largest, atomic array directories."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pep_torchrec.pep.masks import (
    budget_count,
    kth_largest,
    select_mask,
    select_top_k,
    write_arrays,
)
from pep_torchrec.training.run_dir import read_meta
from tests.helpers.dist import run_on_ranks

ORDER = ["t_a", "t_b"]


def scores() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(30, 4, generator=g)
    b = torch.randn(20, 4, generator=g)
    a[5:9] = 0.25  # a block of ties that straddles the budget
    b[0:3] = 0.25
    return {"t_a": a, "t_b": b}


def test_top_k_is_exact_and_ties_go_to_table_row_column_order():
    full = scores()
    above = sum(int((t > 0.25).sum()) for t in full.values())
    k = above + 5  # five of the 28 tied elements
    keep = select_top_k({t: [(0, 0, s)] for t, s in full.items()}, k, ORDER)
    assert sum(int(keep[t][0][2].sum()) for t in ORDER) == k
    ties_kept = keep["t_a"][0][2] & (full["t_a"] == 0.25)
    assert ties_kept.sum() == 5 and ties_kept[5, :].all() and ties_kept[6, 0]  # row-major in t_a first
    assert not (keep["t_b"][0][2] & (full["t_b"] == 0.25)).any()
    for t in ORDER:  # everything strictly above the k-th value is kept, nothing below
        assert keep[t][0][2][full[t] > 0.25].all() and not keep[t][0][2][full[t] < 0.25].any()


@pytest.mark.parametrize("k", [0, 1, 37, 200])
def test_kth_largest_and_edge_budgets(k):
    full = scores()
    flat = torch.cat([s.flatten() for s in full.values()]).sort(descending=True).values
    pieces = {t: [(0, 0, s)] for t, s in full.items()}
    if k:
        assert kth_largest(pieces, k) == flat[k - 1].item()
    keep = select_top_k(pieces, k, ORDER)
    assert sum(int(keep[t][0][2].sum()) for t in ORDER) == k
    with pytest.raises(ValueError):
        select_top_k(pieces, 201, ORDER)


def _two_rank_select(rank: int, world_size: int, k: int) -> dict:
    # Rank 0 holds t_a and the top half of t_b's rows, rank 1 the rest: a row-wise split.
    full = scores()
    pieces = (
        {"t_a": [(0, 0, full["t_a"])], "t_b": [(0, 0, full["t_b"][:10])]}
        if rank == 0
        else {"t_b": [(10, 0, full["t_b"][10:])]}
    )
    keep = select_top_k(pieces, k, ORDER)
    return {t: [(r, c, m.numpy()) for r, c, m in blocks] for t, blocks in keep.items()}


def _assert_ranks_assemble_to(results: list[dict], single: dict, full: dict[str, torch.Tensor]) -> None:
    """Every rank's (row, col, mask) blocks, put together, equal the single-rank mask of each table."""
    for t in ORDER:
        assembled = np.zeros(tuple(full[t].shape), dtype=bool)
        for result in results:
            for r, c, m in result.get(t, []):
                assembled[r : r + m.shape[0], c : c + m.shape[1]] = m
        np.testing.assert_array_equal(assembled, single[t][0][2].numpy(), err_msg=t)


def test_two_ranks_select_the_same_elements_as_one():
    full = scores()
    k = sum(int((t > 0.25).sum()) for t in full.values()) + 17
    single = select_top_k({t: [(0, 0, s)] for t, s in full.items()}, k, ORDER)
    results = run_on_ranks(_two_rank_select, 2, k)
    _assert_ranks_assemble_to(results, single, full)


def _rules_scores() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    # Frequent rows (large scores) and rare rows (small ones), as trained embeddings look.
    return {
        "t_a": torch.randn(30, 8, generator=g) * torch.logspace(0, -2, 30)[:, None],
        "t_b": torch.randn(20, 8, generator=g).abs() * 0.05,
    }


@pytest.mark.parametrize("min_row,max_row", [(0, 0), (2, 0), (0, 5), (1, 4)])
def test_row_rules_keep_exactly_k_within_floor_and_cap(min_row, max_row):
    full = _rules_scores()
    k = 150
    keep = select_mask(
        {t: [(0, 0, s)] for t, s in full.items()}, k, ORDER, dim=8, min_row=min_row, max_row=max_row
    )
    per_row = torch.cat([keep[t][0][2].sum(1) for t in ORDER])
    assert int(per_row.sum()) == k
    assert per_row.min() >= min_row and per_row.max() <= (max_row or 8)
    plain = select_top_k({t: [(0, 0, s)] for t, s in full.items()}, k, ORDER)
    plain_rows = torch.cat([plain[t][0][2].sum(1) for t in ORDER])
    if min_row:  # the floor moves budget to rows the plain ranking leaves (nearly) empty
        assert plain_rows.min() < min_row
    for t in ORDER:  # within a row, the kept elements are its best ones
        m, s = keep[t][0][2], full[t]
        worst_kept = torch.where(m, s, torch.full_like(s, float("inf"))).min(1).values
        best_dropped = torch.where(m, torch.full_like(s, float("-inf")), s).max(1).values
        assert (worst_kept >= best_dropped).all()


def test_aligned_layout_keeps_row_sizes_in_one_shared_column_order():
    full = _rules_scores()
    pieces = {t: [(0, 0, s)] for t, s in full.items()}
    element = select_mask(pieces, 120, ORDER, dim=8, min_row=1)
    aligned = select_mask(pieces, 120, ORDER, dim=8, min_row=1, layout="aligned")
    rows_e = torch.cat([element[t][0][2] for t in ORDER])
    rows_a = torch.cat([aligned[t][0][2] for t in ORDER])
    assert torch.equal(rows_e.sum(1), rows_a.sum(1))  # each row's learned size is unchanged
    order = torch.sort(rows_e.sum(0), descending=True, stable=True).indices
    for row, k in zip(rows_a, rows_a.sum(1).tolist()):  # and its kept columns are a prefix of the order
        assert row[order[:k]].all() and not row[order[k:]].any()
    with pytest.raises(ValueError, match="layout"):
        select_mask(pieces, 120, ORDER, dim=8, layout="diagonal")
    with pytest.raises(ValueError, match="allow between 50 and"):
        select_mask(pieces, 40, ORDER, dim=8, min_row=1)
    with pytest.raises(ValueError, match="whole rows"):
        select_mask({"t_a": [(0, 4, full["t_a"][:, 4:])]}, 10, ORDER, dim=8, layout="aligned")


def _two_rank_rules(rank: int, world_size: int, k: int) -> dict:
    full = _rules_scores()
    pieces = (
        {"t_a": [(0, 0, full["t_a"])], "t_b": [(0, 0, full["t_b"][:10])]}
        if rank == 0
        else {"t_b": [(10, 0, full["t_b"][10:])]}
    )
    keep = select_mask(pieces, k, ORDER, dim=8, min_row=2, max_row=6, layout="aligned")
    return {t: [(r, c, m.numpy()) for r, c, m in blocks] for t, blocks in keep.items()}


def test_two_ranks_apply_row_rules_like_one():
    full = _rules_scores()
    single = select_mask(
        {t: [(0, 0, s)] for t, s in full.items()}, 170, ORDER, dim=8, min_row=2, max_row=6, layout="aligned"
    )
    results = run_on_ranks(_two_rank_rules, 2, 170)
    _assert_ranks_assemble_to(results, single, full)


def test_write_arrays_is_atomic_and_complete(tmp_path):
    out = tmp_path / "masks" / "budget_0.1"
    pieces = {
        "t_a": [(0, 0, torch.ones(2, 3, dtype=torch.bool))],
        "t_b": [(1, 1, torch.ones(1, 2, dtype=torch.bool))],
    }
    write_arrays(out, {"t_a": (2, 3), "t_b": (3, 3)}, np.bool_, pieces, {"kind": "mask", "kept": 8}, rank=0)
    assert read_meta(out)["kept"] == 8
    assert np.load(out / "t_b.npy").sum() == 2 and np.load(out / "t_b.npy")[1, 1:].all()
    assert not (tmp_path / "masks" / "budget_0.1.tmp").exists()
    with pytest.raises(FileNotFoundError, match="meta.json missing"):
        read_meta(tmp_path)


def test_budget_count():
    assert budget_count(0.1, 1000) == 100
    assert budget_count(250, 1000) == 250
    with pytest.raises(ValueError):
        budget_count(2000, 1000)
    with pytest.raises(ValueError):
        budget_count(0, 1000)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--run-dir", "/nonexistent/run"], "--run-dir /nonexistent/run: no such directory"),
        (["--run-dir", ".", "--budgets", "0.1,1.5x"], "--budgets: '1.5x' is not a number"),
        (["--run-dir", ".", "--budgets", "0.1,1.5"], "--budgets: 1.5 is not a share"),
    ],
)
def test_prune_user_mistakes_are_one_error_line(tmp_path, capsys, argv, message):
    from pep_torchrec import cli

    assert cli.main(["prune", *argv, "--out", str(tmp_path / "masks")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert not (tmp_path / "masks").exists()
