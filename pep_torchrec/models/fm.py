"""FM (Rendle 2010) and DeepFM (Guo et al. 2017), as in the PEP authors' code (pytorch-fm layers).

Legend: B = examples, F = sparse fields, N = dense features, K = interacting fields
(F + N with `use_dense`, else F), D = embedding dim.

    FM:     logit = w0 + Σ_m w_m x_m + Σ_f w_f[id_f] + Σ_{i<j} <v_i, v_j>
    DeepFM: FM logit + MLP(concat_k v_k)

The field vectors v are the `ebc`'s pooled outputs plus, with `use_dense`, `x_m · u_m` for each dense
feature. The per-id first-order weights w_f live in `linear_ebc` (sharded like `ebc`, never pruned).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pep_torchrec.models.base import (
    MLP,
    CTRModel,
    DenseFieldEmbedding,
    GlobalBiasAndDenseLinear,
    _check_dropout,
    _check_positive_dims,
    fm_interaction,
)


class FM(CTRModel):
    """Factorization machine over the `ebc`'s fields (and, with `use_dense`, the dense features).

    Args:
        ebc, num_dense, embedding_dim: see `CTRModel`.
        use_dense: feed the dense features (as first-order terms and as interacting fields
            `x_m · u_m`); False ignores them. A no-op when num_dense == 0.

    Shapes: forward([B, N], KJT) → [B] logits.
    """

    def __init__(
        self,
        *,
        ebc: nn.Module,
        num_dense: int,
        embedding_dim: int | None = None,
        use_dense: bool = True,
    ) -> None:
        super().__init__(ebc=ebc, num_dense=num_dense, embedding_dim=embedding_dim)
        self.use_dense = bool(use_dense) and num_dense > 0
        num_used_dense = num_dense if self.use_dense else 0
        self.linear_ebc = self._build_linear_ebc()
        self.linear = GlobalBiasAndDenseLinear(num_used_dense)
        self.dense_embedding = DenseFieldEmbedding(num_dense, self.embedding_dim) if self.use_dense else None

    @property
    def num_fields(self) -> int:
        """K, the number of interacting fields."""
        return self.num_sparse + (self.num_dense if self.use_dense else 0)

    def field_embeddings(
        self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor
    ) -> torch.Tensor:
        """[B, K, D]: sparse fields in `feature_names` order, then dense fields."""
        emb_BFD = self.sparse_embeddings(sparse_features)
        if self.dense_embedding is None:
            return emb_BFD
        return torch.cat([emb_BFD, self.dense_embedding(dense_features)], dim=1)

    def first_order(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """[B]: w0 + Σ_m w_m x_m + Σ_f w_f[id_f]."""
        dense_BN = dense_features if self.use_dense else dense_features[:, :0]
        return self.linear(dense_BN) + self.sparse_linear(sparse_features)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Args: dense_features [B, N]; sparse_features KJT. Returns: logits [B]."""
        emb_BKD = self.field_embeddings(dense_features, sparse_features)
        return self.first_order(dense_features, sparse_features) + fm_interaction(emb_BKD)


class DeepFM(FM):
    """FM plus an MLP over the concatenated field vectors (shared embeddings, as in Guo et al.).

    Args:
        ebc, num_dense, embedding_dim, use_dense: see `FM`.
        mlp_dims: hidden widths of the deep part (the authors' Criteo/Avazu setting).
        dropout: dropout after each hidden layer (the authors' value).
        batch_norm: BatchNorm1d after each hidden linear layer (the authors' pytorch-fm MLP).

    Shapes: forward([B, N], KJT) → [B] logits.
    """

    def __init__(
        self,
        *,
        ebc: nn.Module,
        num_dense: int,
        embedding_dim: int | None = None,
        use_dense: bool = True,
        mlp_dims: Sequence[int] = (400, 400, 400),
        dropout: float = 0.2,
        batch_norm: bool = True,
    ) -> None:
        super().__init__(ebc=ebc, num_dense=num_dense, embedding_dim=embedding_dim, use_dense=use_dense)
        self.mlp = MLP(
            self.num_fields * self.embedding_dim,
            _check_positive_dims("mlp_dims", mlp_dims),
            dropout=_check_dropout("dropout", dropout),
            batch_norm=bool(batch_norm),
        )

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Args: dense_features [B, N]; sparse_features KJT. Returns: logits [B]."""
        emb_BKD = self.field_embeddings(dense_features, sparse_features)
        return (
            self.first_order(dense_features, sparse_features)
            + fm_interaction(emb_BKD)
            + self.mlp(emb_BKD.flatten(1))
        )
