"""The model a run config describes: the configured CTR model over its embedding module (a plain
`EmbeddingBagCollection` for the baseline, `PEPEmbeddingBagCollection` for search and retrain),
wrapped in `TrainModel`. Training, export (which rebuilds a run's model to load its checkpoint) and
the dry-run planner build it here.
"""

from __future__ import annotations

import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from pep_torchrec.config import RunConfig
from pep_torchrec.data.schema import Schema
from pep_torchrec.distributed.s_optimizer import SOptimizerSettings
from pep_torchrec.models import TrainModel, build_model, embedding_tables
from pep_torchrec.modules import PEPEmbeddingBagCollection

PEP_STAGES = ("search", "retrain")
"""The stages whose tables are PEP tables (`train.stage`; the baseline's are plain)."""


def build_train_model(
    cfg: RunConfig, schema: Schema, *, embedding_device: torch.device, dense_device: torch.device
) -> TrainModel:
    """The unsharded model: one EBC table per sparse feature (on `embedding_device`, usually meta so
    the full tables are never allocated before sharding), dense parts on `dense_device`."""
    tables = embedding_tables(schema.sparse_features, cfg.model.embedding_dim, init_std=cfg.model.init_std)
    if cfg.train.stage in PEP_STAGES:
        ebc = PEPEmbeddingBagCollection(
            tables,
            granularity=cfg.pep.granularity,
            s0=cfg.pep.s0,
            gk=cfg.pep.gk,
            s_decay=cfg.pep.s_decay,
            s_push=cfg.pep.s_push,
            retrain=cfg.train.stage == "retrain",
            device=embedding_device,
        )
        if cfg.pep.s_optimizer == "sgd":  # read by the sharder (ShardedPEPEmbeddingBagCollection)
            ebc.s_optimizer = SOptimizerSettings(lr=cfg.pep.s_lr, norm=cfg.pep.s_norm)
    else:
        ebc = EmbeddingBagCollection(tables=tables, device=embedding_device)
    with torch.device(dense_device):
        model = build_model(
            cfg.model.name, ebc=ebc, num_dense=len(schema.dense_features), **cfg.model.options
        )
    return TrainModel(model)
