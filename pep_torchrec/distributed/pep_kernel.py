"""The PEP kernel: TorchRec's fused TBE kernel (`BatchedFusedEmbeddingBag`, one fbgemm TBE per group
of tables) with a forward that gathers the looked-up `[v | s]` rows of a shard and thresholds + pools
them with `threshold_pool`; plus what a shard knows about its PEP tables (`PEPTableSpec`) and the
per-forward values it reads from the owning module (`PEPStepParams`).

TorchRec's counterpart: torchrec/distributed/batched_embedding_kernel.py. Built by the grouped lookup
(`pep_lookup.py`), which the shardings (`pep_sharding.py`) create; the chain is drawn in
`pep_embeddingbag.py`.

Legend: T = features of a kernel's group, B = bags per feature on this shard (after the input
all-to-all: the global batch for table-wise, every rank's batch for row-wise), N_f = ids of feature f
on this shard, N_max = max_f N_f, C = stored columns of a table on this shard (W, or a column slice of
D for column-wise coarse tables), D = logical embedding dim, W = stored row width.

What the kernel changes is its `forward` (gather rows through the pooled TBE path, then threshold +
pool: one fused kernel call for the whole group where the group allows it (`GroupedThresholdPool`:
C++ on CPU, Triton on CUDA), else `threshold_pool` per feature on its block of the TBE output), so the
TBE's fused backward applies the optimizer to exactly the looked-up rows, v and s together; either way
the backward costs O(ids · W), not O(features² · N_max · W) (see `_SplitFeatureBlocks`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from itertools import accumulate

import torch
import torch.distributed as dist
from torch import Tensor
from torchrec.distributed.batched_embedding_kernel import BatchedFusedEmbeddingBag
from torchrec.distributed.embedding_types import GroupedEmbeddingConfig
from torchrec.distributed.types import ShardingEnv, ShardingType
from torchrec.modules.embedding_configs import PoolingMode
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pep_torchrec.distributed.s_optimizer import OwnSStep, SOptimizerSettings, SOptimizerState, plan_step
from pep_torchrec.ops import ThresholdMode, library, row_width, threshold_pool
from pep_torchrec.ops.threshold_pool import is_traced, s_columns

# Modes whose stored row carries more than v ([v | s], [v | s | pad], [v | m]): the row must stay
# whole on one shard, and the pooled output (D columns) is narrower than the stored row (W).
FULL_ROW_MODES = frozenset({ThresholdMode.ROW_DIM, ThresholdMode.ROW, ThresholdMode.MASK})


@dataclasses.dataclass(frozen=True)
class PEPTableSpec:
    """What a shard needs to know about a PEP table besides TorchRec's own table config.

    Attributes:
        name: the (stored) table name.
        dim: D, the logical embedding dim (the pooled output width).
        mode: where the table's thresholds live.
    """

    name: str
    dim: int
    mode: ThresholdMode

    @property
    def width(self) -> int:
        """W, the stored row width TorchRec sees."""
        return row_width(self.dim, self.mode)

    @property
    def full_row(self) -> bool:
        """Whether a shard must hold whole stored rows (row-carried thresholds or mask)."""
        return self.mode in FULL_ROW_MODES

    def output_cols(self, local_cols: int) -> int:
        """Pooled columns a shard holding `local_cols` stored columns produces: D for whole
        `[v | s]` / `[v | m]` rows, else its slice of v (coarse / plain tables, maybe column-wise)."""
        return self.dim if self.full_row else local_cols


@dataclasses.dataclass(frozen=True)
class PEPStepParams:
    """The per-forward PEP values of one table, read from the owning sharded module every forward
    (so a controller can change s_push between steps, and coarse thresholds are live parameters).

    Attributes:
        gk: threshold scale.
        s_decay, s_push: sparsity pressure, as `threshold_pool` takes them (already rescaled by the
            owner to TorchRec's gradient semantics; see `ShardedPEPEmbeddingBagCollection`).
        coarse_s: [D] threshold logits (COARSE), with the owner's gradient scaling applied; else None.
    """

    gk: float
    s_decay: float
    s_push: float
    coarse_s: Tensor | None


# table name, the shard's column offset into [0, D), its column count → the table's step params.
StepParamsFn = Callable[[str, int, int], PEPStepParams]


class _SplitFeatureBlocks(torch.autograd.Function):
    """`rows_all` [N_max, sum_f C_f] → per feature f the block `rows_all[:N_f, col_f : col_f + C_f]`
    (views, no copy); backward assembles the blocks' gradients into one [N_max, sum C] tensor
    (rows past N_f, and blocks without gradient, are zero): one pass over the buffer, however many
    features the group has."""

    @staticmethod
    def forward(ctx, rows_all: Tensor, ids_per_feature: list[int], cols_T: list[int]) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.ids_per_feature, ctx.cols_T, ctx.shape = ids_per_feature, cols_T, rows_all.shape
        blocks = []
        col = 0
        for num_ids, cols in zip(ids_per_feature, cols_T):
            blocks.append(rows_all[:num_ids, col : col + cols])
            col += cols
        return tuple(blocks)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_blocks: Tensor | None) -> tuple[Tensor, None, None]:  # type: ignore[override]
        num_bags = ctx.shape[0]
        ref = next((g for g in grad_blocks if g is not None), None)
        if ref is None:
            return None, None, None  # type: ignore[return-value]
        grad_all = ref.new_empty(ctx.shape)
        col = 0
        for grad, num_ids, cols in zip(grad_blocks, ctx.ids_per_feature, ctx.cols_T):
            block = grad_all[:, col : col + cols]
            col += cols
            if grad is None:
                block.zero_()
                continue
            block[:num_ids].copy_(grad)
            if num_ids < num_bags:
                block[num_ids:].zero_()  # padding bags: no gradient
        return grad_all, None, None


class PEPBatchedFusedEmbeddingBag(BatchedFusedEmbeddingBag):
    """TorchRec's fused TBE kernel (one fbgemm TBE over a group of tables, optimizer applied in
    backward) with the PEP forward.

    The TBE is asked for one id per bag (pooled path, offsets = per-feature aranges): its output row
    n of feature f is exactly the stored row of the n-th id, and its fused backward applies the
    optimizer to exactly those rows (v and s columns alike). fbgemm's unpooled
    (PoolingMode.NONE) path would do the same but its CPU backward is ~12x slower (docs/architecture.md, F2).
    """

    def __init__(
        self,
        config: GroupedEmbeddingConfig,
        pg: dist.ProcessGroup | None = None,
        device: torch.device | None = None,
        sharding_type: ShardingType | None = None,
        env: ShardingEnv | None = None,
        *,
        pep_specs: Mapping[str, PEPTableSpec],
    ) -> None:
        super().__init__(config, pg=pg, device=device, sharding_type=sharding_type, env=env)
        self._pep_table_specs: list[PEPTableSpec] = []
        for table in self._config.embedding_tables:
            if table.name not in pep_specs:
                raise ValueError(f"table {table.name}: no PEP spec given to the PEP kernel")
            spec = pep_specs[table.name]
            if spec.full_row and table.local_cols != spec.width:
                # The sharder refuses these plans; this guards hand-made ones.
                raise ValueError(
                    f"table {table.name}: this shard holds {table.local_cols} of the {spec.width} stored "
                    f"columns, but mode {spec.mode.value!r} needs whole [v | s] / [v | m] rows"
                )
            self._pep_table_specs.append(spec)
        self._pep_pooling = "mean" if self._pooling == PoolingMode.MEAN else "sum"
        self._pep_step_params: StepParamsFn | None = None
        self._s_optimizer: SOptimizerState | None = None

    def bind_s_optimizer(self, settings: SOptimizerSettings) -> SOptimizerState:
        """Take the s columns away from the fused optimizer: `s_optimizer.OwnSStep` updates them.

        Every table of the group must store rows of one width in one storage (the TBE's, as for
        tables of one embedding dim), so that one step is a handful of ops for the whole group."""
        specs = self._pep_table_specs
        width = self._local_cols[0] if specs else 0
        s_cols = s_columns(specs[0].dim, specs[0].mode) if specs else None
        if s_cols is None or any(
            spec.mode is not specs[0].mode or spec.dim != specs[0].dim or cols != width
            for spec, cols in zip(specs, self._local_cols)
        ):
            raise NotImplementedError(
                "pep.s_optimizer=sgd needs every table of a TBE group in one threshold mode with s "
                f"columns and one embedding dim; this group has {[(s.name, s.mode.value, s.dim) for s in specs]}"
            )
        cache = getattr(self.emb_module, "lxu_cache_weights", None)
        if cache is not None and cache.numel() > 0:
            raise NotImplementedError(
                "pep.s_optimizer=sgd does not support UVM-cached tables (it updates "
                "the backing rows, not the cache); place the tables in HBM or host memory"
            )
        weights = self.split_embedding_weights()
        storage = weights[0].untyped_storage()
        if any(
            w.untyped_storage().data_ptr() != storage.data_ptr() or w.storage_offset() % width
            for w in weights
        ):
            raise NotImplementedError("pep.s_optimizer=sgd: the group's tables are not rows of one storage")
        whole = torch.empty(0, dtype=weights[0].dtype, device=weights[0].device).set_(storage)
        # A tensor of its own over the TBE's storage: in-place updates do not bump the version
        # counter of the weights the TBE saved for backward.
        self._s_storage = whole[: whole.numel() // width * width].view(-1, width)
        self._s_cols = s_cols
        self._s_optimizer = SOptimizerState(settings, [spec.name for spec in specs])
        return self._s_optimizer

    def _own_s(
        self, rows_all: Tensor, values: Tensor, ids_per_feature: list[int], num_features: int
    ) -> Tensor:
        """The own s optimizer's hook on the gathered rows (training only; identity otherwise)."""
        state = self._s_optimizer
        if state is None or not rows_all.requires_grad or is_traced(values):
            return rows_all
        assert self._pep_step_params is not None
        gk = self._pep_step_params(self._pep_table_specs[0].name, 0, self._local_cols[0]).gk
        plan = plan_step(
            self.split_embedding_weights(),
            self._feature_table_map[:num_features],
            values,
            ids_per_feature,
            self._s_cols,
            self._local_cols[0],
            self._s_storage,
            gk,
        )
        return OwnSStep.apply(rows_all, plan, state)

    def bind_step_params(self, fn: StepParamsFn) -> None:
        """Set where the kernel reads gk, s_decay, s_push and coarse thresholds each forward (a
        bound method of the owning `ShardedPEPEmbeddingBagCollection`; a plain attribute, so the
        owner is not registered as a submodule of its own kernel)."""
        self._pep_step_params = fn

    def pep_tables(self) -> list[tuple[PEPTableSpec, int, int, Tensor]]:
        """This kernel's local shards: (spec, row offset, column offset, [rows, C] stored weight)."""
        # A UVM-caching TBE (`fused_uvm_caching` on CUDA) keeps recent updates in its HBM cache:
        # write them back first, or the kept counts and margins read stale rows (TorchRec's own
        # state_dict flushes the same way). Without a cache this is a no-op.
        self.flush()
        return [
            (spec, row_offset, col_offset, weight)
            for spec, row_offset, col_offset, weight in zip(
                self._pep_table_specs,
                self._row_offset,
                self._col_offset,
                self.split_embedding_weights(),
            )
        ]

    def forward(
        self,
        features: KeyedJaggedTensor,
        vbe_output: Tensor | None = None,
        vbe_output_offsets: Tensor | None = None,
    ) -> Tensor:
        """Thresholded, pooled embeddings of this shard's features.

        Args:
            features: this group's features on this shard (local row ids), T keys × B bags.

        Returns:
            [B, sum over features of output cols] in feature order: what the stock kernel returns,
            except that a whole `[v | s]` row pools to its D v-columns.
        """
        if features.variable_stride_per_key():
            raise NotImplementedError("PEP tables do not support variable batch size per feature (VBE)")
        if self._pep_step_params is None:
            raise RuntimeError(
                "PEP kernel called before ShardedPEPEmbeddingBagCollection bound its parameters "
                "(build it through PEPEmbeddingBagCollectionSharder)"
            )
        num_features = len(features.keys())
        batch = features.stride()
        values = features.values()
        offsets = features.offsets()
        weights = features.weights_or_none()
        if weights is not None and not torch.is_floating_point(weights):
            weights = None  # as BaseBatchedEmbeddingBag.forward: integer weights are not weights
        ids_per_feature: list[int] = features.length_per_key()
        starts = list(accumulate(ids_per_feature, initial=0))

        rows_all = self._gather_rows(values, ids_per_feature, starts)  # [N_max, sum over features of C]
        rows_all = self._own_s(rows_all, values, ids_per_feature, num_features)

        grouped = self._grouped_threshold_pool(rows_all, offsets, weights, num_features)
        if grouped is not None:
            return grouped
        return self._threshold_pool_per_feature(rows_all, offsets, weights, ids_per_feature, starts, batch)

    def _gather_rows(self, values: Tensor, ids_per_feature: list[int], starts: list[int]) -> Tensor:
        """The stored rows of every id of the group, [N_max, sum over features of C]: feature f's C
        columns hold the rows of its N_f ids, then zero rows.

        Feature f gets N_max one-id bags; bag n holds id n of f while n < N_f, later bags are empty
        (zero rows, no gradient). One TBE call for the whole group: the TBE wants the same bag count
        for every feature (short of VBE), hence the padding to N_max, which costs T·N_max·C output
        elements (∝ ids when the features of a group have similar id counts).
        `length_per_key()` is cached by the input dist when it can be; else it syncs the host.
        """
        num_bags = max([*ids_per_feature, 1])
        device = values.device
        start_T = torch.tensor(starts[:-1], dtype=torch.int64, device=device)
        count_T = torch.tensor(ids_per_feature, dtype=torch.int64, device=device)
        bag_N = torch.arange(num_bags, dtype=torch.int64, device=device)
        gather_offsets = torch.cat(
            [
                (start_T.unsqueeze(1) + torch.minimum(bag_N.unsqueeze(0), count_T.unsqueeze(1))).reshape(-1),
                torch.tensor([starts[-1]], dtype=torch.int64, device=device),
            ]
        )
        return self.emb_module(
            indices=values.to(self._embedding_table_index_type),
            offsets=gather_offsets.to(self._embedding_table_offset_type),
        )

    def _threshold_pool_per_feature(
        self,
        rows_all: Tensor,
        offsets: Tensor,
        weights: Tensor | None,
        ids_per_feature: list[int],
        starts: list[int],
        batch: int,
    ) -> Tensor:
        """`threshold_pool` on each feature's block of the gathered rows; [B, sum of output cols]."""
        num_features = len(ids_per_feature)
        # One autograd node splits the TBE output into the features' [N_f, C] blocks, and its
        # backward writes every feature's gradient into one [N_max, sum C] buffer. (Slicing
        # `rows_all[:N_f, col:col + C]` per feature made autograd materialise a full-size zero
        # gradient per feature and add them up: backward cost ∝ T² · N_max · C.)
        cols_T = [self._local_cols[self._feature_table_map[f]] for f in range(num_features)]
        rows_per_feature = _SplitFeatureBlocks.apply(rows_all, ids_per_feature, cols_T)
        pooled: list[Tensor] = []
        for f in range(num_features):
            t = self._feature_table_map[f]
            spec = self._pep_table_specs[t]
            cols = cols_T[f]
            rows_NC = rows_per_feature[f]
            params = self._pep_step_params(spec.name, self._col_offset[t], cols)
            bag_offsets = offsets[f * batch : (f + 1) * batch + 1] - starts[f]
            pooled.append(
                threshold_pool(
                    rows_NC,
                    bag_offsets,
                    dim=spec.output_cols(cols),
                    mode=spec.mode,
                    gk=params.gk,
                    coarse_s=params.coarse_s,
                    per_sample_weights=None if weights is None else weights[starts[f] : starts[f + 1]],
                    pooling=self._pep_pooling,
                    s_decay=params.s_decay,
                    s_push=params.s_push,
                )
            )
        return torch.cat(pooled, dim=1)

    def _grouped_threshold_pool(
        self,
        rows_all: Tensor,
        offsets: Tensor,
        weights: Tensor | None,
        num_features: int,
    ) -> Tensor | None:
        """All features of the group in one fused call (`library.GroupedThresholdPool`: C++ on CPU,
        Triton on CUDA), or None where that path does not apply: it needs the fused kernels chosen
        (`library.default_impl`) and a grouped one for the rows' dtype, one whole-row mode (or
        NONE), D, W, gk and pressure shared by every table of the group, no coarse thresholds and no
        gradient for the per-sample weights; otherwise the per-feature path."""
        if (
            num_features == 0
            or is_traced(rows_all)  # fake tensors / compile: the per-feature op has a fake implementation
        ):
            return None
        if weights is not None and weights.requires_grad:
            return None
        first = self._pep_table_specs[self._feature_table_map[0]]
        if first.mode is ThresholdMode.COARSE or not library.fused_available(rows_all.device):
            return None
        code = library.MODE_CODES[first.mode]
        if not library.group_kernel_available(rows_all.device, rows_all.dtype, first.dim, code):
            return None
        params = None
        for t in sorted(set(self._feature_table_map[:num_features])):
            spec = self._pep_table_specs[t]
            if spec.mode is not first.mode or spec.dim != first.dim or self._local_cols[t] != first.width:
                return None
            p = self._pep_step_params(spec.name, self._col_offset[t], self._local_cols[t])  # type: ignore[misc]
            if p.coarse_s is not None or (params is not None and (p.gk, p.s_decay, p.s_push) != params):
                return None
            params = (p.gk, p.s_decay, p.s_push)
        assert params is not None
        gk, s_decay, s_push = params
        return library.GroupedThresholdPool.apply(
            rows_all.contiguous(), offsets, weights, num_features, first.dim, code,
            float(gk), self._pep_pooling == "mean", float(s_decay), float(s_push),
        )  # fmt: skip
