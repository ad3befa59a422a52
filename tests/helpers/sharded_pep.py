"""The toy PEP setup that the 2-rank tests share: three tables (a two-feature one, a mean-pooled one,
a tiny one), a threshold granularity `Case`, an unsharded state with thresholds that matter, one
multi-hot batch per rank, and the helpers that shard it with the trainer's planner and reassemble
the shards each rank returns (tests/distributed/test_pep_embeddingbag.py, test_s_optimizer.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from pep_torchrec.config import EmbeddingOptimizerConfig, ShardingConfig
from pep_torchrec.distributed.pep_embeddingbag import pep_constraints, pep_sharders
from pep_torchrec.distributed.planning import fused_params, make_constraints, plan_sharding, shard_model
from pep_torchrec.distributed.state import local_pieces
from pep_torchrec.modules import PEPEmbeddingBagCollection, threshold_mode
from pep_torchrec.ops import ThresholdMode, row_width

WORLD_SIZE = 2
DIM = 8
BATCH = 5
LR = 0.5
GK = 0.7
# table, features, rows, pooling: a two-feature table (features with different id counts share one
# TBE call), a mean-pooled table (row-wise finishes it with TorchRec's divisor callback), a tiny one.
TABLES = [
    ("t_a", ["a"], 40, PoolingType.SUM),
    ("t_b", ["b1", "b2"], 75, PoolingType.MEAN),
    ("t_c", ["c"], 9, PoolingType.SUM),
]
TABLE_NAMES = [t for t, _, _, _ in TABLES]
FEATURES = [f for _, fs, _, _ in TABLES for f in fs]


@dataclasses.dataclass(frozen=True)
class Case:
    granularity: str | None
    retrain: bool = False
    weighted: bool = False
    s_decay: float = 0.05
    s_push: float = 0.3

    @property
    def mode(self) -> ThresholdMode:
        return threshold_mode(self.granularity, self.retrain)

    @property
    def name(self) -> str:
        name = "retrain" if self.retrain else (self.granularity or "plain")
        return f"{name}-weighted" if self.weighted else name

    def module(self, device: torch.device) -> PEPEmbeddingBagCollection:
        return PEPEmbeddingBagCollection(
            tables(),
            granularity=self.granularity,
            retrain=self.retrain,
            gk=GK,
            s_decay=self.s_decay,
            s_push=self.s_push,
            is_weighted=self.weighted,
            device=device,
        )


def tables() -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=t, feature_names=list(fs), num_embeddings=n, embedding_dim=DIM, pooling=p)
        for t, fs, n, p in TABLES
    ]


def full_state(case: Case, seed: int = 0) -> dict[str, torch.Tensor]:
    """Unsharded state dict with thresholds that matter: |v| ~ 0.3, thresholds gk·σ(s) ∈ (0.03, 0.5)."""
    g = torch.Generator().manual_seed(seed)
    mode = case.mode
    state = {}
    for t, _, n, _ in TABLES:
        v = torch.randn(n, DIM, generator=g) * 0.4
        width = row_width(DIM, mode)
        if mode is ThresholdMode.ROW_DIM:
            tail = torch.rand(n, DIM, generator=g) * 4 - 3
        elif mode is ThresholdMode.ROW:
            tail = torch.cat([torch.rand(n, 1, generator=g) * 4 - 3, torch.zeros(n, width - DIM - 1)], dim=1)
        elif mode is ThresholdMode.MASK:
            tail = (torch.rand(n, DIM, generator=g) > 0.3).float()
        else:
            tail = torch.zeros(n, 0)
        state[f"_embedding_bag_collection.embedding_bags.{t}.weight"] = torch.cat([v, tail], dim=1)
    if mode is ThresholdMode.COARSE:
        size = DIM if case.granularity in ("dimension", "field_dim") else 1
        if case.granularity in ("global", "dimension"):
            state["threshold"] = torch.rand(size, generator=g) * 4 - 3
        else:
            for t in TABLE_NAMES:
                state[f"thresholds.{t}"] = torch.rand(size, generator=g) * 4 - 3
    return state


def rank_input(rank: int, weighted: bool = False) -> tuple[KeyedJaggedTensor, dict[str, torch.Tensor]]:
    """A multi-hot batch (empty bags, repeated ids, per-id weights if asked) and a random output
    gradient per feature."""
    g = torch.Generator().manual_seed(100 + rank)
    lengths, values = [], []
    for _, fs, n, _ in TABLES:
        for _ in fs:
            lens = torch.randint(0, 4, (BATCH,), generator=g)
            lengths.append(lens)
            values.append(torch.randint(0, n, (int(lens.sum()),), generator=g))
    ids = torch.cat(values)
    weights = torch.rand(ids.numel(), generator=g) + 0.5 if weighted else None
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=FEATURES, values=ids, lengths=torch.cat(lengths), weights=weights
    )
    grads = {f: torch.randn(BATCH, DIM, generator=g) for f in FEATURES}
    return kjt, grads


class PooledModel(nn.Module):
    """The PEP module as a child (so DMP's DDP wrapper owns the coarse thresholds), KJT → {key: [B, D]}."""

    def __init__(self, pep: nn.Module) -> None:
        super().__init__()
        self.pep = pep

    def forward(self, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        kt = self.pep(kjt)
        return {"keys": kt.keys(), **kt.to_dict()}


def sgd_sharders() -> list:
    return pep_sharders(fused_params(EmbeddingOptimizerConfig(name="sgd", lr=LR), "cpu"))


def shard(model: nn.Module, types: dict[str, str], sharders: list) -> tuple[Any, list]:
    constraints = {}
    for table, sharding_type in types.items():  # the trainer's constraints, then the PEP filter
        constraints.update(make_constraints([table], ShardingConfig(types=[sharding_type], min_partition=4)))
    constraints = pep_constraints(model, constraints)
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
    return dmp, [(r["table"], r["sharding_type"], r["shards"]) for r in report.tables()]


def state_pieces(state_dict: dict) -> dict[str, list]:
    return {
        k: [(tuple((s.start, s.stop) for s in idx), t.detach().numpy().copy()) for idx, t in local_pieces(v)]
        for k, v in state_dict.items()
    }


def assemble(results: list[dict], key: str, shape: tuple[int, ...]) -> np.ndarray:
    assembled = np.full(shape, np.nan, dtype=np.float32)
    for result in results:
        for index, piece in result["pieces"][key]:
            assembled[tuple(slice(a, b) for a, b in index)] = piece
    assert not np.isnan(assembled).any(), f"{key}: shards do not cover the tensor"
    return assembled
