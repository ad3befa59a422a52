"""Unsharded PEP embedding modules: the semantics the sharded modules in `pep_torchrec.distributed`
reproduce."""

from pep_torchrec.config import GRANULARITIES, canonical_granularity
from pep_torchrec.modules.pep_embedding_modules import (
    COARSE_GRANULARITIES,
    ROW_GRANULARITIES,
    PEPEmbeddingBagCollection,
    PEPInitFn,
    pep_reference_pooled,
    stored_width,
    threshold_mode,
)

__all__ = [
    "COARSE_GRANULARITIES",
    "GRANULARITIES",
    "ROW_GRANULARITIES",
    "PEPEmbeddingBagCollection",
    "PEPInitFn",
    "canonical_granularity",
    "pep_reference_pooled",
    "stored_width",
    "threshold_mode",
]
