"""The PEP shardings: one subclass per stock pooled sharding TorchRec builds a sharded EBC with
(table-wise, row-wise, table-row-wise, column-wise, table-column-wise), each creating PEP lookups
(`pep_lookup.py`) and reporting PEP output widths; `PEP_SHARDINGS` maps a sharding type to its class.

TorchRec's counterparts: torchrec/distributed/sharding/{tw,rw,twrw,cw,twcw}_sharding.py. Created by
`ShardedPEPInnerEmbeddingBagCollection.create_embedding_bag_sharding` (`pep_embeddingbag.py`, where
the whole chain is drawn).

Output widths: a `[v | s]` table of width W pools to D columns, and only those cross ranks (the
output all-to-all / reduce-scatter sizes come from `embedding_dims()` / `_dim_sum_per_rank()` /
`_emb_dim_per_rank_per_feature()` / `_dim_sum_per_node()` / `_emb_dim_per_node_per_feature()`, which
TorchRec derives from `GroupedEmbeddingConfig.embedding_dims()` (= the tables' local_cols); we return
D instead).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torchrec.distributed.embedding_types import (
    BaseEmbeddingLookup,
    BaseGroupedFeatureProcessor,
    GroupedEmbeddingConfig,
)
from torchrec.distributed.sharding.cw_sharding import CwPooledEmbeddingSharding
from torchrec.distributed.sharding.rw_sharding import RwPooledEmbeddingSharding
from torchrec.distributed.sharding.tw_sharding import TwPooledEmbeddingSharding
from torchrec.distributed.sharding.twcw_sharding import TwCwPooledEmbeddingSharding
from torchrec.distributed.sharding.twrw_sharding import TwRwPooledEmbeddingSharding
from torchrec.distributed.types import ShardingType

from pep_torchrec.distributed.pep_kernel import PEPTableSpec
from pep_torchrec.distributed.pep_lookup import PEPGroupedPooledEmbeddingsLookup

# One subclass per stock pooled sharding: `create_lookup` is copied from the stock class with our
# lookup swapped in (tw_sharding.py:438, rw_sharding.py:693, twrw_sharding.py:704, cw_sharding.py:280;
# TwCw inherits Cw's), and the output-width methods report D for whole-row tables.


class _PEPShardingMixin:
    """What every PEP sharding adds to its TorchRec base: the tables' PEP specs, PEP lookups, and
    output widths of D (not the stored width W).

    `create_lookup` is the stock one of each base with `PEPGroupedPooledEmbeddingsLookup` in place
    of `GroupedPooledEmbeddingsLookup`; a subclass names only what differs between the bases: the
    `sharding_type` its lookup is told and which grouped configs are this rank's (`_lookup_configs`).
    """

    _lookup_sharding_type: ShardingType | None = None

    def __init__(self, *args: Any, pep_specs: Mapping[str, PEPTableSpec], **kwargs: Any) -> None:
        self._pep_specs = pep_specs
        super().__init__(*args, **kwargs)

    def _lookup_configs(self) -> list[GroupedEmbeddingConfig]:
        return self._grouped_embedding_configs

    def create_lookup(
        self,
        device: torch.device | None = None,
        fused_params: dict[str, Any] | None = None,
        feature_processor: BaseGroupedFeatureProcessor | None = None,
    ) -> BaseEmbeddingLookup:
        kwargs = {} if self._lookup_sharding_type is None else {"sharding_type": self._lookup_sharding_type}
        return PEPGroupedPooledEmbeddingsLookup(
            grouped_configs=self._lookup_configs(),
            pep_specs=self._pep_specs,
            pg=self._pg,
            device=device if device is not None else self._device,
            feature_processor=feature_processor,
            env=self._env,
            **kwargs,
        )

    def _pep_output_dims(self, grouped_config: GroupedEmbeddingConfig) -> list[int]:
        """Per feature of `grouped_config`: the pooled width its kernel returns (replaces
        `GroupedEmbeddingConfig.embedding_dims()`, embedding_types.py:303)."""
        return [
            self._pep_specs[table.name].output_cols(table.local_cols)
            for table in grouped_config.embedding_tables
            for _ in range(table.num_features())
        ]

    def _pep_dims(self, groups: list[list[GroupedEmbeddingConfig]]) -> list[list[int]]:
        """Per rank (or node) of `groups`: the output width of each of its features."""
        return [[d for c in configs for d in self._pep_output_dims(c)] for configs in groups]


class PEPTwPooledEmbeddingSharding(_PEPShardingMixin, TwPooledEmbeddingSharding):
    # Output widths (tw_sharding.py:194-217).
    def _dim_sum_per_rank(self) -> list[int]:
        return [sum(dims) for dims in self._pep_dims(self._grouped_embedding_configs_per_rank)]

    def _emb_dim_per_rank_per_feature(self) -> list[list[int]]:
        return self._pep_dims(self._grouped_embedding_configs_per_rank)

    def embedding_dims(self) -> list[int]:
        return [d for dims in self._pep_dims(self._grouped_embedding_configs_per_rank) for d in dims]


class PEPRwPooledEmbeddingSharding(_PEPShardingMixin, RwPooledEmbeddingSharding):
    _lookup_sharding_type = ShardingType.ROW_WISE

    # Output widths (rw_sharding.py:272).
    def embedding_dims(self) -> list[int]:
        return [d for c in self._grouped_embedding_configs for d in self._pep_output_dims(c)]


class PEPTwRwPooledEmbeddingSharding(_PEPShardingMixin, TwRwPooledEmbeddingSharding):
    _lookup_sharding_type = ShardingType.TABLE_ROW_WISE

    def _lookup_configs(self) -> list[GroupedEmbeddingConfig]:
        return self._grouped_embedding_configs_per_rank[self._rank]

    # Output widths (twrw_sharding.py:237-291).
    def embedding_dims(self) -> list[int]:
        return [d for dims in self._pep_dims(self._grouped_embedding_configs_per_node) for d in dims]

    def _dim_sum_per_node(self) -> list[int]:
        return [sum(dims) for dims in self._pep_dims(self._grouped_embedding_configs_per_node)]

    def _emb_dim_per_node_per_feature(self) -> list[list[int]]:
        return self._pep_dims(self._grouped_embedding_configs_per_node)


class PEPCwPooledEmbeddingSharding(_PEPShardingMixin, CwPooledEmbeddingSharding):
    """Column-wise: coarse / plain tables only (a column shard of v pools to its own columns, so the
    stock output widths are already right)."""


class PEPTwCwPooledEmbeddingSharding(PEPCwPooledEmbeddingSharding, TwCwPooledEmbeddingSharding):
    """Table-column-wise: as column-wise (TwCwPooledEmbeddingSharding adds nothing to Cw's lookup)."""


PEP_SHARDINGS: dict[str, type] = {
    ShardingType.TABLE_WISE.value: PEPTwPooledEmbeddingSharding,
    ShardingType.ROW_WISE.value: PEPRwPooledEmbeddingSharding,
    ShardingType.TABLE_ROW_WISE.value: PEPTwRwPooledEmbeddingSharding,
    ShardingType.COLUMN_WISE.value: PEPCwPooledEmbeddingSharding,
    ShardingType.TABLE_COLUMN_WISE.value: PEPTwCwPooledEmbeddingSharding,
}

# The Cw shardings take `permute_embeddings` (embeddingbag.py:1000-1017); the others do not.
SHARDINGS_WITH_PERMUTE = frozenset({ShardingType.COLUMN_WISE.value, ShardingType.TABLE_COLUMN_WISE.value})
