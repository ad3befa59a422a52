"""Sharded PEP: `ShardedPEPEmbeddingBagCollection` and `PEPEmbeddingBagCollectionSharder`.

Legend: B = batch (bags per feature), D = logical embedding dim, W = stored row width (2D for
feature_dim / retrain, D + 4 for feature, D for the coarse granularities and plain tables),
C = columns of a shard, R = rows of a shard.

Layout follows TorchRec's ITEP (torchrec/distributed/itep_embeddingbag.py): the sharded module wraps
a sharded EmbeddingBagCollection of the STORED tables (`_embedding_bag_collection`), so TorchRec's
planner plans ordinary [R, W] tables, and DMP, the fused optimizer (it updates v and s in backward),
state_dict, DCP and resharding stay stock. What differs is the kernel each shard runs
(`pep_kernel.py`): gather the looked-up rows, threshold and pool them on the shard; only the pooled
[B, D] per feature crosses ranks (the output dist is sized for D, not W).

How TorchRec builds a sharded EBC, and where we plug in (torchrec 1.8 sources; our subclass of each
link, and its module, on the right):

    ShardedEmbeddingBagCollection.__init__                      (distributed/embeddingbag.py:628)
        ShardedPEPInnerEmbeddingBagCollection, below
      └─ self.create_embedding_bag_sharding(infos, ...)         (embeddingbag.py:732, one per type)
           └─ Tw/Rw/TwRw/Cw/TwCwPooledEmbeddingSharding          (distributed/sharding/*.py)
                PEPTw/Rw/TwRw/Cw/TwCwPooledEmbeddingSharding, `pep_sharding.py`
      └─ _create_lookups(): sharding.create_lookup()            (embeddingbag.py:1676)
           └─ GroupedPooledEmbeddingsLookup                      (distributed/embedding_lookup.py:605)
                PEPGroupedPooledEmbeddingsLookup, `pep_lookup.py`
                └─ _create_embedding_kernel(config, ...)         (embedding_lookup.py:686)
                     └─ BatchedFusedEmbeddingBag (one fbgemm TBE per group of tables)
                                                                 (distributed/batched_embedding_kernel.py:3724)
                          PEPBatchedFusedEmbeddingBag, `pep_kernel.py`
      └─ _create_output_dist(): sharding.create_output_dist() and sharding.embedding_dims()
                                                                 (embeddingbag.py:1682)
                the PEP shardings report D-wide outputs, `pep_sharding.py`

The subclasses change only the kernel's `forward` and the output widths the shardings report.
Everything else (planning, input distribution, state dict, checkpointing, the fused optimizer)
stays TorchRec's.

Gradient semantics (TorchRec's, kept for PEP): the output all-to-all / reduce-scatter divides the
gradients it routes to the shards by the world size (`comm_ops.get_gradient_division()`), so a table
gets the MEAN over ranks of each rank's loss gradient, like DDP's replicated parameters. PEP adds:
  * coarse thresholds (`threshold` / `thresholds.<table>`) are replicated parameters of this module,
    all-reduced (averaged) by DMP's DDP wrapper. Their gradient comes out of the kernels, i.e. after
    the division, so each forward multiplies it back by the division factor (as TorchRec does for
    per-sample weights, embedding_lookup.py:581 `CommOpGradientScaling`); the average over ranks is
    then the mean-over-ranks gradient;
  * the sparsity pressure (`s_decay · s − s_push`, added to the s-gradient by `threshold_pool`) is
    rescaled so that one step adds what the mean over ranks of unsharded steps adds: per row
    occurrence it is divided by the same factor; per call on coarse_s it is divided by the number
    of calls the ranks make for the same columns (row shards of the table).
So one sharded step == the unsharded module stepped with the mean over ranks of the per-rank
gradients (tests/distributed/test_pep_embeddingbag.py checks it for every sharding type and granularity).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torchrec.distributed.embedding_types import BaseEmbeddingSharder, KJTList, ShardedEmbeddingModule
from torchrec.distributed.embeddingbag import (
    EmbeddingBagCollectionContext,
    ShardedEmbeddingBagCollection,
    replace_placement_with_meta_device,
)
from torchrec.distributed.model_parallel import get_unwrapped_module
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import (
    Awaitable,
    LazyAwaitable,
    ModuleSharder,
    ParameterSharding,
    QuantizedCommCodecs,
    ShardingEnv,
    ShardingType,
)
from torchrec.distributed.utils import append_prefix
from torchrec.modules.embedding_configs import PoolingType
from torchrec.modules.embedding_modules import get_embedding_names_by_table
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from pep_torchrec.distributed.pep_kernel import (
    FULL_ROW_MODES,
    PEPBatchedFusedEmbeddingBag,
    PEPStepParams,
    PEPTableSpec,
)
from pep_torchrec.distributed.pep_lookup import gradient_scale_factor
from pep_torchrec.distributed.pep_sharding import PEP_SHARDINGS, SHARDINGS_WITH_PERMUTE
from pep_torchrec.distributed.planning import EBCSharder
from pep_torchrec.distributed.s_optimizer import SOptimizerSync
from pep_torchrec.modules import PEPEmbeddingBagCollection
from pep_torchrec.ops import ThresholdMode
from pep_torchrec.ops import margins as margins_op

# Rows per chunk when scanning local shards (kept counts): bounded temporary memory at eval time.
_SCAN_CHUNK_ROWS = 1 << 16

_ROW_TYPES = (ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value)
_COLUMN_TYPES = (ShardingType.COLUMN_WISE.value, ShardingType.TABLE_COLUMN_WISE.value)
_ROW_SPLIT_TYPES = (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value)


def supported_sharding_types(module: PEPEmbeddingBagCollection, table: str) -> list[str]:
    """Sharding types `table` of `module` supports, in order of preference.

    table_wise, row_wise and table_row_wise in general; column_wise and table_column_wise only when
    a stored row is all v (coarse thresholds, plain tables); no row splitting for a weighted
    mean-pooled table (TorchRec finishes row-wise mean pooling by dividing by the sum of the bag's
    weights, embeddingbag.py `_create_mean_pooling_divisor`; PEP's mean divides by the id count).
    """
    config = next((c for c in module.embedding_bag_configs() if c.name == table), None)
    if config is None:
        raise ValueError(f"table {table}: not a table of this PEP module")
    types = list(_ROW_TYPES) if module.mode in FULL_ROW_MODES else [*_ROW_TYPES, *_COLUMN_TYPES]
    if module.is_weighted() and config.pooling == PoolingType.MEAN:
        types = [t for t in types if t not in _ROW_SPLIT_TYPES]
    return types


def _refusal_reason(module: PEPEmbeddingBagCollection, sharding_type: str) -> str:
    if sharding_type in _COLUMN_TYPES:
        what = (
            "v from its retrain mask m"
            if module.mode is ThresholdMode.MASK
            else f"v from s (granularity {module.granularity})"
        )
        return f"{sharding_type} would split {what}"
    if sharding_type in _ROW_SPLIT_TYPES:
        return (
            f"{sharding_type} with mean pooling of weighted features would divide by the sum of "
            "weights, not the number of ids"
        )
    if sharding_type == ShardingType.DATA_PARALLEL.value:
        return "data_parallel replicates the table into TorchRec's dense lookup, which has no PEP kernel"
    return f"{sharding_type} is not supported for PEP tables"


def check_pep_sharding(
    module: PEPEmbeddingBagCollection,
    table: str,
    sharding_type: str,
    compute_kernel: str | None = None,
) -> None:
    """Refuse a (table, sharding type, compute kernel) the sharded PEP module cannot run.

    Raises:
        ValueError: naming the table, the reason and what to use instead, e.g. "table t_user_id:
            column_wise would split v from s (granularity feature_dim); use table_wise, row_wise
            or table_row_wise".
    """
    allowed = supported_sharding_types(module, table)
    if sharding_type not in allowed:
        choices = allowed[0] if len(allowed) == 1 else f"{', '.join(allowed[:-1])} or {allowed[-1]}"
        raise ValueError(f"table {table}: {_refusal_reason(module, sharding_type)}; use {choices}")
    if compute_kernel is not None and compute_kernel not in PEPEmbeddingBagCollectionSharder.FUSED_KERNELS:
        raise ValueError(
            f"table {table}: compute kernel {compute_kernel!r} is not supported for PEP tables; use 'fused'"
        )


def pep_constraints(
    model: nn.Module, constraints: Mapping[str, ParameterConstraints] | None = None
) -> dict[str, ParameterConstraints]:
    """Planner constraints with every PEP table restricted to the sharding types it supports.

    TorchRec's sharder interface offers sharding types per module TYPE, not per module, so the
    sharder advertises column-wise for all PEP modules; this keeps the planner from choosing it for
    `[v | s]` tables. Other constraint fields are kept.

    Args:
        model: a model containing `PEPEmbeddingBagCollection`s (unsharded, e.g. on meta).
        constraints: the constraints so far, by table name (e.g. `sharding.make_constraints`).

    Returns:
        New constraints: PEP tables' `sharding_types` = requested ∩ supported (all supported
        if none were requested); other tables unchanged.

    Raises:
        ValueError: a PEP table whose requested sharding types are all unsupported (the message
            names the table and why, as at shard time).
    """
    out = dict(constraints or {})
    for module in model.modules():
        if not isinstance(module, PEPEmbeddingBagCollection):
            continue
        for config in module.embedding_bag_configs():
            allowed = supported_sharding_types(module, config.name)
            constraint = out.get(config.name) or ParameterConstraints()
            requested = list(constraint.sharding_types or allowed)
            kept = [t for t in requested if t in allowed]
            if not kept:
                check_pep_sharding(module, config.name, requested[0])
            out[config.name] = dataclasses.replace(constraint, sharding_types=kept)
    return out


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `factor` (undoes TorchRec's division of
    routed gradients for parameters that DDP averages itself)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, factor: float) -> Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.factor, None


class ShardedPEPInnerEmbeddingBagCollection(ShardedEmbeddingBagCollection):
    """TorchRec's sharded EBC whose shardings, lookups and kernels are the PEP ones.

    `create_embedding_bag_sharding` is a classmethod upstream (embeddingbag.py:964); it is overridden
    here as an instance method because the PEP shardings need this module's table specs. TorchRec
    only calls it as `self.create_embedding_bag_sharding(...)` (embeddingbag.py:732 in `__init__`,
    :2107 in `update_shards`), so the instance binding is what it gets.
    """

    def __init__(self, *args: Any, pep_specs: Mapping[str, PEPTableSpec], **kwargs: Any) -> None:
        # A plain attribute set before nn.Module.__init__ (allowed): the base __init__ already
        # creates the shardings.
        self._pep_specs = dict(pep_specs)
        super().__init__(*args, **kwargs)

    def create_embedding_bag_sharding(  # type: ignore[override]
        self,
        sharding_infos: list[Any],
        env: ShardingEnv,
        device: torch.device | None = None,
        permute_embeddings: bool = False,
        qcomm_codecs_registry: dict[str, QuantizedCommCodecs] | None = None,
    ) -> Any:
        sharding_type = sharding_infos[0].param_sharding.sharding_type
        if sharding_type not in PEP_SHARDINGS:
            names = [info.embedding_config.name for info in sharding_infos]
            raise ValueError(f"tables {names}: sharding type {sharding_type} is not supported for PEP tables")
        if device is not None and device.type == "meta":
            replace_placement_with_meta_device(sharding_infos)  # as the stock classmethod does
        kwargs: dict[str, Any] = {
            "qcomm_codecs_registry": qcomm_codecs_registry,
            "pep_specs": self._pep_specs,
        }
        if sharding_type in SHARDINGS_WITH_PERMUTE:
            kwargs["permute_embeddings"] = permute_embeddings
        return PEP_SHARDINGS[sharding_type](sharding_infos, env, device, **kwargs)

    def reset_parameters(self) -> None:
        # The stock reset runs every table's init_fn on `embedding_bags[t].weight`, which for a
        # table with no shard on this rank is an empty 1-D placeholder (`_initialize_torch_state`,
        # embeddingbag.py:1165); PEP's init_fn wants [rows, columns], and there is nothing to
        # initialise anyway, so those tables are left out.
        configs = self._embedding_bag_configs
        self._embedding_bag_configs = [c for c in configs if self.embedding_bags[c.name].weight.numel() > 0]
        try:
            super().reset_parameters()
        finally:
            self._embedding_bag_configs = configs


def _count_row_shards(
    table_names: list[str], table_name_to_parameter_sharding: dict[str, ParameterSharding]
) -> dict[tuple[str, int], int]:
    """Row shards per (table, column offset): the number of kernel calls, across ranks, that touch
    the same coarse columns each forward (the pressure is split between them)."""
    row_shards: dict[tuple[str, int], int] = {}
    for name in table_names:
        spec = table_name_to_parameter_sharding[name].sharding_spec
        shards = getattr(spec, "shards", None) or []
        for shard in shards:
            key = (name, int(shard.shard_offsets[1]))
            row_shards[key] = row_shards.get(key, 0) + 1
    return row_shards


class ShardedPEPEmbeddingBagCollection(
    ShardedEmbeddingModule[KJTList, list[Tensor], KeyedTensor, EmbeddingBagCollectionContext]
):
    """The sharded `PEPEmbeddingBagCollection`: same forward (KJT → KeyedTensor of [B, D] per feature,
    keys in the unsharded order), same state-dict keys, tables sharded by TorchRec.

    Pipelineable like ShardedEmbeddingBagCollection: `input_dist` / `compute` / `output_dist` /
    `compute_and_output_dist` / `create_context` delegate to the inner sharded EBC, so
    `TrainPipelineSparseDist` rewrites this module (a ShardedModule called with the KJT) as it does a
    plain sharded EBC.

    Attributes:
        granularity, mode, dim, gk, s0, s_decay, s_push, retrain: as the unsharded module's; plain
            attributes read by the kernels every forward (a controller may change s_push, gk, ...).
        threshold / thresholds: the coarse threshold parameters (replicated, DDP-averaged).

    State dict: `_embedding_bag_collection.embedding_bags.<table>.weight` (sharded [R, W] tables)
    plus `threshold` or `thresholds.<table>` (coarse granularities), as unsharded.
    """

    def __init__(
        self,
        module: PEPEmbeddingBagCollection,
        table_name_to_parameter_sharding: dict[str, ParameterSharding],
        env: ShardingEnv,
        *,
        fused_params: dict[str, Any] | None = None,
        device: torch.device | None = None,
        qcomm_codecs_registry: dict[str, QuantizedCommCodecs] | None = None,
        module_fqn: str | None = None,
        sharded_module_order_overwrite: list[str] | None = None,
    ) -> None:
        super().__init__(qcomm_codecs_registry=qcomm_codecs_registry)
        for config in module.embedding_bag_configs():
            sharding = table_name_to_parameter_sharding[config.name]
            check_pep_sharding(module, config.name, sharding.sharding_type, sharding.compute_kernel)

        self.granularity = module.granularity
        self.retrain = module.retrain
        self.mode: ThresholdMode = module.mode
        self.dim = module.dim
        self.gk = module.gk
        self.s0 = module.s0
        self.s_decay = module.s_decay
        self.s_push = module.s_push
        self._env = env
        self._table_names = [config.name for config in module.embedding_bag_configs()]
        specs = {name: PEPTableSpec(name=name, dim=self.dim, mode=self.mode) for name in self._table_names}

        self._embedding_bag_collection = ShardedPEPInnerEmbeddingBagCollection(
            module=module._embedding_bag_collection,
            table_name_to_parameter_sharding=table_name_to_parameter_sharding,
            env=env,
            fused_params=fused_params,
            device=device,
            qcomm_codecs_registry=qcomm_codecs_registry,
            module_fqn=append_prefix(module_fqn or "", "_embedding_bag_collection"),
            sharded_module_order_overwrite=sharded_module_order_overwrite,
            pep_specs=specs,
        )

        self._init_coarse_thresholds(module, device or torch.device("cpu"))
        self._row_shards = _count_row_shards(self._table_names, table_name_to_parameter_sharding)

        for kernel in self._pep_kernels():
            kernel.bind_step_params(self._step_params)
        # Thresholds with their own optimizer (`pep.s_optimizer: sgd`, distributed/s_optimizer.py).
        self.s_optimizer: SOptimizerSync | None = self._init_s_optimizer(getattr(module, "s_optimizer", None))
        self._untouched_coarse: list[str] = self._find_untouched_coarse()

        # The unsharded key order (table order, `feature@table` for shared features); sharded EBCs
        # group keys by sharding type.
        self._embedding_names: list[str] = [
            name for names in get_embedding_names_by_table(module.embedding_bag_configs()) for name in names
        ]
        self._needs_layout = bool(self._untouched_coarse) or (
            list(self._embedding_bag_collection._embedding_names) != self._embedding_names
        )

    def _init_coarse_thresholds(self, module: PEPEmbeddingBagCollection, param_device: torch.device) -> None:
        """Coarse thresholds: the unsharded module's parameters (same names), materialised at s0 if
        it was built on meta, and placed on the compute device (the kernels read them there)."""
        if hasattr(module, "threshold"):
            param = module.threshold
            if param.is_meta:
                param = nn.Parameter(torch.full_like(param, self.s0, device=param_device))
            elif param.device != param_device:
                param = nn.Parameter(param.detach().to(param_device))
            self.threshold = param
        if hasattr(module, "thresholds"):
            self.thresholds = module.thresholds
            if any(p.is_meta for p in self.thresholds.parameters()):
                self.thresholds.to_empty(device=param_device)
                self.thresholds.reset_parameters()
            else:
                self.thresholds.to(param_device)

    def _init_s_optimizer(self, settings: Any) -> SOptimizerSync | None:
        """The thresholds' own optimizer when the module has `s_optimizer` settings (not in retrain)."""
        if settings is None or self.retrain:
            return None
        if self.mode not in (ThresholdMode.ROW_DIM, ThresholdMode.ROW):
            raise ValueError(
                f"pep.s_optimizer=sgd needs s in the stored rows (granularity feature or "
                f"feature_dim), not {self.granularity!r}"
            )
        states = [kernel.bind_s_optimizer(settings) for kernel in self._pep_kernels()]
        return SOptimizerSync(settings, list(self._table_names), states)

    def _find_untouched_coarse(self) -> list[str]:
        """Coarse parameters no local shard reads (table-wise puts a table on one rank), as table names
        (any one, for the shared `threshold`).

        They are touched with a zero each forward, so they get a (zero) gradient on every rank. DMP's
        DDP runs with static_graph=True, which would tolerate them; DDP with
        find_unused_parameters=False would not.
        """
        local_tables = {spec.name for kernel in self._pep_kernels() for spec, *_ in kernel.pep_tables()}
        untouched: list[str] = []
        if self.mode is ThresholdMode.COARSE:
            shared = self.granularity in ("global", "dimension")
            untouched = [n for n in self._table_names if n not in local_tables]
            if shared:
                untouched = untouched[:1] if not local_tables else []
        return untouched

    # ---- the kernels' view of this module ------------------------------------------------------

    def _pep_kernels(self) -> Iterator[PEPBatchedFusedEmbeddingBag]:
        # `_lookups` is a plain list on the sharded EBC (embedding_types.py:408), so its kernels
        # are reached by walking it, not through named_modules().
        for lookup in self._embedding_bag_collection._lookups:
            for kernel in getattr(lookup, "_emb_modules", []):
                if isinstance(kernel, PEPBatchedFusedEmbeddingBag):
                    yield kernel

    def coarse_param(self, table: str) -> nn.Parameter | None:
        """The coarse threshold parameter of `table` ([1] or [D]), or None (row / no thresholds)."""
        if self.mode is not ThresholdMode.COARSE:
            return None
        if self.granularity in ("global", "dimension"):
            return self.threshold
        return self.thresholds[table]

    def coarse_s(self, table: str) -> Tensor | None:
        """The [D] threshold logits of `table` (coarse modes), as the unsharded `coarse_s`."""
        param = self.coarse_param(table)
        return None if param is None else param.expand(self.dim)

    def _step_params(self, table: str, col_offset: int, cols: int) -> PEPStepParams:
        """Per kernel call: the current gk / pressure / coarse thresholds of `table`'s shard
        covering columns [col_offset, col_offset + cols), rescaled to TorchRec's gradient
        semantics (module docstring)."""
        factor = gradient_scale_factor(self._env.process_group)
        param = self.coarse_param(table)
        if param is None:
            # Row pressure is per gathered row occurrence; the kernel sees every rank's batch.
            return PEPStepParams(self.gk, self.s_decay / factor, self.s_push / factor, None)
        coarse_s_C = _ScaleGradient.apply(param, float(factor)).expand(self.dim)[
            col_offset : col_offset + cols
        ]
        # Per call: each rank's unsharded forward would add it once per feature; here the row
        # shards of these columns each call once, and DDP then averages over the world.
        scale = self._env.world_size / (factor * self._row_shards.get((table, col_offset), 1))
        return PEPStepParams(self.gk, self.s_decay * scale, self.s_push * scale, coarse_s_C)

    # ---- ShardedModule API (delegates to the inner sharded EBC) --------------------------------

    def create_context(self) -> EmbeddingBagCollectionContext:
        return self._embedding_bag_collection.create_context()

    def input_dist(  # type: ignore[override]
        self, ctx: EmbeddingBagCollectionContext, features: KeyedJaggedTensor
    ) -> Awaitable[Awaitable[KJTList]]:
        return self._embedding_bag_collection.input_dist(ctx, features)

    def compute(self, ctx: EmbeddingBagCollectionContext, dist_input: KJTList) -> list[Tensor]:
        return self._embedding_bag_collection.compute(ctx, dist_input)

    def output_dist(
        self, ctx: EmbeddingBagCollectionContext, output: list[Tensor]
    ) -> LazyAwaitable[KeyedTensor]:
        return self._finish(self._embedding_bag_collection.output_dist(ctx, output))

    def compute_and_output_dist(
        self, ctx: EmbeddingBagCollectionContext, input: KJTList
    ) -> LazyAwaitable[KeyedTensor]:
        return self._finish(self._embedding_bag_collection.compute_and_output_dist(ctx, input))

    def prefetch(
        self,
        dist_input: KJTList,
        forward_stream: Any = None,
        ctx: EmbeddingBagCollectionContext | None = None,
    ) -> None:
        self._embedding_bag_collection.prefetch(dist_input, forward_stream, ctx)

    def _finish(self, awaitable: LazyAwaitable[KeyedTensor]) -> LazyAwaitable[KeyedTensor]:
        # Runs after TorchRec's own callbacks (row-wise mean pooling) when the output is awaited.
        if self._needs_layout:
            awaitable.callbacks.append(self._to_unsharded_layout)
        return awaitable

    def _to_unsharded_layout(self, kt: KeyedTensor) -> KeyedTensor:
        """Keys in the unsharded order (one copy), plus a zero touching the coarse parameters that no
        local shard reads."""
        values = kt.values()
        if kt.keys() != self._embedding_names:
            by_key = kt.to_dict()
            values = torch.cat([by_key[name] for name in self._embedding_names], dim=1)
        if self._untouched_coarse:
            zero = sum(self.coarse_param(name).sum() for name in self._untouched_coarse) * 0.0
            values = values + zero
        return KeyedTensor(
            keys=self._embedding_names, length_per_key=[self.dim] * len(self._embedding_names), values=values
        )

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        # Only the tables are sharded; coarse thresholds stay visible to DDP (the default would
        # list every parameter, hiding the thresholds from DDP's all-reduce).
        yield from self._embedding_bag_collection.sharded_parameter_names(
            append_prefix(prefix, "_embedding_bag_collection")
        )

    @property
    def unsharded_module_type(self) -> type[PEPEmbeddingBagCollection]:
        return PEPEmbeddingBagCollection

    # ---- pruning state of this rank's shards (eval-interval scans) ------------------------------

    def _local_shards(self) -> Iterator[tuple[PEPTableSpec, int, int, Tensor, Tensor | None]]:
        """(spec, row offset, column offset into [0, D), [R, C] stored weight, [C'] coarse_s)."""
        for kernel in self._pep_kernels():
            for spec, row_offset, col_offset, weight in kernel.pep_tables():
                coarse = self.coarse_s(spec.name)
                cols = spec.output_cols(weight.shape[1])
                coarse_C = None if coarse is None else coarse.detach()[col_offset : col_offset + cols]
                yield spec, row_offset, col_offset, weight, coarse_C

    @torch.no_grad()
    def kept_counts(self) -> dict[str, int]:
        """{table: kept elements (margin > 0) in THIS RANK's shards}; every table is listed (0 when
        none of it is local), so the trainer can all-reduce a fixed-order vector."""
        counts = dict.fromkeys(self._table_names, 0)
        for spec, _, _, weight, coarse_C in self._local_shards():
            cols = spec.output_cols(weight.shape[1])
            total = torch.zeros((), dtype=torch.int64, device=weight.device)
            for start in range(0, weight.shape[0], _SCAN_CHUNK_ROWS):
                chunk = weight[start : start + _SCAN_CHUNK_ROWS].detach()
                total += (
                    margins_op(chunk, dim=cols, mode=spec.mode, gk=self.gk, coarse_s=coarse_C) > 0
                ).sum()
            counts[spec.name] += int(total)
        return counts

    @torch.no_grad()
    def local_log_unit_thresholds(self, table: str) -> list[tuple[int, int, Tensor]]:
        """This rank's pieces of log sigmoid(s) per element of `table` (the log threshold at gk = 1),
        [R, C] float32; for the controller, which needs it where sigmoid(s) is far below |v|."""
        out = []
        for spec, row_offset, col_offset, weight, coarse_C in self._local_shards():
            if spec.name != table:
                continue
            cols = spec.output_cols(weight.shape[1])
            if spec.mode is ThresholdMode.ROW_DIM:
                s = weight[:, cols : 2 * cols]
            elif spec.mode is ThresholdMode.ROW:
                s = weight[:, cols : cols + 1].expand(-1, cols)
            elif coarse_C is not None:
                s = coarse_C.unsqueeze(0).expand(weight.shape[0], -1)
            else:
                raise ValueError(f"table {table}: no thresholds in mode {spec.mode.value!r}")
            out.append((row_offset, col_offset, torch.nn.functional.logsigmoid(s.detach().float())))
        return out

    @torch.no_grad()
    def local_margins(self, table: str) -> list[tuple[int, int, Tensor]]:
        """This rank's pieces of `table`'s [num_embeddings, D] margin matrix (see `ops.margins`):
        (row offset, column offset, [R, C] float margins). Empty when no shard is local."""
        if table not in self._table_names:
            raise ValueError(f"unknown table {table!r}; tables: {self._table_names}")
        return [
            (
                row_offset,
                col_offset,
                margins_op(
                    weight.detach(),
                    dim=spec.output_cols(weight.shape[1]),
                    mode=spec.mode,
                    gk=self.gk,
                    coarse_s=coarse_C,
                ),
            )
            for spec, row_offset, col_offset, weight, coarse_C in self._local_shards()
            if spec.name == table
        ]


class PEPEmbeddingBagCollectionSharder(BaseEmbeddingSharder[PEPEmbeddingBagCollection]):
    """Shards `PEPEmbeddingBagCollection`: its stored tables are what the planner plans.

    Sharding types: table_wise, row_wise, table_row_wise (on CPU too: the CPU fused kernel handles
    them exactly), plus column_wise / table_column_wise, which only coarse / plain modules support.
    The planner asks a sharder for sharding types per module TYPE, so use `pep_constraints` to keep
    it from choosing column-wise for `[v | s]` tables; a plan that does anyway is refused in `shard`
    with the table and the reason.
    """

    FUSED_KERNELS = ("fused", "fused_uvm", "fused_uvm_caching")

    def shard(
        self,
        module: PEPEmbeddingBagCollection,
        params: dict[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device | None = None,
        module_fqn: str | None = None,
    ) -> ShardedPEPEmbeddingBagCollection:
        return ShardedPEPEmbeddingBagCollection(
            module,
            params,
            env,
            fused_params=self.fused_params,
            device=device,
            qcomm_codecs_registry=self.qcomm_codecs_registry,
            module_fqn=module_fqn,
            sharded_module_order_overwrite=self._sharded_module_order_overwrite,
        )

    def shardable_parameters(self, module: PEPEmbeddingBagCollection) -> dict[str, nn.Parameter]:
        # The stored [R, W] tables, by table name (as EmbeddingBagCollectionSharder does for an EBC).
        return {
            name.split(".")[0]: param
            for name, param in module._embedding_bag_collection.embedding_bags.named_parameters()
        }

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return [*_ROW_TYPES, *_COLUMN_TYPES]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        # The fused TBE only (UVM placements on CUDA): it applies the optimizer to v and s rows in
        # backward. TorchRec's stock sharder does not offer model-parallel dense kernels either.
        return list(self.FUSED_KERNELS) if compute_device_type == "cuda" else ["fused"]

    @property
    def module_type(self) -> type[PEPEmbeddingBagCollection]:
        return PEPEmbeddingBagCollection

    @property
    def sharded_module_type(self) -> type[ShardedPEPEmbeddingBagCollection]:
        return ShardedPEPEmbeddingBagCollection


def pep_modules(model: nn.Module) -> dict[str, PEPEmbeddingBagCollection | ShardedPEPEmbeddingBagCollection]:
    """FQN → every PEP module of `model`, sharded or not (DMP / DDP wrappers looked through).

    Both kinds have `kept_counts()`, the plain attributes `gk`, `s_decay`, `s_push` (set them to
    steer the sparsity pressure; the kernels read them every forward), and margins: `margins(t)`
    (whole table, unsharded) or `local_margins(t)` (this rank's pieces, sharded).
    """
    root = get_unwrapped_module(model)
    return {
        name: m
        for name, m in root.named_modules()
        if isinstance(m, (PEPEmbeddingBagCollection, ShardedPEPEmbeddingBagCollection))
    }


def pep_sharders(fused_params: dict[str, Any] | None = None) -> list[ModuleSharder[nn.Module]]:
    """The sharders of a model with PEP modules: PEP EBCs, and plain EBCs (e.g. FM's `linear_ebc`)
    through our `EBCSharder` (row-wise allowed on CPU), both with the same fused optimizer params."""
    return [
        PEPEmbeddingBagCollectionSharder(fused_params=dict(fused_params or {})),
        EBCSharder(fused_params=dict(fused_params or {})),
    ]
