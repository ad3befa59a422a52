"""Exact-budget masks and per-table arrays, computed and written from sharded tables.

A *mask directory* (what the search saves per budget and what retrain loads)::

    masks/budget_0.1/meta.json          written last: its presence means the directory is complete
    masks/budget_0.1/<table>.npy        bool [num_embeddings, D], True = kept

`meta.json` names the budget, the kept count (== the budget, exactly), the step, the criterion
(PEP margin or |v|), and `init`: the directory of the embedding values a retrain starts from (the
search's step-0 embedding for a lottery ticket; the trained weights for magnitude pruning), whose
`<table>.npy` are float32 [num_embeddings, D].

Every rank holds only its shards, so arrays are written through memory-mapped .npy files: rank 0
creates them, each rank writes its own row/column blocks, rank 0 writes meta.json and renames the
directory into place. Reading slices with mmap means a rank never loads a whole table.

Exactness: a budget of k keeps the k largest scores (margin |v| − gk·sigmoid(s), or |v|) over all
tables; ties at the k-th value are broken by (table order, row, column), so the mask does not depend
on the world size or the sharding plan.

Row rules (`select_mask`): a floor and a cap on the kept elements of every row (the floor's elements
are each row's best ones; the rest of the budget goes to the best scores left), and the *aligned*
layout, which keeps each row's kept count (its learned embedding size) but puts those elements in one
column order shared by every row. Dot-product models (FM, DeepFM, AutoInt) only couple two features
through the dimensions both keep: element-wise masks of k1 and k2 dimensions share ~k1·k2/D of them,
aligned ones share min(k1, k2).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pep_torchrec.utils.atomic import replace_dir

# Piece = (row offset, column offset, [R, C] tensor) of one table on this rank.
Piece = tuple[int, int, torch.Tensor]

_MAX_TIES = 5_000_000


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if _world() > 1:
        dist.all_reduce(values)
    return values


def _barrier() -> None:
    if _world() > 1:
        dist.barrier()


def _ordered_keys(x: torch.Tensor) -> torch.Tensor:
    """float32 → int64 keys with the same order (NaN excluded by the caller)."""
    bits = x.detach().contiguous().float().view(torch.int32).to(torch.int64)
    # Negative floats: flip the magnitude bits so that a larger magnitude sorts lower.
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _from_keys(key: int) -> float:
    """Inverse of `_ordered_keys` for one key."""
    bits = key ^ 0x7FFFFFFF if key < 0 else key
    return float(torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32).item())


def _kth_largest_key(local: torch.Tensor, k: int) -> int:
    """The k-th largest key over all ranks (1 <= k <= total): bisection on the key range, one
    all-reduced count per step (32 steps for float32 keys), so no rank ever holds more than its own."""
    bounds = torch.tensor(
        [
            local.min().item() if local.numel() else 2**62,
            -(local.max().item() if local.numel() else -(2**62)),
        ],
        dtype=torch.int64,
    )
    if _world() > 1:
        dist.all_reduce(bounds, op=dist.ReduceOp.MIN)
    lo, hi = int(bounds[0]), -int(bounds[1])  # count(key >= lo) = total >= k; the answer is in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        count = int(_all_reduce_sum(torch.tensor([(local >= mid).sum().item()], dtype=torch.int64)).item())
        if count >= k:
            lo = mid
        else:
            hi = mid - 1
    return lo


def kth_largest(pieces: Mapping[str, Sequence[Piece]], k: int) -> float:
    """The k-th largest value over every table's pieces on all ranks (NaN-free float32 scores)."""
    flat = [_ordered_keys(s).flatten() for blocks in pieces.values() for _, _, s in blocks]
    local = torch.cat(flat) if flat else torch.zeros(0, dtype=torch.int64)
    total = int(_all_reduce_sum(torch.tensor([local.numel()], dtype=torch.int64)).item())
    if not 1 <= k <= total:
        raise ValueError(f"k={k} is outside [1, {total}]")
    return _from_keys(_kth_largest_key(local, k))


def select_top_k(
    pieces: Mapping[str, Sequence[Piece]], k: int, table_order: Sequence[str]
) -> dict[str, list[Piece]]:
    """Keep exactly the `k` largest scores over every table (all ranks together).

    Args:
        pieces: table → this rank's (row offset, col offset, [R, C] float scores).
        k: elements to keep in total, 0 <= k <= total elements over all ranks.
        table_order: every table name in one global order (the tie-break's first key).
    Returns:
        table → this rank's (row offset, col offset, [R, C] bool keep) for the same pieces.
    """
    keys = {t: [(r, c, _ordered_keys(s)) for r, c, s in pieces.get(t, [])] for t in table_order}
    flat = [kk.flatten() for t in table_order for _, _, kk in keys[t]]
    local = torch.cat(flat) if flat else torch.zeros(0, dtype=torch.int64)
    total = int(_all_reduce_sum(torch.tensor([local.numel()], dtype=torch.int64)).item())
    if not 0 <= k <= total:
        raise ValueError(f"budget {k} is outside [0, {total}] elements")
    if k == 0:
        return {
            t: [(r, c, torch.zeros_like(kk, dtype=torch.bool)) for r, c, kk in keys[t]] for t in table_order
        }

    tau = _kth_largest_key(local, k)
    above = int(_all_reduce_sum(torch.tensor([(local > tau).sum().item()], dtype=torch.int64)).item())
    need = k - above  # how many of the ties at tau to keep

    # Ties: gather their global positions (table index, row, column), keep the first `need`.
    local_ties = []
    for ti, t in enumerate(table_order):
        for r, c, kk in keys[t]:
            rows, cols = torch.nonzero(kk == tau, as_tuple=True)
            if rows.numel():
                local_ties.append(torch.stack([torch.full_like(rows, ti), rows + r, cols + c], dim=1))
    mine = torch.cat(local_ties) if local_ties else torch.zeros(0, 3, dtype=torch.int64)
    if mine.shape[0] > _MAX_TIES:
        raise RuntimeError(f"{mine.shape[0]} elements tie at the budget's threshold; refusing to rank them")
    if _world() > 1:
        gathered: list[Any] = [None] * _world()
        dist.all_gather_object(gathered, mine.numpy())
        everyone = torch.from_numpy(
            np.concatenate([g for g in gathered if len(g)] or [np.zeros((0, 3), np.int64)])
        )
    else:
        everyone = mine
    order = np.lexsort((everyone[:, 2].numpy(), everyone[:, 1].numpy(), everyone[:, 0].numpy()))
    chosen = {tuple(x) for x in everyone[order[:need]].tolist()}

    out: dict[str, list[Piece]] = {}
    for ti, t in enumerate(table_order):
        out[t] = []
        for r, c, kk in keys[t]:
            keep = kk > tau
            if need:
                rows, cols = torch.nonzero(kk == tau, as_tuple=True)
                for i, j in zip(rows.tolist(), cols.tolist()):
                    if (ti, i + r, j + c) in chosen:
                        keep[i, j] = True
            out[t].append((r, c, keep))
    return out


MASK_LAYOUTS = ("elementwise", "aligned")


def top_per_row(scores: torch.Tensor, n: int | torch.Tensor) -> torch.Tensor:
    """bool [R, C]: each row's `n` (or `n[r]`) largest scores (ties: lower column first)."""
    if isinstance(n, int) and (n <= 0 or n >= scores.shape[1]):  # none or all: no sort needed
        return torch.full(scores.shape, n > 0, dtype=torch.bool, device=scores.device)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(scores.shape[1]).expand_as(order).contiguous()
    )
    return rank < (n.unsqueeze(1) if isinstance(n, torch.Tensor) else n)


def affordable_floor(min_row_dims: int, count: int, rows: int) -> int:
    """The per-row floor a budget of `count` elements over `rows` rows can give: min(floor, count // rows)."""
    return min(min_row_dims, count // rows)


def align_rows(keep: Mapping[str, Sequence[Piece]], dim: int) -> dict[str, list[Piece]]:
    """Same kept count per row, placed in one column order shared by all rows and ranks: the
    columns kept most often overall first (ties: lower column first)."""
    per_column = torch.zeros(dim, dtype=torch.int64)
    for blocks in keep.values():
        for _, _, m in blocks:
            per_column += m.sum(0, dtype=torch.int64)
    order = torch.sort(_all_reduce_sum(per_column), descending=True, stable=True).indices
    rank = torch.empty(dim, dtype=torch.int64)
    rank[order] = torch.arange(dim)
    return {
        t: [(r, c, rank[None, :] < m.sum(1, keepdim=True)) for r, c, m in blocks]
        for t, blocks in keep.items()
    }


def check_row_rules(min_row: int, max_row: int, dim: int) -> None:
    """ValueError unless 0 <= min_row <= max_row (0 = D) <= D."""
    if not 0 <= min_row <= dim or not 0 <= max_row <= dim or (max_row and max_row < min_row):
        raise ValueError(
            f"row rules: need 0 <= min_row ({min_row}) <= max_row ({max_row} or 0 = {dim}) <= {dim}"
        )


def select_mask(
    pieces: Mapping[str, Sequence[Piece]],
    k: int,
    table_order: Sequence[str],
    *,
    dim: int,
    min_row: int = 0,
    max_row: int = 0,
    layout: str = "elementwise",
) -> dict[str, list[Piece]]:
    """`select_top_k` under row rules: every row keeps at least `min_row` (its best) and at most
    `max_row` (0 = D) elements, and the layout is element-wise or aligned (see the module doc).
    Exactly `k` elements are kept; the rules need whole rows on each shard.

    Raises:
        ValueError: k outside what the rules allow, a column-split table, an unknown layout.
    """
    if layout not in MASK_LAYOUTS:
        raise ValueError(f"mask layout {layout!r}: expected one of {MASK_LAYOUTS}")
    if not (min_row or max_row or layout != "elementwise"):
        return select_top_k(pieces, k, table_order)
    check_row_rules(min_row, max_row, dim)
    for t in table_order:
        for _, c, s in pieces.get(t, []):
            if c != 0 or s.shape[1] != dim:
                raise ValueError(
                    f"table {t}: row rules need whole rows on a shard (this one has columns "
                    f"[{c}, {c + s.shape[1]}) of {dim}); shard it table- or row-wise"
                )
    forced = {t: [(r, c, top_per_row(s, min_row)) for r, c, s in pieces.get(t, [])] for t in table_order}
    allowed = {
        t: [(r, c, top_per_row(s, max_row or dim)) for r, c, s in pieces.get(t, [])] for t in table_order
    }
    counts = torch.tensor(
        [
            sum(int(m.sum()) for b in forced.values() for _, _, m in b),
            sum(int(m.sum()) for b in allowed.values() for _, _, m in b),
        ],
        dtype=torch.int64,
    )
    n_forced, n_allowed = _all_reduce_sum(counts).tolist()
    if not n_forced <= k <= n_allowed:
        raise ValueError(
            f"budget {k} elements: the row rules (at least {min_row}, at most {max_row or dim} per "
            f"row) allow between {n_forced} and {n_allowed}"
        )
    rest = {
        t: [
            (r, c, torch.where(f | ~a, torch.full_like(s, float("-inf")), s))
            for (r, c, s), (_, _, f), (_, _, a) in zip(pieces.get(t, []), forced[t], allowed[t])
        ]
        for t in table_order
    }
    chosen = select_top_k(rest, k - n_forced, table_order)
    keep = {t: [(r, c, m | f) for (r, c, m), (_, _, f) in zip(chosen[t], forced[t])] for t in table_order}
    return align_rows(keep, dim) if layout == "aligned" else keep


def write_arrays(
    directory: str | os.PathLike,
    shapes: Mapping[str, tuple[int, int]],
    dtype: np.dtype,
    pieces: Mapping[str, Sequence[Piece]],
    meta: Mapping[str, Any],
    *,
    rank: int,
) -> Path:
    """Write one [rows, cols] .npy per table from every rank's pieces, then meta.json; atomic.

    Args:
        directory: final directory (replaced if it exists).
        shapes: table → full (rows, cols).
        dtype: numpy dtype of every array.
        pieces: this rank's blocks per table.
        meta: JSON-able metadata (rank 0's is written).
        rank: this process's rank.
    """
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for table, shape in shapes.items():
            np.lib.format.open_memmap(tmp / f"{table}.npy", mode="w+", dtype=dtype, shape=shape).flush()
    _barrier()
    for table, blocks in pieces.items():
        if not blocks:
            continue
        array = np.load(tmp / f"{table}.npy", mmap_mode="r+")
        for r, c, block in blocks:
            values = block.detach().cpu().numpy()
            array[r : r + values.shape[0], c : c + values.shape[1]] = values
        array.flush()
        del array
    _barrier()
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps(dict(meta), indent=2) + "\n")
        replace_dir(tmp, final)  # a reader sees the old directory or the new one, never a mix
    _barrier()
    return final


def open_array(directory: str | os.PathLike, table: str, shape: tuple[int, int]) -> np.ndarray:
    """Memory-map `<directory>/<table>.npy`, checking its shape."""
    path = Path(directory) / f"{table}.npy"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (table {table!r})")
    array = np.load(path, mmap_mode="r")
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"{path}: shape {tuple(array.shape)} does not match table {table!r} {tuple(shape)}")
    return array


def budget_count(budget: float, total: int) -> int:
    """Fractions in (0, 1] are shares of `total`; larger numbers are absolute counts."""
    if budget <= 0:
        raise ValueError(f"budget {budget} must be positive")
    count = int(round(budget * total)) if budget <= 1 else int(budget)
    if count > total:
        raise ValueError(f"budget {budget} ({count} elements) exceeds the {total} embedding parameters")
    return count


# ---------------------------------------------------------------------------------------------------
# Control masks: row sizes chosen without PEP's thresholds, whole tables in one process (numpy).
# Each returns table -> [R] int64 kept count per row (or the bool [R, D] mask) for a budget of exactly
# `count` elements; `aligned_mask` lays sizes out as each row's first columns.

MASK_METHODS = ("magnitude", "uniform", "frequency", "random-elements")


def uniform_sizes(rows: Mapping[str, int], count: int, dim: int, seed: int) -> dict[str, np.ndarray]:
    """Uniform-k: every row keeps k = count // total_rows elements; the remaining count - k·rows go one
    each to rows drawn at random without replacement (numpy's default_rng(seed), over the rows of all
    tables in table order), so the total is exactly `count`.

    Raises:
        ValueError: `count` outside [0, total_rows · dim].
    """
    total_rows = sum(rows.values())
    if not 0 <= count <= total_rows * dim:
        raise ValueError(f"budget {count} is outside [0, {total_rows * dim}] elements")
    k, extra = divmod(count, total_rows)
    plus_N = np.zeros(total_rows, np.int64)
    plus_N[np.random.default_rng(seed).choice(total_rows, size=extra, replace=False)] = 1
    out, start = {}, 0
    for table, n in rows.items():
        out[table] = k + plus_N[start : start + n]
        start += n
    return out


def frequency_sizes(frequencies: Mapping[str, np.ndarray], count: int, dim: int) -> dict[str, np.ndarray]:
    """Row sizes from train id frequency alone (no learning): element j (0-based) of a row whose id
    occurs f times scores log(1 + f) / (j + 1); the `count` best elements over all tables are kept, so a
    row's size grows with log(1 + f) and each extra dimension costs more frequency than the last.

    Deterministic: ties at the budget's score go to the more frequent row, then to (table order, row),
    and a row never keeps more than a more frequent row (sizes are monotone in frequency).

    Args:
        frequencies: table → [R] int train occurrences of each id, in table order.
        count: elements to keep, 0 <= count <= rows · dim.
        dim: D.
    Returns:
        table → [R] int64 kept count per row, summing to `count`.
    """
    freq_N = np.concatenate([np.asarray(f, np.int64) for f in frequencies.values()])
    if not 0 <= count <= freq_N.size * dim:
        raise ValueError(f"budget {count} is outside [0, {freq_N.size * dim}] elements")
    if freq_N.size and freq_N.min() < 0:
        raise ValueError("frequencies must be >= 0")
    # The score depends on the row only through f: rank the distinct frequencies, not every element.
    uniq_U, rows_U = np.unique(freq_N, return_counts=True)
    uniq_U, rows_U = uniq_U[::-1], rows_U[::-1]  # most frequent first
    score_UD = np.log1p(uniq_U.astype(np.float64))[:, None] / np.arange(1, dim + 1, dtype=np.float64)[None, :]
    sizes_N = np.zeros(freq_N.size, np.int64)
    if count:
        flat = score_UD.ravel()
        order = np.argsort(-flat, kind="stable")
        covered = np.cumsum(np.repeat(rows_U, dim)[order])
        tau = flat[order[np.searchsorted(covered, count)]]  # the score of the count-th element
        above_U = (score_UD > tau).sum(1)
        ties_U = (score_UD == tau).sum(1)
        # Rows in order of decreasing frequency, then table order and row: ties at tau go to the first.
        row_order = np.lexsort((np.arange(freq_N.size), -freq_N))
        u_of_row = np.searchsorted(-uniq_U, -freq_N[row_order])
        ties_N = ties_U[u_of_row]
        need = count - int((above_U * rows_U).sum())
        before = np.cumsum(ties_N) - ties_N
        sizes_N[row_order] = above_U[u_of_row] + np.clip(need - before, 0, ties_N)
    out, start = {}, 0
    for table, f in frequencies.items():
        out[table] = sizes_N[start : start + len(f)]
        start += len(f)
    assert sum(int(s.sum()) for s in out.values()) == count
    return out


def aligned_mask(sizes_R: np.ndarray, dim: int) -> np.ndarray:
    """bool [R, D]: row r keeps its first sizes_R[r] columns."""
    return np.arange(dim)[None, :] < np.asarray(sizes_R)[:, None]


def random_columns_mask(sizes_R: np.ndarray, dim: int, rng: np.random.Generator) -> np.ndarray:
    """bool [R, D]: row r keeps sizes_R[r] columns drawn uniformly at random without replacement."""
    rank_RD = np.argsort(rng.random((len(sizes_R), dim)), axis=1).argsort(axis=1)
    return rank_RD < np.asarray(sizes_R)[:, None]


def interaction_warning(kept_by_table: Mapping[str, int]) -> str | None:
    """Why a mask leaves a model with no feature interactions (None if it does not): interactions
    (FM's pairwise dot products, DeepFM's FM part, AutoInt's attention) need kept elements in at least
    two tables."""
    alive = [t for t, k in kept_by_table.items() if k > 0]
    if len(alive) >= 2 or len(kept_by_table) < 2:
        return None
    where = f"every kept element is in table {alive[0]}" if alive else "no element is kept"
    return (
        f"{where}: a model on this mask has no feature interactions (embeddings of two tables never "
        f"meet), only per-table terms"
    )


def floor_clip_note(requested: int, applied: int, count: int, rows: int) -> str | None:
    """The message for a row floor a budget cannot afford (None if nothing was clipped)."""
    if applied >= requested:
        return None
    return (
        f"row floor clipped: {requested} dims per row requested, {applied} applied "
        f"({count:,} elements over {rows:,} rows afford {count // rows} each)"
    )
