"""Thresholds with their own optimizer (`pep.s_optimizer: sgd`), applied in backward to the rows a
step looked up.

Why: the fused TBE optimizer of a PEP table updates v and s together, and element-wise Adagrad
normalises every element's gradient, so s cannot build a spread of its own: every touched s moves
~lr per touch, whatever its gradient says, and |v| ends up deciding which elements survive (issue 10;
measured in benchmarks/research/issue10/README.md). Here the s columns of the gathered rows are taken
away from the fused optimizer (their gradient is zeroed before it reaches the TBE backward, so
Adagrad leaves them alone) and updated by this rule instead, on exactly the rows of the batch:

    s_r ← s_r − scale_t · g_r / gk    g_r = Σ over row r's occurrences in the batch of ∂loss/∂s_r

    scale_t = lr                      (`norm: none`, plain SGD)
    scale_t = lr / rms_t              (`norm: table`, the default)

where rms_t is the root of an exponential moving average (β = 0.99 per step) of mean_c((g_r/gk)²)
over the looked-up rows of table t. One scalar per table keeps the step unit-free and, unlike
element-wise Adagrad, keeps the relative sizes of the elements' gradients (frequency included): s
accumulates a frequency-weighted "what does raising this threshold cost" score. The gradient is
measured in units of gk because it is proportional to the threshold gk·σ(s): when the controller or
gk_growth moves gk between two syncs, the step size stays right (without it, a search whose first
eval raised gk 600x took steps 600x too large until the next sync, and s ran off to -7e5).

Cost ∝ ids in the batch: one sort of the group's ids (on CPU a C++ radix sort, `pep_unique_rows`;
else torch.unique), one gather of their s-gradients and one pass over those rows' s columns (the C++
`pep_s_update` on CPU, else a gather and a scatter of the rows). The statistics are
accumulated locally and folded into rms_t at `sync` points (the search's control steps: at evals),
by one all-reduce of two numbers per table, so every rank of a sharded table (row-wise shards see
disjoint rows) uses the same scale, and a run on any number of ranks takes the same steps. s does
not move before the first sync (step 1; `Trainer` syncs after it).

State (in the trainer's checkpoint state, the same on every rank): the EMA per table and the
statistics gathered since the last sync, summed over ranks at save time; a resumed run adds those
once at its next sync, so a resume takes the same steps, on any number of ranks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from pep_torchrec.ops import threshold_pool_cpu as cpu_kernel

NORMS = ("table", "none")
BETA = 0.99  # per-step EMA factor of the table RMS (a horizon of ~100 steps)


@dataclasses.dataclass(frozen=True)
class SOptimizerSettings:
    lr: float
    norm: str = "table"

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"s optimizer norm {self.norm!r}: expected one of {NORMS}")
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise ValueError(f"s optimizer lr must be a finite number >= 0, got {self.lr}")


class SOptimizerState:
    """One kernel's (TBE group's) part: per local table, the step scale in use and the gradient
    statistics accumulated since the last sync.

    Args:
        settings: lr and norm.
        tables: the global table name of each local table (the kernel's table order).
    """

    def __init__(self, settings: SOptimizerSettings, tables: list[str]) -> None:
        self.settings = settings
        self.tables = list(tables)
        n = len(self.tables)
        self.scale = torch.zeros(n, dtype=torch.float64)  # 0 until the first sync (norm: table)
        if settings.norm == "none":
            self.scale.fill_(settings.lr)
        self.sum_sq = torch.zeros(n, dtype=torch.float64)
        self.rows = torch.zeros(n, dtype=torch.float64)

    @torch.no_grad()
    def update(
        self, weight: Tensor, ids: Tensor, table_of_id: Tensor, grad_s: Tensor, s_cols: slice, gk: float
    ) -> None:
        """One step on rows `ids` (unique) of `weight` (table `table_of_id` each), with their
        summed s-gradients grad_s [U, S] at threshold scale gk; accumulates the statistics for the
        next sync."""
        if ids.numel() == 0 or gk <= 0:
            return  # gk = 0: no threshold, no gradient
        weight = weight.data  # the TBE saved the weights for backward: bypass the version counter
        grad = grad_s / gk
        self.sum_sq.index_add_(0, table_of_id.cpu(), grad.pow(2).mean(1).double().cpu())
        self.rows += torch.bincount(table_of_id.cpu(), minlength=len(self.tables)).double()
        if (
            weight.device.type == "cpu"
            and weight.dtype == grad.dtype
            and weight.stride(1) == 1
            and cpu_kernel.available()
        ):
            # The same step, bit for bit, in one pass over the rows' s columns (no gather / scatter of
            # whole rows: ~3x faster).
            cpu_kernel.s_update(weight, ids, table_of_id, grad_s, s_cols.start, self.scale, gk)
            return
        scale = self.scale.to(device=weight.device, dtype=grad.dtype)[table_of_id].unsqueeze(1)
        # Whole rows out and back in (contiguous row copies are several times faster on CPU than an
        # index_add_ or index_put_ into the strided s columns).
        rows = weight.index_select(0, ids)
        rows[:, s_cols] -= (grad * scale).to(weight.dtype)
        weight.index_copy_(0, ids, rows)


class SOptimizerSync:
    """The module-wide part: the EMA of every table's mean squared s-gradient, folded from all
    kernels' (and all ranks') accumulators at each sync, and the scales it sets.

    Args:
        settings: lr and norm.
        tables: every PEP table of the module (the same list on every rank).
        kernels: this rank's kernel states.
    """

    def __init__(
        self, settings: SOptimizerSettings, tables: list[str], kernels: list[SOptimizerState]
    ) -> None:
        self.settings = settings
        self.tables = list(tables)
        self.kernels = kernels
        self.mean_sq: dict[str, float | None] = dict.fromkeys(self.tables)
        self.last_sync = 0
        self.carry = torch.zeros(len(self.tables), 2, dtype=torch.float64)  # see load_state

    def _totals(self, all_reduce: Any, reset: bool) -> torch.Tensor:
        """[tables, 2] float64: Σ mean_c(g²) and rows looked up since the last sync, over every
        kernel and rank (plus what a resumed run carried over from its checkpoint)."""
        index = {name: i for i, name in enumerate(self.tables)}
        totals = self.carry.clone()
        for kernel in self.kernels:
            for t, name in enumerate(kernel.tables):
                totals[index[name], 0] += kernel.sum_sq[t]
                totals[index[name], 1] += kernel.rows[t]
        if reset:
            self.carry.zero_()
            for kernel in self.kernels:
                kernel.sum_sq.zero_()
                kernel.rows.zero_()
        if all_reduce is not None:
            all_reduce(totals)
        return totals

    @torch.no_grad()
    def sync(self, step: int, all_reduce: Any = None) -> None:
        """Fold the statistics of steps (last_sync, step] into the EMA and set every kernel's scale.

        Args:
            step: the trainer's step (steps done).
            all_reduce: sums a float64 CPU tensor over ranks in place (None: one rank).
        """
        totals = self._totals(all_reduce, reset=True)
        decay = BETA ** max(step - self.last_sync, 0)
        for name, (sum_sq, rows) in zip(self.tables, totals.tolist()):
            if rows <= 0:
                continue
            mean = sum_sq / rows
            prev = self.mean_sq[name]
            self.mean_sq[name] = mean if prev is None else decay * prev + (1.0 - decay) * mean
        self.last_sync = step
        self._set_scales()

    def _set_scales(self) -> None:
        if self.settings.norm == "none":
            return
        for kernel in self.kernels:
            for t, name in enumerate(kernel.tables):
                ms = self.mean_sq[name]
                kernel.scale[t] = self.settings.lr / math.sqrt(ms) if ms else 0.0

    def state(self, all_reduce: Any = None) -> dict[str, Any]:
        """The whole state, the same on every rank (a collective where there are ranks): the EMA and
        the statistics gathered since the last sync, summed over ranks. JSON-able."""
        pending = self._totals(all_reduce, reset=False)
        return {
            "mean_sq": dict(self.mean_sq),
            "last_sync": self.last_sync,
            "pending": {name: row for name, row in zip(self.tables, pending.tolist())},
        }

    def load_state(self, state: dict[str, Any], *, carry: bool) -> None:
        """Restore `state()`; `carry`: this rank adds the saved pending statistics at the next sync
        (one rank only, so they count once, whatever the world size now)."""
        saved = state["mean_sq"]
        if set(saved) != set(self.tables):
            raise ValueError(
                f"s optimizer state: tables {sorted(saved)} != this model's {sorted(self.tables)}"
            )
        self.mean_sq = {name: saved[name] for name in self.tables}
        self.last_sync = int(state["last_sync"])
        for kernel in self.kernels:
            kernel.sum_sq.zero_()
            kernel.rows.zero_()
        self.carry.zero_()
        if carry:
            self.carry = torch.tensor([state["pending"][name] for name in self.tables], dtype=torch.float64)
        self._set_scales()


class OwnSStep(torch.autograd.Function):
    """Identity on the gathered rows; backward updates the s columns of the looked-up rows with the
    kernel's `SOptimizerState` and hands the TBE a gradient whose s columns are zero.

    Args (forward): rows_all [N_max, T·W] (the TBE's output: feature f's rows in columns
    [f·W, (f+1)·W)); plan: `SPlan`; state.
    """

    @staticmethod
    def forward(ctx, rows_all: Tensor, plan: SPlan, state: SOptimizerState) -> Tensor:  # type: ignore[override]
        ctx.plan, ctx.state = plan, state
        return rows_all.view_as(rows_all)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        plan: SPlan = ctx.plan
        # Zeroed in place: the incoming gradient is the threshold-pool backward's own buffer.
        grad = grad.contiguous()
        n_max = grad.shape[0]
        if plan.slots is not None and plan.seg is not None:
            # The C++ gather over the occurrences grouped by row (`plan_step`): the same sums, bit
            # for bit, in one pass; threads split the rows.
            g = cpu_kernel.s_gather(
                grad,
                grad.shape[1] // plan.width,
                plan.width,
                plan.s_cols.start,
                plan.s_cols.stop - plan.s_cols.start,
                plan.slots,
                plan.seg,
                plan.lengths,
            )
            ctx.state.update(plan.storage, plan.ids, plan.table_of_id, g, plan.s_cols, plan.gk)
            return grad, None, None
        s_NFS = grad.view(n_max, -1, plan.width)[:, :, plan.s_cols]  # [N_max, F, S] view
        if plan.lengths is None:  # every feature has N_max ids: occurrences in (n, f) order
            occurrences = s_NFS.reshape(-1, s_NFS.shape[-1]).contiguous()  # index_add_ is slow on strided
        else:
            valid = torch.arange(n_max, device=grad.device).unsqueeze(0) < plan.lengths.to(
                grad.device
            ).unsqueeze(1)
            occurrences = s_NFS.transpose(0, 1)[valid]  # (f, n) order, n < N_f
        g = grad.new_zeros(plan.ids.numel(), s_NFS.shape[-1]).index_add_(0, plan.inverse, occurrences)
        s_NFS.zero_()
        ctx.state.update(plan.storage, plan.ids, plan.table_of_id, g, plan.s_cols, plan.gk)
        return grad, None, None


@dataclasses.dataclass
class SPlan:
    """What one step's backward updates: the group's rows as one [rows, W] storage view, the unique
    looked-up rows in it (`ids`, global in the storage), each one's local table, the inverse map
    from the batch's occurrences to `ids`: in (n, f) order when every feature has N_max ids
    (`lengths` None), else in (f, n) order over n < N_f (`lengths`: ids per feature); on CPU with
    the C++ kernels also the occurrences grouped by row (`slots`, `seg`: see
    `threshold_pool_cpu.unique_rows`) for the backward's gather."""

    storage: Tensor
    ids: Tensor
    table_of_id: Tensor
    inverse: Tensor
    lengths: Tensor | None
    s_cols: slice
    width: int
    gk: float
    slots: Tensor | None = None
    seg: Tensor | None = None


def plan_step(
    weights: list[Tensor],
    feature_table: list[int],
    values: Tensor,
    lengths: list[int],
    s_cols: slice,
    width: int,
    storage_view: Tensor,
    gk: float,
) -> SPlan:
    """Map this batch's ids (feature-major, local to each feature's table) to rows of the group's
    storage: every table of a TBE group lies in one storage with the same stored width W, so the
    global row is the local id plus the table's row offset there."""
    device = values.device
    row_base = torch.tensor([w.storage_offset() // width for w in weights], dtype=torch.int64)
    table_F = torch.tensor(feature_table, dtype=torch.int64)
    num_features = len(lengths)
    uniform = num_features > 0 and all(n == lengths[0] for n in lengths)
    lengths_F = None if uniform else torch.tensor(lengths, dtype=torch.int64)
    base_sorted, order = row_base.sort()
    if device.type == "cpu" and cpu_kernel.available():
        # One radix sort of the ids in C++: torch.unique's sort and the bucketize took ~3 ms a step
        # at 26 x 4,096 ids (one thread), a tenth of a search step's extra time.
        ids, inverse, table_of_id, slots, seg = cpu_kernel.unique_rows(
            values, num_features, lengths_F, row_base[table_F], storage_view.shape[0], base_sorted, order
        )
        return SPlan(storage_view, ids, table_of_id, inverse, lengths_F, s_cols, width, float(gk), slots, seg)
    if uniform:
        # One view of the ids in the gathered rows' (n, f) order: backward reads the gradient as is.
        rows = (
            (values.long().view(num_features, -1) + row_base[table_F].to(device).unsqueeze(1)).t().reshape(-1)
        )
    else:
        rows = values.long() + torch.repeat_interleave(row_base[table_F], lengths_F).to(device)
    ids, inverse = torch.unique(rows, return_inverse=True)
    table_of_id = order.to(device)[torch.bucketize(ids, base_sorted.to(device), right=True) - 1]
    return SPlan(storage_view, ids, table_of_id, inverse, lengths_F, s_cols, width, float(gk))
