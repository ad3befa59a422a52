"""Sharded == unsharded on 2 gloo ranks: pooled outputs (compared by key), one fused SGD step of the
tables, and the sharding plan actually being the one asked for.

Semantics we check against: the table gradient is the *mean* over ranks of each rank's loss gradient,
for every sharding type: DDP averages replicated (data-parallel) tables, and TorchRec's output
all-to-all divides the gradients it routes to the owning shards by the world size
(`torchrec.distributed.comm_ops.get_gradient_division()`, on by default) to match.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from pep_torchrec.config import EmbeddingOptimizerConfig, ShardingConfig
from pep_torchrec.distributed.planning import make_constraints, make_sharders, plan_sharding, shard_model
from pep_torchrec.distributed.state import copy_full_into_sharded, local_pieces
from tests.helpers.dist import run_on_ranks

TABLES = [("t_a", "a", 40), ("t_b", "b", 75), ("t_c", "c", 9)]
DIM = 16
LR = 0.5
BATCH = 6


def tables() -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=t, feature_names=[f], num_embeddings=n, embedding_dim=DIM)
        for t, f, n in TABLES
    ]


def full_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"embedding_bags.{t}.weight": torch.randn(n, DIM, generator=g) for t, _, n in TABLES}


def rank_input(rank: int) -> tuple[KeyedJaggedTensor, dict[str, torch.Tensor]]:
    """A multi-hot batch (some empty bags) and a random output gradient per feature, for `rank`."""
    g = torch.Generator().manual_seed(100 + rank)
    keys, lengths, values = [], [], []
    for _, f, n in TABLES:
        lens = torch.randint(0, 4, (BATCH,), generator=g)
        keys.append(f)
        lengths.append(lens)
        values.append(torch.randint(0, n, (int(lens.sum()),), generator=g))
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))
    grads = {f: torch.randn(BATCH, DIM, generator=g) for _, f, _ in TABLES}
    return kjt, grads


def _sharded_worker(rank: int, world_size: int, sharding_type: str) -> dict:
    torch.manual_seed(0)
    cfg = ShardingConfig(types=[sharding_type], min_partition=4)
    ebc = EmbeddingBagCollection(tables=tables(), device=torch.device("meta"))
    sharders = make_sharders(EmbeddingOptimizerConfig(name="sgd", lr=LR), "cpu")
    report = plan_sharding(
        ebc,
        sharders=sharders,
        constraints=make_constraints([t for t, _, _ in TABLES], cfg),
        world_size=world_size,
        local_world_size=world_size,
        compute_device="cpu",
        batch_size=BATCH,
        pg=torch.distributed.group.WORLD,
    )
    model = shard_model(ebc, plan=report.plan, sharders=sharders, device=torch.device("cpu"))
    copy_full_into_sharded(model.state_dict(), full_weights())

    kjt, grads = rank_input(rank)
    out = model(kjt).to_dict()
    loss = sum((out[f] * grads[f]).sum() for f in out)
    loss.backward()
    dense = [p for n, p in model.named_parameters() if p.grad is not None]
    if dense:  # data-parallel tables: stepped by a plain optimizer after DDP's all-reduce
        torch.optim.SGD(dense, lr=LR).step()
    pieces = {
        k: [(tuple((s.start, s.stop) for s in idx), t.detach().numpy().copy()) for idx, t in local_pieces(v)]
        for k, v in model.state_dict().items()
    }
    return {
        "out": {f: t.detach().numpy() for f, t in out.items()},
        "pieces": pieces,
        "plan": [(r["table"], r["sharding_type"], r["shards"]) for r in report.tables()],
    }


@pytest.mark.parametrize("sharding_type", ["table_wise", "column_wise", "row_wise", "data_parallel"])
def test_sharded_equals_unsharded(sharding_type):
    world_size = 2
    results = run_on_ranks(_sharded_worker, world_size, sharding_type)

    for table, kind, shards in results[0]["plan"]:
        assert kind == sharding_type, (table, kind)
        if sharding_type in ("column_wise", "row_wise"):
            assert shards >= 2, f"{table}: expected several shards, got {shards}"

    reference = EmbeddingBagCollection(tables=tables())
    reference.load_state_dict(full_weights())
    total_loss = 0.0
    for rank in range(world_size):
        kjt, grads = rank_input(rank)
        out = reference(kjt).to_dict()
        for f, expected in out.items():  # by key: sharded KeyedTensors may order keys differently
            np.testing.assert_allclose(
                results[rank]["out"][f], expected.detach().numpy(), rtol=1e-6, atol=1e-6
            )
        total_loss = total_loss + sum((out[f] * grads[f]).sum() for f in out)
    total_loss.backward()
    scale = 1.0 / world_size
    with torch.no_grad():
        expected_weights = {k: (p - LR * scale * p.grad).numpy() for k, p in reference.named_parameters()}

    for key, expected in expected_weights.items():
        assembled = np.full_like(expected, np.nan)
        for result in results:
            for index, piece in result["pieces"][key]:
                assembled[tuple(slice(a, b) for a, b in index)] = piece
        assert not np.isnan(assembled).any(), f"{key}: shards do not cover the table"
        np.testing.assert_allclose(assembled, expected, rtol=1e-5, atol=1e-6, err_msg=key)
