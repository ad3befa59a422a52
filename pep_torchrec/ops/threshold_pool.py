"""PEP soft thresholding + bag pooling over gathered embedding rows: the pure-PyTorch reference.

Legend: N = gathered rows (one per looked-up id, in bag order), B = bags, D = embedding dim,
W = stored row width (`row_width(D, mode)`).

PEP (Liu et al., ICLR 2021) re-parameterises every embedding element as

    v̂ = sign(v) · relu(|v| − gk · sigmoid(s))

with learnable threshold logits `s`. This module is the *specification* of the op the PEP embedding
modules call: `threshold_pool` dispatches to the registered op (`library.py`: Triton on CUDA, a
compiled C++ path on CPU), whose kernels must agree with `threshold_pool_reference`, forward and
backward. Only the rows looked up in the
batch are thresholded (cost ∝ ids in the batch, never ∝ table rows), and only the pooled [B, D]
result leaves the op; thresholding is element-wise, so pooling partial bags (row-wise sharding) and
summing them later is exact.

Where `s` lives is the `ThresholdMode`:

    mode      stored row                  W      s used for row n, column d
    ROW_DIM   [v (D) | s (D)]             2D     rows[n, D + d]        (feature_dim granularity)
    ROW       [v (D) | s | pad pad pad]   D + 4  rows[n, D]            (feature granularity)
    COARSE    [v (D)]                     D      coarse_s[d]           (global/dimension/field/field_dim)
    MASK      [v (D) | m (D)]             2D     none: v̂ = v · 1[m > 0.5]   (retrain)
    NONE      [v (D)]                     D      none: v̂ = v

Gradients (what the fused TBE optimizer of a sharded table receives for the gathered rows):
columns [0, D) get the v-gradient, the s columns the s-gradient, pad columns (ROW) and m columns
(MASK) exact zeros. Autograd of the formula gives, with t = gk·σ(s),

    ∂v̂/∂v = sign(v)² · 1[|v| > t]    (= 1[|v| > t] for v ≠ 0, and 0 at v = 0: no NaN)
    ∂v̂/∂s = −sign(v) · 1[|v| > t] · gk · σ(s)(1 − σ(s))

(relu's subgradient at the kink |v| = t is 0, so an element exactly at its threshold is pruned and
gets no gradient.)

Sparsity pressure (docs/architecture.md, decision 4): the authors' L2 weight decay on `s` moves every `s` every
step, but TorchRec's fused optimizers only update looked-up rows. So the op itself adds
`s_decay · s − s_push` to the gradient of `s`: once per gathered row occurrence in the row modes
(a row looked up k times gets it k times, because TBE sums duplicate-id gradients), once per call
for COARSE (on the [D] `coarse_s` it was given). Positive `s_push` raises `s`, hence the
thresholds, hence pruning. The term is added by an identity autograd.Function, so the forward
stays the formula above.
"""

from __future__ import annotations

import enum

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

# ROW mode reserves 4 columns after v (s in the first, 3 pad columns) because fbgemm's TBE kernels
# need row widths divisible by 4; with D divisible by 4, D + 4 stays divisible by 4.
ROW_S_COLUMNS = 4

_POOLINGS = ("sum", "mean")


class ThresholdMode(str, enum.Enum):
    """Where the threshold logits `s` live (see the module docstring for the stored row layouts)."""

    ROW_DIM = "row_dim"
    ROW = "row"
    COARSE = "coarse"
    MASK = "mask"
    NONE = "none"


def row_width(dim: int, mode: ThresholdMode | str) -> int:
    """W, the stored row width for embedding dim D in `mode`: 2D (ROW_DIM, MASK), D + 4 (ROW), D."""
    mode = ThresholdMode(mode)
    if dim <= 0:
        raise ValueError(f"embedding dim must be positive, got {dim}")
    if mode in (ThresholdMode.ROW_DIM, ThresholdMode.MASK):
        return 2 * dim
    if mode is ThresholdMode.ROW:
        return dim + ROW_S_COLUMNS
    return dim


def s_columns(dim: int, mode: ThresholdMode | str) -> slice | None:
    """The columns of a stored row that hold `s` (ROW_DIM: [D, 2D), ROW: [D, D+1)), else None."""
    mode = ThresholdMode(mode)
    if mode is ThresholdMode.ROW_DIM:
        return slice(dim, 2 * dim)
    if mode is ThresholdMode.ROW:
        return slice(dim, dim + 1)
    return None


class _AddSPressure(torch.autograd.Function):
    """Identity forward; backward adds `s_decay · x[..., cols] − s_push` to the incoming gradient.

    Applied to the gathered [N, W] rows (cols = the s columns: once per row occurrence) or to the
    [D] coarse_s (cols = all: once per call).
    """

    @staticmethod
    def forward(ctx, x: Tensor, start: int, stop: int, s_decay: float, s_push: float) -> Tensor:  # type: ignore[override]
        ctx.start, ctx.stop, ctx.s_decay, ctx.s_push = start, stop, s_decay, s_push
        if s_decay != 0.0:
            ctx.save_for_backward(x)
        # A view, not `x` itself: autograd.Function outputs that alias an input must be views.
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:  # type: ignore[override]
        # The incoming gradient may be an expanded (stride-0) zero tensor: copy before writing.
        grad = grad.clone(memory_format=torch.contiguous_format)
        region = grad[..., ctx.start : ctx.stop]
        if ctx.s_decay != 0.0:
            (x,) = ctx.saved_tensors
            region.add_(x[..., ctx.start : ctx.stop], alpha=ctx.s_decay)
        if ctx.s_push != 0.0:
            region.sub_(ctx.s_push)
        return grad, None, None, None, None


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 accumulation for fp16/bf16/fp32 tables; float64 stays float64 (gradcheck in tests).
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_rows(rows: Tensor, dim: int, mode: ThresholdMode, coarse_s: Tensor | None) -> None:
    if rows.dim() != 2:
        raise ValueError(f"rows must be [N, W], got shape {tuple(rows.shape)}")
    expected = row_width(dim, mode)
    if rows.shape[1] != expected:
        raise ValueError(
            f"rows are {rows.shape[1]} wide, but mode {mode.value!r} with dim {dim} stores {expected} columns"
        )
    if mode is ThresholdMode.COARSE:
        if coarse_s is None:
            raise ValueError("mode 'coarse' needs coarse_s (the [D] threshold logits)")
        if tuple(coarse_s.shape) != (dim,):
            raise ValueError(f"coarse_s must be [D] = [{dim}], got shape {tuple(coarse_s.shape)}")
    elif coarse_s is not None:
        raise ValueError(f"coarse_s is only used in mode 'coarse', got mode {mode.value!r}")


def _threshold(rows: Tensor, dim: int, mode: ThresholdMode, gk: float, coarse_s: Tensor | None) -> Tensor:
    """v̂ [N, D] in the accumulation dtype (no checks, no pressure)."""
    dtype = _accumulation_dtype(rows.dtype)
    v_ND = rows[:, :dim].to(dtype)
    if mode is ThresholdMode.NONE:
        return v_ND
    if mode is ThresholdMode.MASK:
        # The mask enters only through a comparison: m never gets gradient, masked v gets zero.
        keep_ND = rows[:, dim : 2 * dim] > 0.5
        return v_ND * keep_ND.to(dtype)
    if mode is ThresholdMode.ROW_DIM:
        s = rows[:, dim : 2 * dim]
    elif mode is ThresholdMode.ROW:
        s = rows[:, dim : dim + 1]  # [N, 1], broadcast over D
    else:
        assert coarse_s is not None
        s = coarse_s  # [D], broadcast over N
    threshold = gk * torch.sigmoid(s.to(dtype))
    # The literal formula: autograd of it is exactly the subgradient in the module docstring
    # (sign() has zero derivative, abs() has derivative sign(v), relu's is 1[x > 0]).
    return torch.sign(v_ND) * torch.relu(v_ND.abs() - threshold)


def threshold(
    rows: Tensor,
    *,
    dim: int,
    mode: ThresholdMode | str,
    gk: float = 1.0,
    coarse_s: Tensor | None = None,
) -> Tensor:
    """The thresholded embeddings v̂ of each gathered row, without pooling (tests, counting).

    Args:
        rows: [N, W] stored rows (W = `row_width(dim, mode)`).
        dim: D.
        mode: where `s` lives (`ThresholdMode` or its string value).
        gk: threshold scale; the threshold is gk·sigmoid(s) ∈ (0, gk).
        coarse_s: [D] threshold logits, COARSE mode only.

    Returns:
        [N, D] v̂ (float32, or float64 for float64 rows); differentiable, no sparsity pressure.
    """
    mode = ThresholdMode(mode)
    _check_rows(rows, dim, mode, coarse_s)
    return _threshold(rows, dim, mode, gk, coarse_s)


@torch.no_grad()
def margins(
    rows: Tensor,
    *,
    dim: int,
    mode: ThresholdMode | str,
    gk: float = 1.0,
    coarse_s: Tensor | None = None,
) -> Tensor:
    """How far each element is above its threshold; an element is kept ⇔ its margin > 0.

    Args: as `threshold`.

    Returns:
        [N, D] float (float32, or float64 for float64 rows): |v| − gk·sigmoid(s) in the threshold
        modes; MASK: |v| where m > 0.5, −1 where masked; NONE: |v|. (So v = 0 counts as pruned in
        every mode: it contributes nothing.) This is also the ranking key for exact budgets.
    """
    mode = ThresholdMode(mode)
    _check_rows(rows, dim, mode, coarse_s)
    dtype = _accumulation_dtype(rows.dtype)
    abs_v_ND = rows[:, :dim].to(dtype).abs()
    if mode is ThresholdMode.NONE:
        return abs_v_ND
    if mode is ThresholdMode.MASK:
        keep_ND = rows[:, dim : 2 * dim] > 0.5
        return torch.where(keep_ND, abs_v_ND, torch.full_like(abs_v_ND, -1.0))
    if mode is ThresholdMode.ROW_DIM:
        s = rows[:, dim : 2 * dim]
    elif mode is ThresholdMode.ROW:
        s = rows[:, dim : dim + 1]
    else:
        assert coarse_s is not None
        s = coarse_s
    return abs_v_ND - gk * torch.sigmoid(s.to(dtype))


def is_traced(t: Tensor) -> bool:
    """Whether a call on `t` is being traced (torch.compile, fake tensors, a dispatch mode) rather
    than run: then there are no values to check, and no pointers to hand a kernel."""
    return (
        torch.compiler.is_compiling()
        # `type`, not isinstance: a FakeTensor made from a Parameter passes isinstance(·, Parameter).
        or type(t) not in (Tensor, torch.nn.Parameter)
        or _get_current_dispatch_mode() is not None
    )


def _validate(
    rows: Tensor,
    offsets: Tensor,
    dim: int,
    mode: ThresholdMode | str,
    coarse_s: Tensor | None,
    per_sample_weights: Tensor | None,
    pooling: str,
) -> tuple[ThresholdMode, Tensor]:
    """Check the op's inputs (ValueError naming the problem); returns (mode, int64 offsets)."""
    mode = ThresholdMode(mode)
    _check_rows(rows, dim, mode, coarse_s)
    if pooling not in _POOLINGS:
        raise ValueError(f"pooling must be one of {_POOLINGS}, got {pooling!r}")
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"offsets must be [B + 1], got shape {tuple(offsets.shape)}")
    num_rows = rows.shape[0]
    num_bags = offsets.numel() - 1
    offsets = offsets.to(torch.int64)
    # Checked on CPU in eager mode only: on an accelerator the check would force a device sync, and
    # traced (torch.compile, fake tensors) it is a data-dependent branch.
    if (
        offsets.device.type == "cpu"
        and not is_traced(offsets)
        and (
            int(offsets[0]) != 0
            or int(offsets[-1]) != num_rows
            or (num_bags > 0 and bool((offsets[1:] < offsets[:-1]).any()))
        )
    ):
        raise ValueError(f"offsets must be non-decreasing from 0 to N = {num_rows}, got {offsets.tolist()}")
    if per_sample_weights is not None and tuple(per_sample_weights.shape) != (num_rows,):
        raise ValueError(
            f"per_sample_weights must be [N] = [{num_rows}], got shape {tuple(per_sample_weights.shape)}"
        )

    return mode, offsets


def threshold_pool(
    rows: Tensor,
    offsets: Tensor,
    *,
    dim: int,
    mode: ThresholdMode | str,
    gk: float = 1.0,
    coarse_s: Tensor | None = None,
    per_sample_weights: Tensor | None = None,
    pooling: str = "sum",
    s_decay: float = 0.0,
    s_push: float = 0.0,
) -> Tensor:
    """Threshold the gathered rows and pool them into bags (the PEP embedding-bag op).

    Args:
        rows: [N, W] gathered stored rows, one per looked-up id, in bag order (W = `row_width`).
        offsets: [B + 1] integer bag boundaries into `rows` (offsets[0] = 0, offsets[B] = N);
            empty bags are allowed.
        dim: D.
        mode: where `s` lives (`ThresholdMode` or its string value).
        gk: threshold scale; the threshold is gk·sigmoid(s).
        coarse_s: [D] threshold logits (COARSE only; may require grad). Coarse granularities pass
            their parameter broadcast to [D] (e.g. `global_s.expand(D)`).
        per_sample_weights: [N] weight of each row in its bag (multiplies v̂).
        pooling: "sum", or "mean": the weighted sum divided by the bag's row count N_b (empty bag → 0).
        s_decay: adds `s_decay · s` to the gradient of s (L2 decay on the thresholds), see below.
        s_push: subtracts `s_push` from the gradient of s (positive: thresholds rise, more pruning).

    Returns:
        [B, D] pooled v̂, float32 (float64 for float64 rows), accumulated in that dtype.

    Sparsity pressure is added only in the threshold modes: per gathered row occurrence for
    ROW_DIM/ROW, once per call on `coarse_s` for COARSE (so a [1] parameter expanded to [D] receives
    D times the term), and only when the tensor requires grad.

    Implementation: the kernels of the registered op `pep_torchrec::threshold_pool` (`library.py`:
    fused C++ on CPU, Triton on CUDA, forward and backward; called directly in eager mode, through
    the op when traced) where they exist (`library.default_impl`), else the reference
    (`threshold_pool_reference`, the spec); `PEP_TORCHREC_OPS=reference` forces the reference.
    The reference pools with a segment sum: `zeros(B, D).index_add(0, bag_of_row, v̂)`, with bag_of_row from
    `repeat_interleave` over the bag lengths. It is vectorised, handles empty bags and mean pooling
    with per-sample weights (which `F.embedding_bag` refuses), and its backward is a gather. On
    CUDA `index_add` uses atomics, so the summation order (last bits) is not deterministic there.
    Offsets are validated on CPU in eager mode only (on an accelerator the check would force a
    device sync; under torch.compile it would be a data-dependent graph break).
    """
    mode, offsets = _validate(rows, offsets, dim, mode, coarse_s, per_sample_weights, pooling)
    from pep_torchrec.ops import library  # the registered op imports this module

    if not library.fused_available(rows.device):
        return _threshold_pool_reference(
            rows, offsets, dim, mode, gk, coarse_s, per_sample_weights, pooling, s_decay, s_push
        )
    return library.threshold_pool_fused(
        rows, offsets, coarse_s, per_sample_weights, dim, library.MODE_CODES[mode], float(gk),
        pooling == "mean", float(s_decay), float(s_push),
    )  # fmt: skip


def threshold_pool_reference(
    rows: Tensor,
    offsets: Tensor,
    *,
    dim: int,
    mode: ThresholdMode | str,
    gk: float = 1.0,
    coarse_s: Tensor | None = None,
    per_sample_weights: Tensor | None = None,
    pooling: str = "sum",
    s_decay: float = 0.0,
    s_push: float = 0.0,
) -> Tensor:
    """The pure-PyTorch reference of `threshold_pool` (same arguments and result): the spec every
    fused kernel is tested against, and the path used where no fused kernel exists."""
    mode, offsets = _validate(rows, offsets, dim, mode, coarse_s, per_sample_weights, pooling)
    return _threshold_pool_reference(
        rows, offsets, dim, mode, gk, coarse_s, per_sample_weights, pooling, s_decay, s_push
    )


def _threshold_pool_reference(
    rows: Tensor,
    offsets: Tensor,
    dim: int,
    mode: ThresholdMode,
    gk: float,
    coarse_s: Tensor | None,
    per_sample_weights: Tensor | None,
    pooling: str,
    s_decay: float,
    s_push: float,
) -> Tensor:
    num_rows = rows.shape[0]
    num_bags = offsets.numel() - 1
    # Sparsity pressure: identity in forward, the extra s-gradient in backward.
    if s_decay != 0.0 or s_push != 0.0:
        cols = s_columns(dim, mode)
        if cols is not None and rows.requires_grad:
            rows = _AddSPressure.apply(rows, cols.start, cols.stop, s_decay, s_push)
        elif mode is ThresholdMode.COARSE and coarse_s is not None and coarse_s.requires_grad:
            coarse_s = _AddSPressure.apply(coarse_s, 0, dim, s_decay, s_push)

    values_ND = _threshold(rows, dim, mode, gk, coarse_s)
    if per_sample_weights is not None:
        values_ND = values_ND * per_sample_weights.to(values_ND.dtype).unsqueeze(1)

    lengths_B = offsets[1:] - offsets[:-1]
    bag_of_row_N = torch.repeat_interleave(
        torch.arange(num_bags, device=offsets.device), lengths_B, output_size=num_rows
    ).to(values_ND.device)
    pooled_BD = values_ND.new_zeros(num_bags, dim).index_add(0, bag_of_row_N, values_ND)
    if pooling == "mean":
        # clamp: an empty bag's sum is 0, and 0 / 1 keeps it 0 (no NaN).
        pooled_BD = pooled_BD / lengths_B.clamp(min=1).to(
            device=pooled_BD.device, dtype=pooled_BD.dtype
        ).unsqueeze(1)
    return pooled_BD
