"""Building blocks shared by the CTR models: the `CTRModel` base, table configs, MLPs, linear terms.

Legend: B = examples in the batch, F = sparse fields (one embedding table each), N = dense features,
K = interacting fields (F, plus N when dense features are embedded as fields), D = embedding dim,
T = linear-table width (`LINEAR_TABLE_DIM`).

Every model reads the embedding module passed in as `ebc` and nothing else about it: it calls
`self.ebc(kjt)` and reads the resulting KeyedTensor *by feature name*. That is the whole contract a
later stage relies on when it swaps in the PEP embedding module, and the reason sharded key orders
never matter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

# TorchRec's fused TBE kernels (table-wise, column-wise, table-column-wise; CPU included) assert that
# every local shard is a multiple of 4 columns wide (`_assert_local_cols_divisible_by_4` in
# torchrec/distributed/batched_embedding_kernel.py); a dim-1 table only shards as data_parallel.
# So the per-id scalar weights of the linear term live in column 0 of width-4 tables. Columns 1..3
# are never read, so they get zero gradient and stay at their zero init under SGD/Adagrad/Adam.
LINEAR_TABLE_DIM = 4
LINEAR_TABLE_PREFIX = "linear_"


class _SparseFeatureLike(Protocol):
    name: str
    cardinality: int


@dataclass(frozen=True)
class NormalInit:
    """Table init_fn: N(0, std²). A picklable object, because DMP re-runs init_fn on every shard."""

    std: float

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.nn.init.normal_(weight, mean=0.0, std=self.std)


def embedding_tables(
    schema_sparse_features: Iterable[_SparseFeatureLike],
    embedding_dim: int,
    *,
    prefix: str = "t_",
    init_std: float | None = None,
) -> list[EmbeddingBagConfig]:
    """One sum-pooled table per sparse field, named `prefix + field name`.

    Args:
        schema_sparse_features: the schema's `SparseFeature`s (anything with `name` and
            `cardinality`), in model order.
        embedding_dim: D, shared by all tables.
        prefix: table-name prefix; the feature name stays the field name.
        init_std: initialise each table N(0, init_std²); None keeps TorchRec's default, uniform
            ±sqrt(1/num_embeddings), which is large for small vocabularies.

    Returns:
        EmbeddingBagConfigs with `num_embeddings = cardinality` and `feature_names = [name]`.
    """
    if embedding_dim <= 0:
        raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
    tables = []
    for feature in schema_sparse_features:
        if feature.cardinality <= 0:
            raise ValueError(f"sparse feature {feature.name!r} has cardinality {feature.cardinality}")
        tables.append(
            EmbeddingBagConfig(
                name=f"{prefix}{feature.name}",
                embedding_dim=embedding_dim,
                num_embeddings=feature.cardinality,
                feature_names=[feature.name],
                init_fn=None if init_std is None else NormalInit(init_std),
            )
        )
    if not tables:
        raise ValueError("a model needs at least one sparse feature")
    return tables


def linear_tables(configs: Sequence[EmbeddingBagConfig]) -> list[EmbeddingBagConfig]:
    """The first-order tables of the FM family: one `linear_<table>` per embedding table.

    Same rows, feature names and pooling as the embedding tables, width `LINEAR_TABLE_DIM` (only
    column 0 is used, see above), zero init as in libFM/LR: the term starts neutral and every
    weight receives gradient from its first occurrence.
    """
    return [
        EmbeddingBagConfig(
            name=f"{LINEAR_TABLE_PREFIX}{config.name}",
            embedding_dim=LINEAR_TABLE_DIM,
            num_embeddings=config.num_embeddings,
            feature_names=list(config.feature_names),
            pooling=config.pooling,
            init_fn=nn.init.zeros_,
        )
        for config in configs
    ]


def _module_device(module: nn.Module) -> torch.device:
    device = getattr(module, "device", None)
    if isinstance(device, torch.device):
        return device
    for param in module.parameters():
        return param.device
    return torch.device("cpu")


class XavierLinear(nn.Linear):
    """`nn.Linear` with Xavier-uniform weights and zero bias.

    The init lives in `reset_parameters` (not applied once after construction) because
    DistributedModelParallel materialises meta-device modules by calling `reset_parameters()`:
    a one-off init would be replaced by PyTorch's Kaiming default there.
    """

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class MLP(nn.Module):
    """The PEP authors' (pytorch-fm) MLP: [Linear → BatchNorm → ReLU → Dropout] × L → Linear(1).

    Args:
        in_features: input width.
        hidden_dims: widths of the hidden layers (may be empty: a plain linear model).
        dropout: dropout probability after each hidden layer.
        batch_norm: BatchNorm1d after each hidden linear layer (as in the authors' code; the linear
            layer then has no bias of its own, BatchNorm's shift plays that role). Note that
            in training mode its batch statistics include every row of the batch, padding included.

    Shapes: forward([B, in_features]) → [B].
    """

    def __init__(
        self, in_features: int, hidden_dims: Sequence[int], *, dropout: float, batch_norm: bool
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for hidden in hidden_dims:
            # A bias before BatchNorm is cancelled by the mean subtraction (its gradient is 0).
            layers.append(XavierLinear(width, hidden, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(XavierLinear(width, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x_BI: torch.Tensor) -> torch.Tensor:
        return self.layers(x_BI).squeeze(-1)


class DenseFieldEmbedding(nn.Module):
    """Dense features as interacting fields: field m's vector is `x_m · v_m` (Song et al. 2019, §4.2).

    This lets FM, DeepFM and AutoInt use real-valued inputs exactly like the original FM treats
    non-binary features. The vectors are dense (replicated) parameters: they are not pruned and
    not counted as embedding parameters.

    Args:
        num_dense: N.
        embedding_dim: D.

    Shapes: forward([B, N]) → [B, N, D].
    """

    def __init__(self, num_dense: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_dense, embedding_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Small, like an embedding row: x_m can be O(10) after log1p, so an Xavier-sized vector
        # would dominate the pairwise term at step 0.
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, dense_BN: torch.Tensor) -> torch.Tensor:
        return dense_BN.unsqueeze(-1) * self.weight


class GlobalBiasAndDenseLinear(nn.Module):
    """`w0 + Σ_m w_m x_m`: the bias and the dense half of the FM first-order term.

    (The sparse half, per-id weights, lives in the model's `linear_ebc` so it can be sharded.)
    Zero init, as in libFM / logistic regression.

    Args:
        num_dense: N (0: bias only).

    Shapes: forward([B, N]) → [B].
    """

    def __init__(self, num_dense: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.empty(1))
        self.dense_weight = nn.Parameter(torch.empty(num_dense)) if num_dense > 0 else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.bias)
        if self.dense_weight is not None:
            nn.init.zeros_(self.dense_weight)

    def forward(self, dense_BN: torch.Tensor) -> torch.Tensor:
        out_B = self.bias.expand(dense_BN.shape[0])
        if self.dense_weight is not None:
            out_B = out_B + dense_BN @ self.dense_weight
        return out_B


def fm_interaction(emb_BKD: torch.Tensor) -> torch.Tensor:
    """FM's second-order term Σ_{i<j} <v_i, v_j> via ½((Σ_k v_k)² − Σ_k v_k²), summed over D.

    Args:
        emb_BKD: [B, K, D] field vectors.

    Returns:
        [B] pairwise-interaction logits.
    """
    sum_BD = emb_BKD.sum(dim=1)
    sum_of_squares_BD = (emb_BKD * emb_BKD).sum(dim=1)
    return 0.5 * (sum_BD * sum_BD - sum_of_squares_BD).sum(dim=1)


def _check_positive_dims(option: str, dims: Sequence[int], *, allow_empty: bool = True) -> tuple[int, ...]:
    if isinstance(dims, (int, str)) or not all(isinstance(d, int) and d > 0 for d in dims):
        raise ValueError(f"{option} must be a list of positive ints, got {dims!r}")
    if not dims and not allow_empty:
        raise ValueError(f"{option} must not be empty")
    return tuple(dims)


def _check_dropout(option: str, p: float) -> float:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{option} must be in [0, 1), got {p!r}")
    return float(p)


class CTRModel(nn.Module):
    """Base of every CTR model: owns `ebc`, knows the field order, returns logits.

    Args:
        ebc: the embedding module: KJT in, KeyedTensor of [B, D] per feature out; an
            EmbeddingBagCollection or a drop-in replacement with `embedding_bag_configs()`.
            All fields share one output width D. It may live on the meta device (DMP
            materialises it); dense layers are built on the current default device.
        num_dense: N, the width of `dense_features` (0 when the dataset has none).
        embedding_dim: D, the width of each pooled output. Default: the tables' `embedding_dim`.
            Pass it when `ebc` declares wider rows than it outputs (PEP stores [v|s] rows).

    Attributes:
        ebc: the embedding module (the only one that is pruned / counted as embedding parameters).
        linear_ebc: per-id first-order weights (FM, DeepFM), else None.
        feature_names: sparse field names in model order (the tables' order).
        num_dense, embedding_dim: as above.
    """

    def __init__(self, *, ebc: nn.Module, num_dense: int, embedding_dim: int | None = None) -> None:
        super().__init__()
        if num_dense < 0:
            raise ValueError(f"num_dense must be >= 0, got {num_dense}")
        configs = list(ebc.embedding_bag_configs())
        if not configs:
            raise ValueError("ebc has no tables")
        if embedding_dim is None:
            dims = {config.embedding_dim for config in configs}
            if len(dims) != 1:
                raise ValueError(f"all tables must share one embedding_dim, got {sorted(dims)}")
            embedding_dim = dims.pop()
        if embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
        self.ebc = ebc
        self.linear_ebc: EmbeddingBagCollection | None = None
        self.num_dense = num_dense
        self.embedding_dim = embedding_dim
        self.feature_names: list[str] = [name for config in configs for name in config.feature_names]

    @property
    def num_sparse(self) -> int:
        """F, the number of sparse fields."""
        return len(self.feature_names)

    def _build_linear_ebc(self) -> EmbeddingBagCollection:
        return EmbeddingBagCollection(
            tables=linear_tables(self.ebc.embedding_bag_configs()), device=_module_device(self.ebc)
        )

    def sparse_embeddings(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        """Pooled field vectors, [B, F, D], stacked by feature name (never by key position)."""
        pooled = self.ebc(kjt).to_dict()
        return torch.stack([pooled[name] for name in self.feature_names], dim=1)

    def sparse_linear(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        """Σ_f w_f[ids of f] over the sparse fields, [B]; needs `linear_ebc`."""
        assert self.linear_ebc is not None, "model has no linear_ebc"
        pooled = self.linear_ebc(kjt).to_dict()
        weights_BF = torch.cat([pooled[name][:, :1] for name in self.feature_names], dim=1)
        return weights_BF.sum(dim=1)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Args: dense_features [B, N]; sparse_features KJT keyed by `feature_names`.
        Returns: logits [B]."""
        raise NotImplementedError


def replace_linears_with_xavier(module: nn.Module) -> None:
    """Swap every plain `nn.Linear` below `module` for an equivalent `XavierLinear` (fresh init)."""
    for name, child in module.named_children():
        if type(child) is nn.Linear:
            replacement = XavierLinear(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                device=child.weight.device,
                dtype=child.weight.dtype,
            )
            setattr(module, name, replacement)
        else:
            replace_linears_with_xavier(child)


def with_config_dim(configs: Sequence[EmbeddingBagConfig], embedding_dim: int) -> list[EmbeddingBagConfig]:
    """Copies of `configs` declaring `embedding_dim` (what a consumer of the pooled output sees)."""
    return [dataclasses.replace(config, embedding_dim=embedding_dim) for config in configs]
