"""AutoInt (Song et al. 2019): multi-head self-attentive interacting layers, optionally + DNN (AutoInt+).

Legend: B = examples, F = sparse fields, N = dense features, K = interacting fields
(F + N with `use_dense`, else F), D = embedding dim, A = attention width (all heads), H = heads,
A/H = per-head width.

    e⁰ = field vectors [B, K, D]
    eˡ = ReLU(concat_h Σ_k softmax_k(<W_Q^h e_i, W_K^h e_k> / sqrt(A/H)) W_V^h e_k  +  W_res eˡ⁻¹)
    logit = Linear(flatten(e^L)) [+ MLP(flatten(e⁰)) with use_dnn]

Choices (the paper and the PEP authors' code differ in small ways):
- No first-order (linear) term and no FM part: neither Song et al. nor the authors' AutoInt forward
  has one (their class inherits DeepFM's linear layer but never calls it). So `linear_ebc` is None.
- Residual + ReLU in *every* layer, as in the paper's Eq. 8 (the authors' code adds one residual
  after the last layer). Q/K/V projections have no bias, as in the paper.
- Attention logits are scaled by 1/sqrt(A/H), as in the authors' `nn.MultiheadAttention`; it keeps
  softmax from saturating at init for larger heads.
- Defaults are the authors' (3 layers, 2 heads, A = 64, AutoInt+ with a 400-400-400 DNN).
- Dense features enter as fields `x_m · u_m` (the paper's §4.2 numerical-feature embedding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pep_torchrec.models.base import (
    MLP,
    CTRModel,
    DenseFieldEmbedding,
    XavierLinear,
    _check_dropout,
    _check_positive_dims,
)


class InteractingLayer(nn.Module):
    """One multi-head self-attention layer over fields, with residual projection and ReLU.

    Args:
        in_dim: width of each input field vector.
        attention_dim: A, output width (H heads of A/H each).
        num_heads: H.
        dropout: dropout on the attention weights.
        use_residual: add `W_res · input` before the ReLU.

    Shapes: forward([B, K, in_dim]) → [B, K, A].
    """

    def __init__(
        self, in_dim: int, attention_dim: int, num_heads: int, *, dropout: float, use_residual: bool
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = attention_dim // num_heads
        self.dropout = dropout
        self.query = XavierLinear(in_dim, attention_dim, bias=False)
        self.key = XavierLinear(in_dim, attention_dim, bias=False)
        self.value = XavierLinear(in_dim, attention_dim, bias=False)
        self.residual = XavierLinear(in_dim, attention_dim, bias=False) if use_residual else None

    def _split_heads(self, x_BKA: torch.Tensor) -> torch.Tensor:
        # [B, K, A] → [B, H, K, A/H]; -1 rather than B keeps this batch-size agnostic.
        return x_BKA.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, x_BKI: torch.Tensor) -> torch.Tensor:
        q_BHKd = self._split_heads(self.query(x_BKI))
        k_BHKd = self._split_heads(self.key(x_BKI))
        v_BHKd = self._split_heads(self.value(x_BKI))
        out_BHKd = F.scaled_dot_product_attention(
            q_BHKd, k_BHKd, v_BHKd, dropout_p=self.dropout if self.training else 0.0
        )
        out_BKA = out_BHKd.transpose(1, 2).flatten(2)
        if self.residual is not None:
            out_BKA = out_BKA + self.residual(x_BKI)
        return F.relu(out_BKA)


class AutoInt(CTRModel):
    """AutoInt / AutoInt+ over the `ebc`'s fields.

    Args:
        ebc, num_dense, embedding_dim: see `CTRModel`.
        use_dense: embed the dense features as fields `x_m · u_m`; False ignores them.
        num_layers: interacting layers (≥ 1).
        num_heads: attention heads per layer; must divide `attention_dim`.
        attention_dim: A, each layer's output width summed over heads.
        attention_dropout: dropout on attention weights.
        use_residual: residual projection in every interacting layer.
        use_dnn: AutoInt+: add an MLP over the concatenated field vectors (the authors' `full_part`).
        mlp_dims, dropout, batch_norm: the DNN (as in `DeepFM`); ignored without `use_dnn`.

    Shapes: forward([B, N], KJT) → [B] logits.
    """

    def __init__(
        self,
        *,
        ebc: nn.Module,
        num_dense: int,
        embedding_dim: int | None = None,
        use_dense: bool = True,
        num_layers: int = 3,
        num_heads: int = 2,
        attention_dim: int = 64,
        attention_dropout: float = 0.0,
        use_residual: bool = True,
        use_dnn: bool = True,
        mlp_dims: Sequence[int] = (400, 400, 400),
        dropout: float = 0.2,
        batch_norm: bool = True,
    ) -> None:
        super().__init__(ebc=ebc, num_dense=num_dense, embedding_dim=embedding_dim)
        for option, value in (
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("attention_dim", attention_dim),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{option} must be a positive int, got {value!r}")
        if attention_dim % num_heads != 0:
            raise ValueError(f"attention_dim ({attention_dim}) must be divisible by num_heads ({num_heads})")
        attention_dropout = _check_dropout("attention_dropout", attention_dropout)
        self.use_dense = bool(use_dense) and num_dense > 0
        self.dense_embedding = DenseFieldEmbedding(num_dense, self.embedding_dim) if self.use_dense else None
        num_fields = self.num_sparse + (num_dense if self.use_dense else 0)
        self.interacting_layers = nn.ModuleList(
            InteractingLayer(
                self.embedding_dim if i == 0 else attention_dim,
                attention_dim,
                num_heads,
                dropout=attention_dropout,
                use_residual=bool(use_residual),
            )
            for i in range(num_layers)
        )
        self.attention_output = XavierLinear(num_fields * attention_dim, 1)
        self.mlp = (
            MLP(
                num_fields * self.embedding_dim,
                _check_positive_dims("mlp_dims", mlp_dims),
                dropout=_check_dropout("dropout", dropout),
                batch_norm=bool(batch_norm),
            )
            if use_dnn
            else None
        )

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Args: dense_features [B, N]; sparse_features KJT. Returns: logits [B]."""
        emb_BKD = self.sparse_embeddings(sparse_features)
        if self.dense_embedding is not None:
            emb_BKD = torch.cat([emb_BKD, self.dense_embedding(dense_features)], dim=1)
        x_BKA = emb_BKD
        for layer in self.interacting_layers:
            x_BKA = layer(x_BKA)
        logits_B = self.attention_output(x_BKA.flatten(1)).squeeze(-1)
        if self.mlp is not None:
            logits_B = logits_B + self.mlp(emb_BKD.flatten(1))
        return logits_B
