"""Exact-budget selection (one rank and two ranks agree), k-th largest, atomic array directories."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dist_utils import run_on_ranks

from pep_torchrec.pruning import budget_count, kth_largest, read_meta, select_top_k, write_arrays

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
    pieces = {"t_a": [(0, 0, full["t_a"])], "t_b": [(0, 0, full["t_b"][:10])]} if rank == 0 else \
        {"t_b": [(10, 0, full["t_b"][10:])]}
    keep = select_top_k(pieces, k, ORDER)
    return {t: [(r, c, m.numpy()) for r, c, m in blocks] for t, blocks in keep.items()}


def test_two_ranks_select_the_same_elements_as_one():
    full = scores()
    k = sum(int((t > 0.25).sum()) for t in full.values()) + 17
    single = select_top_k({t: [(0, 0, s)] for t, s in full.items()}, k, ORDER)
    results = run_on_ranks(_two_rank_select, 2, k)
    for t in ORDER:
        assembled = np.zeros(tuple(full[t].shape), dtype=bool)
        for result in results:
            for r, c, m in result.get(t, []):
                assembled[r : r + m.shape[0], c : c + m.shape[1]] = m
        np.testing.assert_array_equal(assembled, single[t][0][2].numpy(), err_msg=t)


def test_write_arrays_is_atomic_and_complete(tmp_path):
    out = tmp_path / "masks" / "budget_0.1"
    pieces = {"t_a": [(0, 0, torch.ones(2, 3, dtype=torch.bool))], "t_b": [(1, 1, torch.ones(1, 2, dtype=torch.bool))]}
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
