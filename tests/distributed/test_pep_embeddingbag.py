"""Sharded PEP == unsharded PEP on 2 gloo ranks.

For every supported sharding type × granularity (the six, retrain MASK and plain; per-sample
weights in one case; plus plans mixing sharding types, which reorder keys inside TorchRec): pooled
outputs (by key, and in the unsharded key order), then one step — fused EXACT_SGD for the stored [v | s]
tables, torch SGD for the replicated coarse thresholds — must equal the unsharded module stepped with
the MEAN over ranks of each rank's gradient (TorchRec's semantics: the output all-to-all divides
routed gradients by the world size, DDP averages replicated ones; see test_planning.py). Sparsity
pressure (s_decay, s_push) is on in every threshold case, so its rescaling is checked too. Also:
kept counts / margins of local shards, refusal of unsupported plans, a DCP round trip of model +
fused optimizer, and TrainPipelineSparseDist steps == eager steps.

All (sharding type, case) pairs run in ONE spawned 2-rank job (a module fixture), because spawning
and importing TorchRec dominates the runtime on 2 cores.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ParameterSharding, ShardingEnv

from pep_torchrec.config import EmbeddingOptimizerConfig, ShardingConfig
from pep_torchrec.distributed.pep_embeddingbag import (
    PEPEmbeddingBagCollectionSharder,
    ShardedPEPEmbeddingBagCollection,
    pep_constraints,
    pep_modules,
    pep_sharders,
)
from pep_torchrec.distributed.planning import (
    EBCSharder,
    fused_params,
    make_constraints,
    plan_sharding,
    shard_model,
)
from pep_torchrec.distributed.state import copy_full_into_sharded
from pep_torchrec.modules import PEPEmbeddingBagCollection
from pep_torchrec.ops import ThresholdMode
from tests.helpers.dist import run_on_ranks
from tests.helpers.sharded_pep import (
    BATCH,
    DIM,
    FEATURES,
    GK,
    LR,
    TABLE_NAMES,
    TABLES,
    WORLD_SIZE,
    Case,
    PooledModel,
    assemble,
    full_state,
    rank_input,
    sgd_sharders,
    shard,
    state_pieces,
    tables,
)

CASES = [Case(g) for g in ("global", "dimension", "field", "field_dim", "feature", "feature_dim")]
CASES += [Case("feature_dim", retrain=True), Case(None)]
COARSE_CASES = [c for c in CASES if c.mode in (ThresholdMode.COARSE, ThresholdMode.NONE)]
# Per-sample weights: not with row splitting of the mean-pooled t_b (refused, see the refusal test).
WEIGHTED = Case("field_dim", weighted=True)


def _uniform(sharding_type: str) -> dict[str, str]:
    return dict.fromkeys(TABLE_NAMES, sharding_type)


# plan name → (sharding type per table, cases). The mixed plans group t_a and t_c apart from t_b, so
# the sharded module must restore the unsharded key order.
PLANS = {
    "table_wise": (_uniform("table_wise"), [*CASES, WEIGHTED]),
    "row_wise": (_uniform("row_wise"), CASES),
    "table_row_wise": (_uniform("table_row_wise"), CASES),
    "column_wise": (_uniform("column_wise"), [*COARSE_CASES, WEIGHTED]),
    "table_column_wise": (_uniform("table_column_wise"), COARSE_CASES),
    "mixed": ({"t_a": "row_wise", "t_b": "table_wise", "t_c": "row_wise"}, [*CASES, WEIGHTED]),
    "mixed_cw": ({"t_a": "column_wise", "t_b": "table_wise", "t_c": "column_wise"}, COARSE_CASES),
}
MATRIX = [(plan, case) for plan, (_, cases) in PLANS.items() for case in cases]


def _matrix_worker(rank: int, world_size: int) -> dict:
    """Every (plan, case): outputs, the state after one step, kept counts and margins."""
    sharders = sgd_sharders()
    results = {}
    for plan_name, case in MATRIX:
        torch.manual_seed(0)
        kjt, grads = rank_input(rank, case.weighted)
        dmp, plan = shard(PooledModel(case.module(torch.device("meta"))), PLANS[plan_name][0], sharders)
        copy_full_into_sharded(dmp.state_dict(), {f"pep.{k}": v for k, v in full_state(case).items()})
        out = dmp(kjt)
        keys = out.pop("keys")
        loss = sum((out[f] * grads[f]).sum() for f in out)
        loss.backward()
        dense = [p for _, p in dmp.named_parameters() if p.grad is not None]
        if dense:  # coarse thresholds: averaged by DDP, stepped by a plain optimizer
            torch.optim.SGD(dense, lr=LR).step()
        pep = dmp.module.pep
        assert isinstance(pep, ShardedPEPEmbeddingBagCollection)
        flushes = []  # the scans must flush a UVM-caching TBE before reading its weights
        for kernel in pep._pep_kernels():
            kernel.flush = lambda kernel=kernel, flush=kernel.flush, log=flushes: (
                log.append(kernel),
                flush(),
            )[1]
        kept = pep.kept_counts()
        margins = {t: [(r, c, m.numpy()) for r, c, m in pep.local_margins(t)] for t in TABLE_NAMES}
        flushed = len({id(k) for k in flushes})  # before state_dict, which flushes on its own
        results[(plan_name, case.name)] = {
            "keys": list(keys),
            "out": {f: t.detach().numpy() for f, t in out.items()},
            "pieces": state_pieces(dmp.state_dict()),
            "plan": plan,
            "kept": kept,
            # What the output all-to-all / reduce-scatter is sized for, per feature.
            "odist_dims": list(pep._embedding_bag_collection._embedding_dims),
            "margins": margins,
            "flushed_kernels": flushed,
            "kernels": len(list(pep._pep_kernels())),
        }
    return results


@pytest.fixture(scope="module")
def matrix_results() -> list[dict]:
    return run_on_ranks(_matrix_worker, WORLD_SIZE)


@pytest.mark.parametrize("plan,case", MATRIX, ids=[f"{p}-{c.name}" for p, c in MATRIX])
def test_sharded_equals_unsharded(matrix_results, plan, case):
    results = [r[(plan, case.name)] for r in matrix_results]
    for table, kind, shards in results[0]["plan"]:
        assert kind == PLANS[plan][0][table], (table, kind)
        if kind != "table_wise":
            assert shards == WORLD_SIZE, f"{table}: expected {WORLD_SIZE} shards, got {shards}"
    # Only pooled [B, D] crosses ranks (column shards: their slice of D), never the stored W.
    odist_dims = results[0]["odist_dims"]
    assert len(odist_dims) >= len(FEATURES) and sum(odist_dims) == len(FEATURES) * DIM, odist_dims

    reference = case.module(torch.device("cpu"))
    reference.load_state_dict(full_state(case))
    total_loss = 0.0
    for rank in range(WORLD_SIZE):
        kjt, grads = rank_input(rank, case.weighted)
        kt = reference(kjt)
        assert results[rank]["keys"] == kt.keys()  # the unsharded key order
        out = kt.to_dict()
        for f, expected in out.items():
            np.testing.assert_allclose(
                results[rank]["out"][f],
                expected.detach().numpy(),
                rtol=1e-5,
                atol=1e-6,
                err_msg=f"rank {rank} feature {f}",
            )
        total_loss = total_loss + sum((out[f] * grads[f]).sum() for f in out)
    total_loss.backward()
    with torch.no_grad():  # the mean over ranks of the per-rank gradients
        expected_state = {k: (p - LR / WORLD_SIZE * p.grad).numpy() for k, p in reference.named_parameters()}
    assert set(expected_state) == set(full_state(case))

    assembled = {}
    for key, expected in expected_state.items():
        assembled[key] = assemble(results, f"pep.{key}", expected.shape)
        np.testing.assert_allclose(assembled[key], expected, rtol=1e-5, atol=1e-6, err_msg=key)

    # Kept counts and margins of the local shards add up to the whole tables (of the sharded state).
    mirror = case.module(torch.device("cpu"))
    mirror.load_state_dict({k: torch.from_numpy(v) for k, v in assembled.items()})
    kept = {t: sum(r["kept"][t] for r in results) for t in TABLE_NAMES}
    assert kept == mirror.kept_counts()
    assert all(r["flushed_kernels"] == r["kernels"] for r in results)  # every local TBE flushed first
    for t, _, n, _ in TABLES:
        margins = np.full((n, DIM), np.nan, dtype=np.float32)
        for result in results:
            for row, col, piece in result["margins"][t]:
                margins[row : row + piece.shape[0], col : col + piece.shape[1]] = piece
        np.testing.assert_allclose(margins, mirror.margins(t).numpy(), rtol=1e-6, atol=1e-7, err_msg=t)


# ---- refusals (no processes needed: they happen before any collective) ------------------------


def test_column_wise_refused_for_row_thresholds():
    model = PooledModel(Case("feature_dim").module(torch.device("meta")))
    column_only = make_constraints(TABLE_NAMES, ShardingConfig(types=["column_wise"]))
    with pytest.raises(
        ValueError,
        match=r"table t_a: column_wise would split v from s \(granularity "
        r"feature_dim\); use table_wise, row_wise or table_row_wise",
    ):
        pep_constraints(model, column_only)

    retrain = PooledModel(Case("feature_dim", retrain=True).module(torch.device("meta")))
    with pytest.raises(
        ValueError, match="table t_a: table_column_wise would split v from its retrain mask m"
    ):
        pep_constraints(retrain, make_constraints(TABLE_NAMES, ShardingConfig(types=["table_column_wise"])))

    # Mixed requests keep what the table supports; coarse tables keep column-wise.
    mixed = pep_constraints(
        model, make_constraints(TABLE_NAMES, ShardingConfig(types=["column_wise", "row_wise"]))
    )
    assert mixed["t_a"].sharding_types == ["row_wise"]
    coarse = pep_constraints(PooledModel(Case("field").module(torch.device("meta"))), column_only)
    assert coarse["t_a"].sharding_types == ["column_wise"]
    assert pep_constraints(model, {"t_a": ParameterConstraints(min_partition=4)})["t_a"].min_partition == 4

    # A hand-made plan is refused when sharding, with the same message.
    plan = {
        t: ParameterSharding(sharding_type="column_wise", compute_kernel="fused", ranks=[0, 1])
        for t in TABLE_NAMES
    }
    with pytest.raises(ValueError, match=r"table t_a: column_wise would split v from s"):
        ShardedPEPEmbeddingBagCollection(
            Case("feature").module(torch.device("meta")), plan, ShardingEnv(world_size=WORLD_SIZE, rank=0)
        )
    plan = {t: ParameterSharding(sharding_type="data_parallel", compute_kernel="dense") for t in TABLE_NAMES}
    with pytest.raises(ValueError, match="table t_a: data_parallel replicates"):
        ShardedPEPEmbeddingBagCollection(
            Case("field").module(torch.device("meta")), plan, ShardingEnv(world_size=WORLD_SIZE, rank=0)
        )

    # Row splitting of a weighted, mean-pooled table (t_b) would change the mean's divisor.
    weighted = PooledModel(WEIGHTED.module(torch.device("meta")))
    with pytest.raises(
        ValueError,
        match="table t_b: row_wise with mean pooling of weighted features would "
        "divide by the sum of weights, not the number of ids; use table_wise, "
        "column_wise or table_column_wise",
    ):
        pep_constraints(weighted, make_constraints(TABLE_NAMES, ShardingConfig(types=["row_wise"])))


def test_sharders():
    sharders = pep_sharders({"learning_rate": 0.1})
    assert isinstance(sharders[0], PEPEmbeddingBagCollectionSharder) and isinstance(sharders[1], EBCSharder)
    assert sharders[0].fused_params == {"learning_rate": 0.1}
    assert "row_wise" in sharders[0].sharding_types("cpu") and "table_row_wise" in sharders[0].sharding_types(
        "cpu"
    )
    assert sharders[0].compute_kernels("row_wise", "cpu") == ["fused"]
    pep = Case("feature").module(torch.device("meta"))
    params = sharders[0].shardable_parameters(pep)
    assert {k: tuple(p.shape) for k, p in params.items()} == {t: (n, DIM + 4) for t, _, n, _ in TABLES}


# ---- DCP round trip and TrainPipelineSparseDist -------------------------------------------------


class CTR(nn.Module):
    """A tiny CTR model over a `Batch`: a feature_dim PEP module (tables t_a, t_b), a field PEP module
    (t_c, coarse thresholds) and a plain linear EBC, as the trainer's models have."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        t_ab, t_c = tables()[:2], tables()[2:]
        self.pep_rows = PEPEmbeddingBagCollection(
            t_ab, granularity="feature_dim", gk=GK, s_push=0.2, device=device
        )
        self.pep_coarse = PEPEmbeddingBagCollection(
            t_c, granularity="field", gk=GK, s_push=0.2, device=device
        )
        self.linear_ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(name="lin_a", feature_names=["a"], num_embeddings=40, embedding_dim=4)
            ],
            device=device,
        )
        self.head = nn.Linear(len(FEATURES) * DIM + 4 + 2, 1)

    def forward(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.pep_rows(batch.sparse_features).values()
        coarse = self.pep_coarse(batch.sparse_features).values()
        linear = self.linear_ebc(batch.sparse_features).values()
        logits = self.head(torch.cat([rows, coarse, linear, batch.dense_features], dim=1)).squeeze(1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, logits.detach()


def _batches(rank: int, count: int) -> list:
    from pep_torchrec.data.batch import Batch

    out = []
    for i in range(count):
        kjt, _ = rank_input(rank * 100 + i)
        g = torch.Generator().manual_seed(7 + 10 * rank + i)
        out.append(
            Batch(
                dense_features=torch.randn(BATCH, 2, generator=g),
                sparse_features=kjt,
                labels=(torch.rand(BATCH, generator=g) > 0.5).float(),
                weights=torch.ones(BATCH),
            )
        )
    return out


def _ctr_model(sharders: list, seed: int, sharding_type: str = "row_wise") -> tuple[Any, Any]:
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    torch.manual_seed(seed)
    model = CTR(torch.device("meta"))
    model.head = nn.Linear(model.head.in_features, 1)  # dense layers live on CPU from the start
    names = ["t_a", "t_b", "t_c", "lin_a"]
    constraints = pep_constraints(model, make_constraints(names, ShardingConfig(types=[sharding_type])))
    report = plan_sharding(
        model,
        sharders=sharders,
        constraints=constraints,
        world_size=WORLD_SIZE,
        local_world_size=WORLD_SIZE,
        compute_device="cpu",
        batch_size=BATCH,
        pg=dist.group.WORLD,
    )
    dmp = shard_model(model, plan=report.plan, sharders=sharders, device=torch.device("cpu"))
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    optimizer = CombinedOptimizer(
        [
            ("embedding", dmp.fused_optimizer),
            ("dense", KeyedOptimizerWrapper(dense, lambda ps: torch.optim.SGD(ps, lr=LR))),
        ]
    )
    return dmp, optimizer


def _eager_step(dmp: Any, optimizer: Any, batch: Any) -> torch.Tensor:
    optimizer.zero_grad()
    loss, logits = dmp(batch)
    loss.backward()
    optimizer.step()
    return logits


def _pipeline_dcp_worker(rank: int, world_size: int, checkpoint_dir: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    sharders = pep_sharders(fused_params(EmbeddingOptimizerConfig(name="adagrad", lr=LR), "cpu"))
    batches = _batches(rank, 4)
    out: dict[str, Any] = {}

    # TrainPipelineSparseDist over 3 batches == 3 eager steps of an identical model.
    piped, piped_opt = _ctr_model(sharders, seed=1)
    eager, eager_opt = _ctr_model(sharders, seed=1)
    pipeline = TrainPipelineSparseDist(piped, piped_opt, torch.device("cpu"), execute_all_batches=True)
    data = iter(batches[:3])
    piped_logits = [pipeline.progress(data) for _ in range(3)]
    out["pipelined"] = sorted(
        name for name, m in piped.module.named_modules() if getattr(m, "is_pipelined", False)
    )
    eager_logits = [_eager_step(eager, eager_opt, b) for b in batches[:3]]
    out["pipeline_logits"] = [t.numpy() for t in piped_logits]
    out["eager_logits"] = [t.numpy() for t in eager_logits]
    pipeline.detach()

    # DCP: save the eager model + optimizers, load into a fresh (differently initialised) model.
    dcp.save({"model": eager.state_dict(), "optim": eager_opt.state_dict()}, checkpoint_id=checkpoint_dir)
    fresh, fresh_opt = _ctr_model(sharders, seed=2)
    with torch.no_grad():
        out["differs_before_load"] = not torch.allclose(fresh(batches[3])[1], eager(batches[3])[1])
    state = {"model": fresh.state_dict(), "optim": fresh_opt.state_dict()}
    dcp.load(state, checkpoint_id=checkpoint_dir)
    fresh.load_state_dict(state["model"])
    fresh_opt.load_state_dict(state["optim"])
    with torch.no_grad():
        out["loaded_logits"] = fresh(batches[3])[1].numpy()
        out["saved_logits"] = eager(batches[3])[1].numpy()
    # One more step on both: equal only if the fused Adagrad state came back too.
    out["loaded_step"] = _eager_step(fresh, fresh_opt, batches[3]).numpy()
    out["saved_step"] = _eager_step(eager, eager_opt, batches[3]).numpy()
    with torch.no_grad():
        out["loaded_after"] = fresh(batches[0])[1].numpy()
        out["saved_after"] = eager(batches[0])[1].numpy()
    out["state_keys"] = sorted(eager.state_dict())

    # Resharding through DCP: the row-wise checkpoint loads into a table-wise model.
    resharded, _ = _ctr_model(sharders, seed=3, sharding_type="table_wise")
    state = {"model": resharded.state_dict()}
    dcp.load(state, checkpoint_id=checkpoint_dir)
    resharded.load_state_dict(state["model"])
    with torch.no_grad():
        out["resharded_logits"] = resharded(batches[3])[1].numpy()

    # The helper the trainer uses to find PEP modules (to read kept counts, steer s_push).
    found = pep_modules(fresh)
    out["pep_modules"] = sorted(found)
    out["kept"] = {name: m.kept_counts() for name, m in found.items()}
    return out


def test_pipeline_and_dcp_round_trip(tmp_path):
    results = run_on_ranks(_pipeline_dcp_worker, WORLD_SIZE, str(tmp_path / "ckpt"))
    for rank, r in enumerate(results):
        # The PEP modules are rewritten by the pipeline like the plain EBC (their inner EBC is not).
        assert r["pipelined"] == ["linear_ebc", "pep_coarse", "pep_rows"]
        for step, (p, e) in enumerate(zip(r["pipeline_logits"], r["eager_logits"])):
            np.testing.assert_allclose(p, e, rtol=1e-5, atol=1e-6, err_msg=f"rank {rank} step {step}")
        assert r["differs_before_load"]
        np.testing.assert_array_equal(r["loaded_logits"], r["saved_logits"])
        np.testing.assert_array_equal(r["loaded_step"], r["saved_step"])
        np.testing.assert_array_equal(r["loaded_after"], r["saved_after"])
        np.testing.assert_allclose(r["resharded_logits"], r["saved_logits"], rtol=1e-5, atol=1e-6)
        assert r["pep_modules"] == ["pep_coarse", "pep_rows"]
    # Every rank lists every table; the row-wise shards' counts add up to at most the table size.
    for module, tables_ in (("pep_rows", {"t_a": 40, "t_b": 75}), ("pep_coarse", {"t_c": 9})):
        for t, n in tables_.items():
            assert 0 < sum(r["kept"][module][t] for r in results) <= n * DIM
    keys = results[0]["state_keys"]
    assert "pep_rows._embedding_bag_collection.embedding_bags.t_a.weight" in keys
    assert "pep_coarse._embedding_bag_collection.embedding_bags.t_c.weight" in keys
    assert "pep_coarse.thresholds.t_c" in keys
