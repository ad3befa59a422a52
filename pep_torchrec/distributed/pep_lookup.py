"""The PEP grouped lookup: TorchRec's `GroupedPooledEmbeddingsLookup` building PEP kernels
(`pep_kernel.py`), and the gradient factor its output dist divides by.

TorchRec's counterpart: torchrec/distributed/embedding_lookup.py. Created by the shardings'
`create_lookup` (`pep_sharding.py`); the chain is drawn in `pep_embeddingbag.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torchrec.distributed.comm_ops import get_gradient_division
from torchrec.distributed.embedding_lookup import GroupedPooledEmbeddingsLookup
from torchrec.distributed.embedding_types import EmbeddingComputeKernel, GroupedEmbeddingConfig
from torchrec.distributed.types import ShardingEnv, ShardingType

from pep_torchrec.distributed.pep_kernel import PEPBatchedFusedEmbeddingBag, PEPTableSpec


def gradient_scale_factor(pg: dist.ProcessGroup | None) -> int:
    """The factor TorchRec's output all-to-all / reduce-scatter divides routed gradients by: the
    world size when gradient division is on (the default), else 1.

    Mirrors `GroupedPooledEmbeddingsLookup._scale_gradient_factor` (embedding_lookup.py:676), which
    TorchRec uses to scale the gradient of data-parallel per-sample weights back up.
    """
    return dist.get_world_size(pg) if get_gradient_division() else 1


class PEPGroupedPooledEmbeddingsLookup(GroupedPooledEmbeddingsLookup):
    """TorchRec's pooled lookup, building PEP kernels (`_create_embedding_kernel` is the hook:
    embedding_lookup.py:686, called from `__init__` once per group of tables)."""

    def __init__(self, *args: Any, pep_specs: Mapping[str, PEPTableSpec], **kwargs: Any) -> None:
        # Set before nn.Module.__init__ (a plain attribute, allowed) because the base __init__
        # already calls `_create_embedding_kernel`.
        self._pep_specs = pep_specs
        super().__init__(*args, **kwargs)

    def _create_embedding_kernel(
        self,
        config: GroupedEmbeddingConfig,
        device: torch.device | None,
        pg: dist.ProcessGroup | None,
        sharding_type: ShardingType | None,
        env: ShardingEnv | None,
    ) -> PEPBatchedFusedEmbeddingBag:
        names = [table.name for table in config.embedding_tables]
        if getattr(env, "sharding_strategy", None) is not None:
            # ShardingEnv2D (2D / fully-sharded parallelism) builds a different kernel class.
            raise ValueError(f"tables {names}: PEP tables do not support 2D parallel sharding envs")
        if config.compute_kernel == EmbeddingComputeKernel.FUSED:
            return PEPBatchedFusedEmbeddingBag(
                config, pg=pg, device=device, sharding_type=sharding_type, env=env, pep_specs=self._pep_specs
            )
        raise ValueError(
            f"tables {names}: compute kernel {config.compute_kernel.value!r} is not supported for PEP "
            "tables; use 'fused' (the TBE that applies the optimizer to v and s in backward)"
        )
