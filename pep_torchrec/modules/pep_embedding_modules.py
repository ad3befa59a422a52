"""`PEPEmbeddingBagCollection`: an EmbeddingBagCollection whose embedding sizes are learned (PEP).

Legend: R = rows of a table (num_embeddings), D = logical embedding dim, W = stored row width,
N = looked-up ids of a feature in the batch, B = bags (batch size).

PEP (Liu et al., "Learnable Embedding Sizes for Recommender Systems", ICLR 2021) replaces each
embedding element v by v̂ = sign(v)·relu(|v| − gk·sigmoid(s)) with learnable threshold logits s;
elements whose threshold overtakes them are pruned. This is the *unsharded* module: it defines the
semantics that the sharded module (`pep_torchrec.distributed`) must reproduce.

Where s lives (docs/architecture.md, decision 1):
  * row granularities (`feature`, `feature_dim`) store s inside the table row: the stock TorchRec
    `EmbeddingBagCollection` at `self._embedding_bag_collection` holds [v | s] rows (width 2D, or
    D + 4 with s in column D), so the planner, DMP, fused optimizers, state_dict and DCP see an
    ordinary, wider table and update v and s together;
  * coarse granularities (`global`, `dimension`, `field`, `field_dim`) keep s in small parameters on
    this module (`threshold` / `thresholds`), replicated when sharded;
  * `retrain=True` (lottery ticket, decision 6) stores [v | m] rows with a fixed 0/1 mask m and
    turns the thresholds off; `granularity=None` stores plain [v] rows (no thresholds: baseline).

Each forward gathers only the looked-up rows and calls `pep_torchrec.ops.threshold_pool` (threshold
+ pool), so a step costs ∝ ids in the batch, never ∝ table rows (decision 2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollection,
    get_embedding_names_by_table,
    process_pooled_embeddings,
    reorder_inverse_indices,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor
from torchrec.sparse.tensor_dict import maybe_td_to_kjt

from pep_torchrec.config import canonical_granularity
from pep_torchrec.ops import ThresholdMode, row_width, threshold_pool
from pep_torchrec.ops import margins as margins_op

COARSE_GRANULARITIES = ("global", "dimension", "field", "field_dim")
ROW_GRANULARITIES = ("feature", "feature_dim")

# Rows per chunk when scanning a whole table (margins / kept counts): bounds the temporary memory
# at eval time to a few MB per table whatever R is.
_SCAN_CHUNK_ROWS = 1 << 16

_POOLING_NAMES = {PoolingType.SUM: "sum", PoolingType.MEAN: "mean"}


def threshold_mode(granularity: str | None, retrain: bool = False) -> ThresholdMode:
    """The op mode of a table: MASK when retraining, NONE without granularity, else by granularity."""
    if retrain:
        return ThresholdMode.MASK
    if granularity is None:
        return ThresholdMode.NONE
    granularity = canonical_granularity(granularity)
    if granularity == "feature_dim":
        return ThresholdMode.ROW_DIM
    if granularity == "feature":
        return ThresholdMode.ROW
    return ThresholdMode.COARSE


def stored_width(dim: int, granularity: str | None, retrain: bool = False) -> int:
    """W, the width TorchRec sees for a PEP table of dim D: 2D (feature_dim or retrain), D + 4
    (feature), D (coarse granularities, or no thresholds)."""
    return row_width(dim, threshold_mode(granularity, retrain))


@dataclasses.dataclass(frozen=True)
class PEPInitFn:
    """The `init_fn` of a stored PEP table: writes [v_init | s0], [v_init | s0 | 0 0 0], [v_init | 1]
    (retrain) or [v_init] into the tensor it is given, in place.

    DMP re-runs each table's init_fn on every shard (`reset_parameters()`), so the whole [v | s]
    layout must come from here, not from a one-off init after construction. It receives the local
    shard: a row shard [R_shard, W] is handled like a whole table; in the coarse / plain modes every
    column is v, so column shards work too. A column shard of a [v | s] or [v | m] table cannot know
    which columns it holds, so it is refused (such tables must not be column-wise sharded).

    Attributes:
        v_init: the logical table's init_fn (TorchRec's default: uniform ±sqrt(1/R)), applied to v.
        dim: D.
        mode: the table's `ThresholdMode`.
        s0: the initial threshold logit.
    """

    v_init: Callable[[Tensor], Tensor | None]
    dim: int
    mode: ThresholdMode
    s0: float

    def __call__(self, weight: Tensor) -> Tensor:
        if weight.dim() != 2:
            raise ValueError(f"PEP init_fn expects a [rows, columns] tensor, got shape {tuple(weight.shape)}")
        with torch.no_grad():
            if self.mode in (ThresholdMode.COARSE, ThresholdMode.NONE):
                self.v_init(weight)
                return weight
            width = row_width(self.dim, self.mode)
            if weight.shape[1] != width:
                raise ValueError(
                    f"PEP init_fn got a {weight.shape[1]}-column tensor for a table stored as "
                    f"{width} columns ([v | s] or [v | m], mode {self.mode.value!r}): column-wise "
                    "sharding would split v from its thresholds/mask; shard such tables table-wise, "
                    "row-wise or data-parallel"
                )
            self.v_init(weight[:, : self.dim])
            tail = weight[:, self.dim :]
            if self.mode is ThresholdMode.MASK:
                tail.fill_(1.0)
            else:
                # ROW_DIM: every tail column is s; ROW: s in the first, pad columns stay exactly 0
                # (they never get gradient, so they stay 0 under any optimizer).
                tail.zero_()
                tail[:, : 1 if self.mode is ThresholdMode.ROW else self.dim].fill_(self.s0)
        return weight


class _CoarseThresholds(nn.ParameterDict):
    """Per-table coarse threshold logits (field / field_dim), initialised to `s0`.

    A ParameterDict of its own with `reset_parameters`, because DMP materialises meta parameters
    module by module and calls `reset_parameters()` only on the module that owns them.
    """

    def __init__(self, parameters: Mapping[str, nn.Parameter], *, s0: float) -> None:
        super().__init__(parameters)
        # Not `s0`: every attribute name of a ParameterDict could also be a table name.
        self._pep_s0 = s0

    def reset_parameters(self) -> None:
        for param in self.values():
            nn.init.constant_(param, self._pep_s0)


class PEPEmbeddingBagCollection(nn.Module):
    """EmbeddingBagCollection with PEP learnable embedding sizes (unsharded semantics).

    KJT in, KeyedTensor out, exactly like TorchRec's `EmbeddingBagCollection` (keys = feature names
    in table order, `feature@table` for a feature shared by several tables, [B, D] each), but every
    pooled element is the thresholded v̂.

    Args:
        tables: the LOGICAL tables: all with the same `embedding_dim` D, pooling SUM or MEAN. Each
            table's `init_fn` initialises v.
        granularity: one of `GRANULARITIES`; None = no thresholds (plain embedding).
        s0: initial threshold logit (the authors use −15 on MovieLens, −150 on Criteo/Avazu).
        gk: threshold scale: the threshold is gk·sigmoid(s) ∈ (0, gk).
        s_decay: L2 decay of s, added to its gradient where it is used (see `threshold_pool`).
        s_push: constant push on s (positive: more pruning); may be changed between steps.
        retrain: lottery-ticket retrain: rows [v | m] with m initialised to 1 (see
            `load_lottery_ticket`), thresholds off.
        is_weighted: as in TorchRec's EBC: use the KJT's per-id weights (the KJT must have them).
        device: where the tables are created; `torch.device("meta")` defers allocation (DMP or
            `to_empty()` + `reset_parameters()` initialise later).

    Attributes:
        granularity: the canonical granularity (None: no thresholds). mode: the op's ThresholdMode.
        dim: D. gk, s0, s_decay, s_push, retrain: as above (plain attributes).
        threshold: [1] (global) or [D] (dimension) threshold logits.
        thresholds: {table: [1]} (field) or {table: [D]} (field_dim) threshold logits.

    State dict: `_embedding_bag_collection.embedding_bags.<table>.weight` ([R, W]), plus
    `threshold` or `thresholds.<table>` for the coarse granularities.
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        *,
        granularity: str | None = "feature_dim",
        s0: float = -15.0,
        gk: float = 1.0,
        s_decay: float = 0.0,
        s_push: float = 0.0,
        retrain: bool = False,
        is_weighted: bool = False,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        tables = list(tables)
        if not tables:
            raise ValueError("PEPEmbeddingBagCollection needs at least one table")
        dims = {config.embedding_dim for config in tables}
        if len(dims) != 1:
            raise ValueError(f"all PEP tables must share one embedding_dim, got {sorted(dims)}")
        for config in tables:
            if config.pooling not in _POOLING_NAMES:
                raise ValueError(f"table {config.name!r}: pooling must be SUM or MEAN, got {config.pooling}")
            if not config.feature_names:
                # As TorchRec's EBC does: a table without feature names reads the feature of its name.
                config.feature_names = [config.name]
        if gk < 0:
            raise ValueError(f"gk must be >= 0, got {gk}")

        self.granularity: str | None = None if granularity is None else canonical_granularity(granularity)
        self.retrain = bool(retrain)
        self.mode: ThresholdMode = threshold_mode(self.granularity, self.retrain)
        self.dim: int = dims.pop()
        self.gk = float(gk)
        self.s0 = float(s0)
        self.s_decay = float(s_decay)
        self.s_push = float(s_push)
        self._is_weighted = is_weighted

        self._embedding_bag_configs = tables
        width = row_width(self.dim, self.mode)
        self._stored_configs = [
            dataclasses.replace(
                config,
                embedding_dim=width,
                feature_names=list(config.feature_names),
                init_fn=PEPInitFn(config.init_fn, dim=self.dim, mode=self.mode, s0=self.s0),
            )
            for config in tables
        ]
        # The stock EBC initialises the stored tables through their init_fn (unless on meta).
        self._embedding_bag_collection = EmbeddingBagCollection(
            tables=self._stored_configs, is_weighted=is_weighted, device=device
        )
        self._feature_names: list[list[str]] = [list(config.feature_names) for config in tables]
        self._embedding_names: list[str] = [
            name for names in get_embedding_names_by_table(tables) for name in names
        ]
        self._lengths_per_embedding: list[int] = [self.dim] * len(self._embedding_names)

        param_device = self._embedding_bag_collection.device
        if self.mode is ThresholdMode.COARSE:
            if self.granularity in ("global", "dimension"):
                size = 1 if self.granularity == "global" else self.dim
                self.threshold = nn.Parameter(torch.empty(size, device=param_device))
            else:
                size = 1 if self.granularity == "field" else self.dim
                self.thresholds = _CoarseThresholds(
                    {config.name: nn.Parameter(torch.empty(size, device=param_device)) for config in tables},
                    s0=self.s0,
                )
        self._reset_thresholds()

    # ---- configuration -------------------------------------------------------------------------

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """The LOGICAL tables (embedding_dim D): what consumers of the pooled output see."""
        return self._embedding_bag_configs

    def stored_embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """The tables as stored in `_embedding_bag_collection` (embedding_dim W, PEP init_fn)."""
        return self._stored_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def device(self) -> torch.device:
        """Where the stored tables live now (follows `to_empty()` / `.to()`)."""
        config = self._stored_configs[0]
        return self._embedding_bag_collection.embedding_bags[config.name].weight.device

    def extra_repr(self) -> str:
        return (
            f"granularity={self.granularity}, mode={self.mode.value}, dim={self.dim}, gk={self.gk}, "
            f"s0={self.s0}, s_decay={self.s_decay}, s_push={self.s_push}"
        )

    def _stored_weight(self, table_name: str) -> Tensor:
        bags = self._embedding_bag_collection.embedding_bags
        if table_name not in bags:
            raise ValueError(f"unknown table {table_name!r}; tables: {list(bags.keys())}")
        return bags[table_name].weight

    def coarse_s(self, table_name: str) -> Tensor | None:
        """The [D] threshold logits of `table_name` (a broadcast view of the coarse parameter), or
        None when s lives in the rows (feature, feature_dim) or thresholds are off."""
        if self.mode is not ThresholdMode.COARSE:
            return None
        self._stored_weight(table_name)  # validates the name
        if self.granularity == "global":
            return self.threshold.expand(self.dim)
        if self.granularity == "dimension":
            return self.threshold
        param = self.thresholds[table_name]
        return param.expand(self.dim) if self.granularity == "field" else param

    # ---- initialisation ------------------------------------------------------------------------

    def _reset_thresholds(self) -> None:
        if hasattr(self, "threshold"):
            nn.init.constant_(self.threshold, self.s0)
        if hasattr(self, "thresholds"):
            self.thresholds.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise everything: stored tables through their `PEPInitFn` ([v | s0], [v | 1]),
        coarse thresholds to s0. Tables still on the meta device are skipped."""
        for config in self._stored_configs:
            weight = self._stored_weight(config.name)
            if weight.device.type != "meta":
                assert config.init_fn is not None
                config.init_fn(weight)
        self._reset_thresholds()

    # ---- forward -------------------------------------------------------------------------------

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled thresholded embeddings.

        Args:
            features: KJT with every feature of `embedding_bag_configs()` (per-id weights used
                when `is_weighted`).

        Returns:
            KeyedTensor with keys = feature names in table order, [B, D] each.
        """
        features = maybe_td_to_kjt(features, None)
        flat_feature_names = [name for names in self._feature_names for name in names]
        inverse_indices = reorder_inverse_indices(
            inverse_indices=features.inverse_indices_or_none(), feature_names=flat_feature_names
        )
        feature_dict = features.to_dict()
        pooled_embeddings: list[Tensor] = []
        for config, names in zip(self._embedding_bag_configs, self._feature_names):
            weight_RW = self._stored_weight(config.name)
            coarse_s_D = self.coarse_s(config.name)
            pooling = _POOLING_NAMES[config.pooling]
            for name in names:
                jt = feature_dict[name]
                # Gather only the looked-up rows: the op never sees the rest of the table.
                rows_NW = weight_RW.index_select(0, jt.values())
                pooled_embeddings.append(
                    threshold_pool(
                        rows_NW,
                        jt.offsets(),
                        dim=self.dim,
                        mode=self.mode,
                        gk=self.gk,
                        coarse_s=coarse_s_D,
                        per_sample_weights=jt.weights() if self._is_weighted else None,
                        pooling=pooling,
                        s_decay=self.s_decay,
                        s_push=self.s_push,
                    )
                )
        return KeyedTensor(
            keys=self._embedding_names,
            values=process_pooled_embeddings(
                pooled_embeddings=pooled_embeddings, inverse_indices=inverse_indices
            ),
            length_per_key=self._lengths_per_embedding,
        )

    # ---- pruning state (whole-table scans: eval intervals only) --------------------------------

    @torch.no_grad()
    def margins(self, table_name: str) -> Tensor:
        """[R, D] float: |v| − gk·sigmoid(s) per element (kept ⇔ > 0; see `ops.margins` for the
        MASK / NONE conventions). The ranking key for exact budgets."""
        weight_RW = self._stored_weight(table_name)
        coarse_s_D = self.coarse_s(table_name)
        return margins_op(weight_RW.detach(), dim=self.dim, mode=self.mode, gk=self.gk, coarse_s=coarse_s_D)

    @torch.no_grad()
    def kept_mask(self, table_name: str) -> Tensor:
        """[R, D] bool: the elements that currently contribute (margin > 0)."""
        return self.margins(table_name) > 0

    @torch.no_grad()
    def kept_counts(self) -> dict[str, int]:
        """{table: number of kept elements}, scanned in row chunks (bounded temporary memory)."""
        counts: dict[str, int] = {}
        for config in self._embedding_bag_configs:
            weight_RW = self._stored_weight(config.name).detach()
            coarse_s_D = self.coarse_s(config.name)
            total = torch.zeros((), dtype=torch.int64, device=weight_RW.device)
            for start in range(0, weight_RW.shape[0], _SCAN_CHUNK_ROWS):
                chunk = weight_RW[start : start + _SCAN_CHUNK_ROWS]
                margin = margins_op(chunk, dim=self.dim, mode=self.mode, gk=self.gk, coarse_s=coarse_s_D)
                total += (margin > 0).sum()
            counts[config.name] = int(total)
        return counts

    @torch.no_grad()
    def load_lottery_ticket(self, weights: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
        """Retrain only: set every stored table to [w · m | m] (docs/architecture.md, decision 6).

        Args:
            weights: {table: [R, D]} the rewound (e.g. step-0) embedding.
            masks: {table: [R, D]} bool or 0/1 float keep mask (float: kept ⇔ > 0.5).
        """
        if self.mode is not ThresholdMode.MASK:
            raise ValueError("load_lottery_ticket needs a module built with retrain=True")
        names = [config.name for config in self._embedding_bag_configs]
        for what, given in (("weights", weights), ("masks", masks)):
            missing = sorted(set(names) - set(given))
            extra = sorted(set(given) - set(names))
            if missing or extra:
                raise ValueError(f"lottery ticket {what}: missing tables {missing}, unknown tables {extra}")
        for config in self._embedding_bag_configs:
            stored_RW = self._stored_weight(config.name)
            shape = (config.num_embeddings, self.dim)
            w_RD, m_RD = weights[config.name], masks[config.name]
            for what, tensor in (("weights", w_RD), ("masks", m_RD)):
                if tuple(tensor.shape) != shape:
                    raise ValueError(
                        f"lottery ticket {what}[{config.name!r}] must be {list(shape)}, got {list(tensor.shape)}"
                    )
            keep_RD = m_RD if m_RD.dtype == torch.bool else m_RD > 0.5
            keep_RD = keep_RD.to(device=stored_RW.device, dtype=stored_RW.dtype)
            stored_RW[:, : self.dim].copy_(w_RD.to(device=stored_RW.device, dtype=stored_RW.dtype) * keep_RD)
            stored_RW[:, self.dim :].copy_(keep_RD)


def pep_reference_pooled(
    weight_v: Tensor,
    s_full: Tensor | None,
    kjt: KeyedJaggedTensor,
    *,
    feature_names: Iterable[str] | None = None,
    gk: float = 1.0,
    pooling: str = "sum",
    mask: Tensor | None = None,
    weighted: bool = False,
) -> dict[str, Tensor]:
    """The whole-dense-table reference (the spec of the module): threshold the full [R, D] table
    with the formula, then `F.embedding_bag` each feature's bags. Slow (∝ R); tests only.

    Args:
        weight_v: [R, D] v of one table.
        s_full: threshold logits broadcastable to [R, D] ([1], [D], [R, 1], [R, D]); None: no
            threshold.
        kjt: the batch; `feature_names` (default: all its keys) are looked up in this table.
        gk: threshold scale.
        pooling: "sum" or "mean" (mean with weights: weighted sum / bag length, as the op).
        mask: [R, D] 0/1 retrain mask (v̂ = v·1[m > 0.5]); overrides s_full.
        weighted: use the KJT's per-id weights.

    Returns:
        {feature: [B, D]}, differentiable w.r.t. weight_v and s_full.
    """
    if mask is not None:
        vhat_RD = weight_v * (mask > 0.5).to(weight_v.dtype)
    elif s_full is None:
        vhat_RD = weight_v
    else:
        vhat_RD = torch.sign(weight_v) * torch.relu(weight_v.abs() - gk * torch.sigmoid(s_full))
    out: dict[str, Tensor] = {}
    for name in feature_names if feature_names is not None else kjt.keys():
        jt = kjt[name]
        ids, offsets = jt.values().long(), jt.offsets().long()
        psw = jt.weights().to(vhat_RD.dtype) if weighted else None
        if pooling == "mean" and psw is not None:
            # F.embedding_bag refuses weights with mean: weighted sum / bag length.
            pooled = F.embedding_bag(
                ids, vhat_RD, offsets, mode="sum", per_sample_weights=psw, include_last_offset=True
            )
            lengths = (offsets[1:] - offsets[:-1]).clamp(min=1).to(pooled.dtype)
            pooled = pooled / lengths.unsqueeze(1)
        else:
            pooled = F.embedding_bag(
                ids, vhat_RD, offsets, mode=pooling, per_sample_weights=psw, include_last_offset=True
            )
        out[name] = pooled
    return out
