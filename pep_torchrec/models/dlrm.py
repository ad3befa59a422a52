"""DLRM (Naumov et al. 2019): TorchRec's `torchrec.models.dlrm.DLRM` behind the `CTRModel` interface.

Legend: B = examples, F = sparse fields, N = dense features, D = embedding dim.

    bottom MLP: dense [B, N] → [B, D];  interactions: pairwise dots of the F + 1 vectors;
    top MLP: [B, D + F + F·(F−1)/2] → [B, 1]

TorchRec's DLRM owns its EBC inside `sparse_arch`. We keep the embedding module at `self.ebc` (the FQN
every stage relies on: `ebc.embedding_bags.<table>.weight`) and give DLRM a parameter-free
`sparse_arch` that passes our already-stacked [B, F, D] through, so DLRM's own forward, DenseArch,
InteractionArch and OverArch run unchanged and no module is registered twice.

Datasets without dense features (and `use_dense=False`): DLRM needs a dense input, so the model feeds
a constant 1.0 column (N' = 1). The bottom MLP then learns a constant [D] vector that interacts with
every field: a learned bias vector, which is what DLRM degenerates to without dense inputs.

Meta-device construction works: InteractionArch's `triu_indices` buffer (which DMP would otherwise
materialise as zeros, having no parameter to reset) is rebuilt on CPU at construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec.models.dlrm import DLRM
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pep_torchrec.models.base import (
    CTRModel,
    _check_positive_dims,
    replace_linears_with_xavier,
    with_config_dim,
)


class _StackedSparseArch(nn.Module):
    """Stands in for DLRM's SparseArch: the embeddings are looked up (by name) before DLRM runs."""

    def forward(self, emb_BFD: torch.Tensor) -> torch.Tensor:
        return emb_BFD


class _ConfigView:
    """What DLRM's constructor reads from an EBC (`embedding_bag_configs()`), at the output width D."""

    def __init__(self, configs: list) -> None:
        self._configs = configs

    def embedding_bag_configs(self) -> list:
        return self._configs


class DLRMModel(CTRModel):
    """TorchRec's DLRM reading its embeddings from `self.ebc`.

    Args:
        ebc, num_dense, embedding_dim: see `CTRModel`.
        use_dense: feed the dense features to the bottom MLP; False (or num_dense == 0) feeds a
            constant 1.0 column instead.
        bottom_mlp_dims: hidden widths of the bottom (dense) MLP; a final layer of width D is
            appended (DLRM's Criteo setting 512-256-64, then D).
        top_mlp_dims: hidden widths of the top (over) MLP, at least one; a final layer of width 1
            is appended (DLRM's Criteo setting 512-256, then 1).

    All linear layers use Xavier-uniform weights and zero biases (TorchRec's are PyTorch-default).

    Shapes: forward([B, N], KJT) → [B] logits.
    """

    def __init__(
        self,
        *,
        ebc: nn.Module,
        num_dense: int,
        embedding_dim: int | None = None,
        use_dense: bool = True,
        bottom_mlp_dims: Sequence[int] = (512, 256, 64),
        top_mlp_dims: Sequence[int] = (512, 256),
    ) -> None:
        super().__init__(ebc=ebc, num_dense=num_dense, embedding_dim=embedding_dim)
        bottom = _check_positive_dims("bottom_mlp_dims", bottom_mlp_dims)
        top = _check_positive_dims("top_mlp_dims", top_mlp_dims, allow_empty=False)
        self.use_dense = bool(use_dense) and num_dense > 0
        configs = with_config_dim(list(ebc.embedding_bag_configs()), self.embedding_dim)
        self.dlrm = DLRM(
            embedding_bag_collection=_ConfigView(configs),  # read for shapes only, then replaced
            dense_in_features=num_dense if self.use_dense else 1,
            dense_arch_layer_sizes=[*bottom, self.embedding_dim],
            over_arch_layer_sizes=[*top, 1],
        )
        self.dlrm.sparse_arch = _StackedSparseArch()
        replace_linears_with_xavier(self.dlrm)
        triu_indices = self.dlrm.inter_arch.triu_indices
        if triu_indices.is_meta:
            # Built under `torch.device("meta")`: DMP would materialise this (parameter-free, so never
            # reset) buffer as zeros, silently wiring every interaction to the dense·dense product.
            # Constants belong on a real device; DMP/`.to()` moves it with the module.
            self.dlrm.inter_arch.triu_indices = torch.triu_indices(
                self.num_sparse + 1, self.num_sparse + 1, offset=1, device="cpu"
            )

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Args: dense_features [B, N]; sparse_features KJT. Returns: logits [B]."""
        if self.use_dense:
            dense_BN = dense_features
        else:
            # Shape-only, no data-dependent Python: works under DMP, tracing and any batch size.
            dense_BN = dense_features.new_ones(dense_features.shape[0], 1)
        return self.dlrm(dense_BN, self.sparse_embeddings(sparse_features)).squeeze(-1)
