"""`pep.s_optimizer: sgd`: s is updated by its own rule on the looked-up rows (the fused optimizer
never moves it), the step scale is the same on any sharding plan, and a resumed search takes the
same steps as an uninterrupted one."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from pep_torchrec.config import ConfigError, load_config
from pep_torchrec.distributed.pep_embeddingbag import ShardedPEPEmbeddingBagCollection
from pep_torchrec.distributed.s_optimizer import (
    OwnSStep,
    SOptimizerSettings,
    SOptimizerState,
    SOptimizerSync,
    plan_step,
)
from pep_torchrec.ops import threshold_pool_cpu as cpu_kernel
from pep_torchrec.ops.threshold_pool import s_columns
from pep_torchrec.train import main as train_main
from tests.helpers.dist import run_on_ranks
from tests.helpers.sharded_pep import (
    DIM,
    GK,
    LR,
    TABLE_NAMES,
    TABLES,
    Case,
    PooledModel,
    assemble,
    full_state,
    rank_input,
    sgd_sharders,
    shard,
    state_pieces,
)

REPO = Path(__file__).resolve().parents[2]
SEARCH = str(REPO / "configs" / "debug_cpu_search.yaml")
KEY = "model.ebc._embedding_bag_collection.embedding_bags.{table}.weight"
S_LR = 0.05


# ---- the rule ----------------------------------------------------------------------------------


def test_first_sync_sets_the_table_rms_scale_and_v_is_never_touched():
    state = SOptimizerState(SOptimizerSettings(lr=0.1), ["a", "b"])
    sync = SOptimizerSync(SOptimizerSettings(lr=0.1), ["a", "b"], [state])
    weight = torch.zeros(5, 4)  # D = 2: v in [0, 2), s in [2, 4)
    weight[:, 2:] = -3.0
    ids, tables = torch.tensor([0, 3]), torch.tensor([0, 1])
    grad = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    state.update(weight, ids, tables, grad, slice(2, 4), gk=2.0)
    assert torch.equal(weight[:, 2:], torch.full((5, 2), -3.0))  # no scale before the first sync
    sync.sync(1)
    # mean over the table's rows of mean_c((g / gk)^2): a: (0.25 + 2.25) / 2, b: 1
    assert sync.mean_sq == {"a": pytest.approx(1.25), "b": pytest.approx(1.0)}
    state.update(weight, ids, tables, grad, slice(2, 4), gk=2.0)
    expected_a = -3.0 - 0.1 / math.sqrt(1.25) * torch.tensor([0.5, 1.5])
    expected_b = -3.0 - 0.1 / math.sqrt(1.0) * torch.tensor([1.0, 1.0])
    torch.testing.assert_close(weight[0, 2:], expected_a)
    torch.testing.assert_close(weight[3, 2:], expected_b)
    assert torch.equal(weight[:, :2], torch.zeros(5, 2))
    assert torch.equal(weight[[1, 2, 4], 2:], torch.full((3, 2), -3.0))
    # The next sync blends the interval's mean into the EMA with beta^(steps since the last sync).
    sync.sync(3)
    beta2 = 0.99**2
    assert sync.mean_sq["a"] == pytest.approx(beta2 * 1.25 + (1 - beta2) * 1.25)
    assert sync.last_sync == 3


@pytest.mark.skipif(not cpu_kernel.available(), reason="the C++ CPU kernels could not be built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("s_cols", [slice(8, 16), slice(8, 9)], ids=["feature_dim", "feature"])
def test_cpu_kernel_takes_the_torch_paths_step(monkeypatch, dtype, s_cols):
    """`pep_s_update` (C++) == the gather / scatter path, bit for bit, on a column slice of a wider
    storage (a TBE group's rows): the same s columns, nothing else touched, the same statistics."""
    gen = torch.Generator().manual_seed(0)
    storage = torch.randn(300, 20, generator=gen, dtype=dtype)[:, :16]  # row stride 20 > width
    ids = torch.randperm(300, generator=gen)[:120]
    tables = torch.randint(0, 3, (120,), generator=gen)
    grad = torch.randn(120, s_cols.stop - s_cols.start, generator=gen, dtype=dtype) * 1e-3
    results = []
    for native in (True, False):
        monkeypatch.setattr(cpu_kernel, "available", lambda native=native: native)
        state = SOptimizerState(SOptimizerSettings(lr=0.1), ["a", "b", "c"])
        state.scale = torch.tensor([0.1, 0.2, 0.05], dtype=torch.float64)
        weight = storage.clone()
        state.update(weight, ids, tables, grad, s_cols, gk=0.37)
        results.append((weight, state.sum_sq.clone(), state.rows.clone()))
    (w_c, sq_c, rows_c), (w_t, sq_t, rows_t) = results
    assert not torch.equal(w_c, storage)
    assert torch.equal(w_c, w_t)  # bit for bit: the searches' results do not depend on the path
    assert torch.equal(sq_c, sq_t) and torch.equal(rows_c, rows_t)


@pytest.mark.skipif(not cpu_kernel.available(), reason="the C++ CPU kernels could not be built here")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("ragged", [False, True], ids=["n_max_ids_each", "ragged"])
def test_cpu_backward_is_the_torch_backward(monkeypatch, ragged, threads):
    """OwnSStep's backward with the C++ gather (`pep_s_gather`) == its PyTorch ops, bit for bit: the
    gradient handed to the TBE (s columns zeroed, v columns untouched) and the updated s, with
    repeated ids (sums in occurrence order) and features of different id counts, on one thread and
    on two (past the kernels' threading threshold: ~5,000 unique rows x 16)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # what the launchers pass on
    gen = torch.Generator().manual_seed(1)
    num_f, rows, dim, width = 3, 2500, 16, 32  # feature_dim: [v | s], s in columns [16, 32)
    storage = torch.randn(num_f * rows, width, generator=gen)
    lengths = [4000, 2000, 3000] if ragged else [3000, 3000, 3000]
    values = torch.cat([torch.randint(0, rows, (n,), generator=gen) for n in lengths])  # many repeats
    n_max = max(lengths)
    grad_out = torch.randn(n_max, num_f * width, generator=gen)
    for f, n in enumerate(lengths):
        grad_out[n:, f * width : (f + 1) * width] = 0  # the TBE's padding rows carry no gradient
    results = []
    for native in (True, False):
        monkeypatch.setattr(cpu_kernel, "available", lambda native=native: native)
        state = SOptimizerState(SOptimizerSettings(lr=0.1), ["t0", "t1", "t2"])
        state.scale = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
        store = storage.clone()
        plan = plan_step(
            [store[f * rows : (f + 1) * rows] for f in range(num_f)],
            [0, 1, 2],
            values,
            lengths,
            slice(dim, width),
            width,
            store,
            gk=0.5,
        )
        rows_all = torch.zeros(n_max, num_f * width, requires_grad=True)
        OwnSStep.apply(rows_all, plan, state).backward(grad_out.clone())
        results.append((rows_all.grad, store, state.sum_sq.clone()))
    (grad_c, store_c, sq_c), (grad_t, store_t, sq_t) = results
    assert torch.equal(grad_c, grad_t) and torch.equal(store_c, store_t) and torch.equal(sq_c, sq_t)
    assert not torch.equal(store_c, storage)
    assert torch.equal(grad_c.view(n_max, num_f, width)[:, :, dim:], torch.zeros(n_max, num_f, dim))


@pytest.mark.skipif(not cpu_kernel.available(), reason="the C++ CPU kernels could not be built here")
@pytest.mark.parametrize(
    "lengths, rows_per_table",
    [
        ([700, 700, 700], [50, 3000, 9]),  # many repeats, one digit pass... and a tiny table
        ([900, 0, 1200], [2500, 2500, 2500]),  # ragged, an empty feature
        ([400, 400, 400], [2**21, 2**21, 2**21]),  # 23 bits: three 11-bit passes
        ([], []),
    ],
    ids=["uniform", "ragged", "three_passes", "no_features"],
)
def test_cpu_unique_rows_is_torch_unique(lengths, rows_per_table):
    """`plan_step`'s C++ row map == torch.unique + bucketize (ids, inverse, table of each row), with
    tables laid out in the storage out of order, and its grouping lists each row's occurrences in
    occurrence order (what makes the backward's gather sum like index_add_)."""
    gen = torch.Generator().manual_seed(2)
    num_f = len(lengths)
    layout = [2, 0, 1][:num_f]  # table t starts after the tables placed before it in the storage
    bases = {}
    at = 0
    for t in layout:
        bases[t] = at
        at += rows_per_table[t]
    feature_base = torch.tensor([bases[t] for t in range(num_f)], dtype=torch.int64)
    values = torch.cat(
        [torch.randint(0, rows_per_table[f], (n,), generator=gen) for f, n in enumerate(lengths)]
        or [torch.zeros(0, dtype=torch.int64)]
    )
    uniform = num_f > 0 and len(set(lengths)) == 1
    lengths_F = None if uniform else torch.tensor(lengths, dtype=torch.int64)
    if uniform:
        rows = (values.view(num_f, -1) + feature_base.unsqueeze(1)).t().reshape(-1)
    else:
        rows = values + torch.repeat_interleave(feature_base, lengths_F)
    base_sorted, order = feature_base.sort()
    ids, inverse, table_of_id, slots, seg = cpu_kernel.unique_rows(
        values, num_f, lengths_F, feature_base, max(at, 1), base_sorted, order
    )
    want_ids, want_inverse = torch.unique(rows, return_inverse=True)
    assert torch.equal(ids, want_ids) and torch.equal(inverse, want_inverse)
    assert torch.equal(table_of_id, order[torch.bucketize(ids, base_sorted, right=True) - 1])
    # slots: n·F + f of each occurrence, grouped by row, ascending (= occurrence order) in a group.
    occurrence_slot = (
        torch.arange(rows.numel())
        if uniform
        else torch.cat([torch.arange(n) * num_f + f for f, n in enumerate(lengths)] or [rows[:0]])
    )
    assert seg[0] == 0 and seg[-1] == rows.numel()
    for u in range(0, ids.numel(), max(ids.numel() // 50, 1)):
        group = slots[seg[u] : seg[u + 1]]
        assert torch.equal(group, occurrence_slot[inverse == u])
    if num_f:
        with pytest.raises(IndexError, match="outside the storage"):
            cpu_kernel.unique_rows(values + at, num_f, lengths_F, feature_base, at, base_sorted, order)


def test_saved_state_counts_the_pending_statistics_once():
    def fresh() -> tuple[SOptimizerState, SOptimizerSync]:
        k = SOptimizerState(SOptimizerSettings(lr=0.1), ["a"])
        return k, SOptimizerSync(SOptimizerSettings(lr=0.1), ["a"], [k])

    w = torch.zeros(3, 2)
    k1, s1 = fresh()
    k1.update(w, torch.tensor([0]), torch.tensor([0]), torch.tensor([[2.0]]), slice(1, 2), gk=1.0)
    s1.sync(1)
    k1.update(w, torch.tensor([1]), torch.tensor([0]), torch.tensor([[4.0]]), slice(1, 2), gk=1.0)
    saved = json.loads(json.dumps(s1.state()))  # what a checkpoint holds, mid-interval
    for carry in (True, False):
        k2, s2 = fresh()
        s2.load_state(saved, carry=carry)
        assert k2.scale.tolist() == k1.scale.tolist()
        s2.sync(5)
        s1_copy = SOptimizerSync(
            SOptimizerSettings(lr=0.1), ["a"], [SOptimizerState(SOptimizerSettings(lr=0.1), ["a"])]
        )
        s1_copy.load_state(saved, carry=True)
        s1_copy.sync(5)
        assert (s2.mean_sq == s1_copy.mean_sq) is carry  # only the carrying rank adds them
    with pytest.raises(ValueError, match="tables"):
        fresh()[1].load_state({**saved, "mean_sq": {"b": 1.0}}, carry=True)


def test_config_refuses_pressure_through_the_fused_optimizer(tmp_path):
    for sets, match in (
        (["pep.s_optimizer=sgd", "pep.s_decay=0.1"], "pep.s_decay"),
        (["pep.s_optimizer=adam"], "pep.s_optimizer"),
        (["pep.gk_growth=0.5"], "pep.gk_growth"),
        (["pep.control_every=7"], "pep.control_every"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_config(SEARCH, sets)


# ---- sharded: every plan takes the same steps, and they are the rule's ---------------------------

SOPT_PLANS = {
    "table_wise": dict.fromkeys(TABLE_NAMES, "table_wise"),
    "row_wise": dict.fromkeys(TABLE_NAMES, "row_wise"),
    "table_row_wise": dict.fromkeys(TABLE_NAMES, "table_row_wise"),
    "mixed": {"t_a": "row_wise", "t_b": "table_wise", "t_c": "row_wise"},
}
SOPT_CASES = [Case("feature_dim", s_decay=0.0, s_push=0.0), Case("feature", s_decay=0.0, s_push=0.0)]
STEPS = 3


def _sopt_worker(rank: int, world_size: int) -> dict:
    sharders = sgd_sharders()
    results = {}
    for plan_name, types in SOPT_PLANS.items():
        for case in SOPT_CASES:
            torch.manual_seed(0)
            module = case.module(torch.device("meta"))
            module.s_optimizer = SOptimizerSettings(lr=S_LR)
            dmp, _ = shard(PooledModel(module), types, sharders)
            full = {f"pep.{k}": v for k, v in full_state(case).items()}
            from pep_torchrec.distributed.state import copy_full_into_sharded

            copy_full_into_sharded(dmp.state_dict(), full)
            pep = dmp.module.pep
            assert isinstance(pep, ShardedPEPEmbeddingBagCollection) and pep.s_optimizer is not None
            kjt, grads = rank_input(rank)
            for step in range(1, STEPS + 1):
                out = dmp(kjt)
                out.pop("keys")
                sum((out[f] * grads[f]).sum() for f in out).backward()
                if step == 1:
                    pep.s_optimizer.sync(step, dist.all_reduce)
            results[(plan_name, case.name)] = {
                "pieces": state_pieces(dmp.state_dict()),
                "mean_sq": dict(pep.s_optimizer.mean_sq),
            }
    return results


@pytest.fixture(scope="module")
def sopt_results() -> list[dict]:
    return run_on_ranks(_sopt_worker, 2)


def _reference(case: Case) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The rule by hand on the unsharded module: the kernels see the mean over ranks of the
    per-rank gradients (TorchRec's semantics); v takes fused SGD steps, s its own steps."""
    world = 2
    module = case.module(torch.device("cpu"))
    module.load_state_dict(full_state(case))
    inputs = [rank_input(rank) for rank in range(world)]
    cols = s_columns(DIM, case.mode)
    rows = {
        t: torch.unique(torch.cat([kjt[f].values() for kjt, _ in inputs for f in fs]))
        for t, fs, _, _ in TABLES
    }
    params = dict(module.named_parameters())
    scale: dict[str, float] = {}
    mean_sq: dict[str, float] = {}
    for step in range(1, STEPS + 1):
        module.zero_grad()
        total = 0.0
        for kjt, grads in inputs:
            out = module(kjt).to_dict()
            total = total + sum((out[f] * grads[f]).sum() for f in out)
        total.backward()
        with torch.no_grad():
            for t in TABLE_NAMES:
                p = params[f"_embedding_bag_collection.embedding_bags.{t}.weight"]
                g = p.grad / world
                g_s = g[rows[t], cols].double() / GK
                if step == 1:
                    mean_sq[t] = float(g_s.pow(2).mean(1).mean())
                    scale[t] = S_LR / math.sqrt(mean_sq[t])
                else:
                    p[rows[t], cols] = (p[rows[t], cols].double() - scale[t] * g_s).float()
                p[:, :DIM] -= LR * g[:, :DIM]
    state = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    return state, mean_sq


@pytest.mark.parametrize("case", SOPT_CASES, ids=lambda c: c.name)
def test_every_plan_takes_the_rules_steps(sopt_results, case):
    expected, mean_sq = _reference(case)
    key = "_embedding_bag_collection.embedding_bags.{t}.weight"
    for plan in SOPT_PLANS:
        results = [r[(plan, case.name)] for r in sopt_results]
        assert results[0]["mean_sq"] == results[1]["mean_sq"]  # every rank holds the same scale
        for t in TABLE_NAMES:
            assert results[0]["mean_sq"][t] == pytest.approx(mean_sq[t], rel=1e-5), (plan, t)
        got = {
            t: assemble(results, f"pep.{key.format(t=t)}", expected[key.format(t=t)].shape)
            for t in TABLE_NAMES
        }
        for t in TABLE_NAMES:
            np.testing.assert_allclose(
                got[t], expected[key.format(t=t)], rtol=1e-5, atol=1e-6, err_msg=f"{plan} {t}"
            )
        s = s_columns(DIM, case.mode)
        moved = sum(
            int((got[t][:, s] != full_state(case)[key.format(t=t)].numpy()[:, s]).sum()) for t in TABLE_NAMES
        )
        assert moved > 0, f"{plan}: s never moved"


# ---- a search run ----------------------------------------------------------------------------


def _s_at(run: Path, step: int, dim: int = 8) -> torch.Tensor:
    meta = json.loads((run / "init" / "meta.json").read_text())
    shapes = {t: (e["rows"], 2 * dim) for t, e in meta["tables"].items()}
    state = {"model": {KEY.format(table=t): torch.empty(s) for t, s in shapes.items()}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(run / "checkpoints" / f"step_{step:08d}"), no_dist=True)
    return torch.cat([w[:, dim:].flatten() for w in state["model"].values()])


def _search(data: Path, run: Path, *sets: str, resume: bool = False) -> None:
    args = [
        "--config",
        SEARCH,
        "--data",
        str(data),
        "--run-dir",
        str(run),
        "--set",
        "train.progress=false",
        "train.max_steps=60",
        "train.checkpoint_every=10",
        "train.keep_checkpoints=100",
        "pep.stop_after_budgets=false",
        "pep.s_optimizer=sgd",
        "pep.s0=-6.0",
        *sets,
    ]
    assert train_main([*args, "--resume"] if resume else args) == 0


def test_s_moves_only_by_its_own_rule(tmp_path, debug_data):
    run = tmp_path / "run"
    _search(debug_data, run, "pep.s_lr=0.0")
    s = _s_at(run, 60)
    assert torch.equal(s, torch.full_like(s, -6.0))  # the fused Adagrad never touched s


def test_resumed_search_takes_the_same_steps(tmp_path, debug_data):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _search(debug_data, full, f"pep.s_lr={S_LR}")
    s = _s_at(full, 60)
    assert s.std() > 0.01  # the thresholds learned a spread (0.025 here)
    # Resume from step 30: mid-interval (evals at 25, 50), with statistics pending for the next sync.
    shutil.copytree(full, resumed)
    for ckpt in (resumed / "checkpoints").iterdir():
        if int(ckpt.name.split("_")[1]) > 30:
            shutil.rmtree(ckpt)
    (resumed / "summary.json").unlink()
    _search(debug_data, resumed, f"pep.s_lr={S_LR}", resume=True)
    assert torch.equal(_s_at(resumed, 60), s)
    strip = ("examples_per_sec", "train_seconds")
    rows = [
        [
            {k: v for k, v in json.loads(line).items() if k not in strip}
            for line in (d / "metrics.jsonl").read_text().splitlines()
        ]
        for d in (full, resumed)
    ]
    assert rows[0] == rows[1]


# ---- what a search says about itself ----------------------------------------------------------


def test_clipped_floor_and_still_improving_are_reported(tmp_path, debug_data, caplog):
    caplog.set_level("WARNING")
    run = tmp_path / "run"
    _search(debug_data, run, "pep.s_lr=0.01", "pep.min_row_dims=8")
    assert "budget 0.5: row floor clipped: 8 dims per row requested, 4 applied" in caplog.text
    assert (
        "row floor clipped"
        in json.loads((run / "masks" / "budget_0.5" / "meta.json").read_text())["warnings"][0]
    )
    base = tmp_path / "base"
    assert (
        train_main(
            [
                "--config",
                str(REPO / "configs" / "debug_cpu.yaml"),
                "--data",
                str(debug_data),
                "--run-dir",
                str(base),
                "--set",
                "train.progress=false",
                "train.max_steps=50",
            ]
        )
        == 0
    )
    summary = json.loads((base / "summary.json").read_text())
    assert summary["best_step"] == 50 and summary["still_improving"] is True
    assert "valid AUC was still improving at the last eval (step 50" in caplog.text
