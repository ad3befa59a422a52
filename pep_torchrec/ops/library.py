"""The `torch.library` registration of the PEP threshold-and-pool op: one op, forward and backward,
with CPU (fused C++), CUDA (Triton) and fake (meta / torch.compile) implementations.

Legend: N = gathered rows, B = bags, D = embedding dim, W = stored row width.

    pep_torchrec::threshold_pool(rows[N, W], offsets[B + 1], coarse_s[D]?, per_sample_weights[N]?,
        dim, mode, gk, mean, s_decay, s_push) -> pooled[B, D]
    pep_torchrec::threshold_pool_backward(grad_pooled[B, D], <the same inputs>, need_rows,
        need_coarse, need_weights) -> (grad_rows[N, W] | [0], grad_coarse_s[D] | [0], grad_weights[N] | [0])

`mode` is the `ThresholdMode` code (`MODE_CODES`). The backward includes the explicit sparsity
pressure (`s_decay · s − s_push` on the s columns per row occurrence; on coarse_s once per call)
and the retrain mask (MASK: masked elements and the m columns get zero gradient); gradients the
caller does not need come back as empty [0] tensors (custom ops cannot return None).

Entry points: `threshold_pool_fused` (what the public `threshold_pool` calls) runs the kernels
directly behind an autograd.Function in eager mode and goes through the registered op when traced
(torch.compile, fake tensors); `GroupedThresholdPool` runs every feature of a sharded TBE group in
one kernel call each way (the sharded lookup's path on both devices).

Kernels: CPU → `threshold_pool_cpu` (float32/float64; half types are upcast), CUDA →
`threshold_pool_triton` (float32/bf16/fp16, float32 accumulation; float64 goes to the reference).
Which path the public `threshold_pool` takes is `default_impl` (measured: `benchmarks/kernel.py`):
the fused kernels wherever they exist; `PEP_TORCHREC_OPS=reference` forces the reference. Wherever
a fused kernel is missing (no compiler, no Triton, other devices) the op computes the pure-PyTorch
reference (`threshold_pool.threshold_pool_reference`), which is its specification.
Inputs are assumed valid (the public `threshold_pool` validates them).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
from torch import Tensor

from pep_torchrec.ops import threshold_pool_cpu
from pep_torchrec.ops.threshold_pool import ThresholdMode, is_traced, threshold_pool_reference

MODE_CODES = {
    ThresholdMode.ROW_DIM: 0,
    ThresholdMode.ROW: 1,
    ThresholdMode.COARSE: 2,
    ThresholdMode.MASK: 3,
    ThresholdMode.NONE: 4,
}
_MODES = {code: mode for mode, code in MODE_CODES.items()}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.cache
def triton_kernels():
    """The Triton module, or None (with one warning on CUDA) if Triton cannot be imported."""
    try:
        from pep_torchrec.ops import threshold_pool_triton
    except Exception as err:  # ImportError, or a Triton that does not match the installed torch
        if torch.cuda.is_available():
            warnings.warn(
                f"pep_torchrec: Triton unavailable ({err}); CUDA threshold_pool uses the reference",
                RuntimeWarning,
                stacklevel=2,
            )
        return None
    return threshold_pool_triton


_IMPLS = ("auto", "reference", "fused")


def kernel_available(device: torch.device) -> bool:
    """Whether `device` has a fused kernel (CPU: the C++ object builds and loads, which happens on
    the first call; CUDA: Triton imports). The op's registered kernels use it whenever it exists and
    compute the reference otherwise."""
    if device.type == "cpu":
        return threshold_pool_cpu.available()
    if device.type == "cuda":
        return triton_kernels() is not None
    return False


def default_impl(device: torch.device) -> str:
    """ "fused" or "reference": what the public `threshold_pool` runs on `device`.

    PEP_TORCHREC_OPS=reference forces the reference; unset, "auto" or "fused": the fused kernels
    wherever they exist (CPU: the C++ object builds; CUDA: Triton imports). Measured
    (`benchmarks/kernel.py` → `benchmarks/results/kernel_quick.md`, 1 thread): on CPU the fused path
    beats the reference forward + backward in every mode, 1.9-3.9x at the train shape (4096 one-id
    bags, D = 16) and 3.8-10.6x at 20 ids per bag; NONE (no threshold: nothing to fuse but the
    pooling) by 1.7x; on an H200 the Triton kernels run at 0.80-0.99 of copy bandwidth
    (`gpu_check.md`). The rule: a fused path replaces the reference only once a benchmark shows it
    faster.
    """
    choice = os.environ.get("PEP_TORCHREC_OPS", "auto").strip().lower() or "auto"
    if choice not in _IMPLS:
        raise ValueError(f"PEP_TORCHREC_OPS must be one of {_IMPLS}, got {choice!r}")
    if choice == "reference":
        return "reference"
    return "fused" if kernel_available(device) else "reference"


def fused_available(device: torch.device) -> bool:
    """Whether the public `threshold_pool` dispatches to the fused kernels on `device`."""
    return default_impl(device) == "fused"


# ---- the reference, as an op implementation (fallback and default for other devices) ----------


def _reference_forward(rows, offsets, coarse_s, psw, dim, mode, gk, mean) -> Tensor:
    with torch.no_grad():
        return threshold_pool_reference(
            rows, offsets, dim=dim, mode=_MODES[mode], gk=gk, coarse_s=coarse_s,
            per_sample_weights=psw, pooling="mean" if mean else "sum",
        )  # fmt: skip


def _reference_backward(grad, rows, offsets, coarse_s, psw, dim, mode, gk, mean, s_decay, s_push, needs):
    # Recompute the reference forward with autograd and differentiate it: the spec, slowly.
    with torch.enable_grad():
        leaves = [rows.detach().requires_grad_(needs[0])]
        leaves.append(None if coarse_s is None else coarse_s.detach().requires_grad_(needs[1]))
        leaves.append(None if psw is None else psw.detach().requires_grad_(needs[2]))
        out = threshold_pool_reference(
            leaves[0], offsets, dim=dim, mode=_MODES[mode], gk=gk, coarse_s=leaves[1],
            per_sample_weights=leaves[2], pooling="mean" if mean else "sum", s_decay=s_decay, s_push=s_push,
        )  # fmt: skip
        wanted = [leaf for leaf, need in zip(leaves, needs) if need and leaf is not None]
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True) if out.requires_grad else [])
    result = []
    for leaf, need in zip(leaves, needs):
        grad_leaf = next(grads, None) if need and leaf is not None else None
        if need and leaf is not None and grad_leaf is None:
            grad_leaf = torch.zeros_like(leaf)
        result.append(grad_leaf)
    return tuple(result)


def _empty_if_none(grads: tuple[Tensor | None, ...], like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(like.new_empty(0) if g is None else g for g in grads)  # type: ignore[return-value]


# ---- the op ------------------------------------------------------------------------------------


@torch.library.custom_op("pep_torchrec::threshold_pool", mutates_args=())
def threshold_pool_op(
    rows: Tensor,
    offsets: Tensor,
    coarse_s: Tensor | None,
    per_sample_weights: Tensor | None,
    dim: int,
    mode: int,
    gk: float,
    mean: bool,
    s_decay: float,
    s_push: float,
) -> Tensor:
    """Default implementation (devices without a fused kernel): the reference."""
    return _reference_forward(rows, offsets, coarse_s, per_sample_weights, dim, mode, gk, mean)


@torch.library.custom_op("pep_torchrec::threshold_pool_backward", mutates_args=())
def threshold_pool_backward_op(
    grad_pooled: Tensor,
    rows: Tensor,
    offsets: Tensor,
    coarse_s: Tensor | None,
    per_sample_weights: Tensor | None,
    dim: int,
    mode: int,
    gk: float,
    mean: bool,
    s_decay: float,
    s_push: float,
    need_rows: bool,
    need_coarse: bool,
    need_weights: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    needs = (need_rows, need_coarse, need_weights)
    grads = _reference_backward(
        grad_pooled, rows, offsets, coarse_s, per_sample_weights, dim, mode, gk, mean, s_decay, s_push, needs
    )
    return _empty_if_none(grads, rows)


@threshold_pool_op.register_fake
def _(rows, offsets, coarse_s, per_sample_weights, dim, mode, gk, mean, s_decay, s_push):
    return rows.new_empty(offsets.shape[0] - 1, dim, dtype=_acc_dtype(rows.dtype))


@threshold_pool_backward_op.register_fake
def _(grad_pooled, rows, offsets, coarse_s, psw, dim, mode, gk, mean, s_decay, s_push, nr, nc, nw):
    return (
        rows.new_empty(rows.shape if nr else (0,)),
        rows.new_empty((dim,) if nc and coarse_s is not None else (0,), dtype=(coarse_s if coarse_s is not None else rows).dtype),
        rows.new_empty((rows.shape[0],) if nw and psw is not None else (0,), dtype=(psw if psw is not None else rows).dtype),
    )  # fmt: skip


# ---- CPU: the fused C++ kernels -----------------------------------------------------------------


def _prepare(rows, offsets, coarse_s, psw, kernel_dtype):
    """Kernel-ready inputs: rows with unit column stride in the kernel dtype (a column slice of a
    wider buffer is passed as is), int64 offsets, contiguous [D] / [N] vectors in the accumulation
    dtype."""
    if rows.dtype != kernel_dtype:
        rows = rows.to(kernel_dtype)
    if rows.shape[0] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    offsets = offsets.to(torch.int64).contiguous()
    # coarse_s and weights go straight to the accumulation dtype (float32 for half rows): rounding
    # them through the half type first would lose precision the reference keeps.
    acc = _acc_dtype(kernel_dtype)
    if coarse_s is not None:
        coarse_s = coarse_s.to(acc).contiguous()
    if psw is not None:
        psw = psw.to(acc).contiguous()
    return rows, offsets, coarse_s, psw


def _finish_backward(grads, rows, coarse_s, psw, mode, s_decay, s_push):
    """The kernels' gradients in the inputs' dtypes, with the coarse pressure term added."""
    grad_rows, grad_coarse, grad_psw = grads
    if grad_rows is not None and grad_rows.dtype != rows.dtype:
        grad_rows = grad_rows.to(rows.dtype)
    if grad_coarse is not None:
        assert coarse_s is not None
        if mode == MODE_CODES[ThresholdMode.COARSE] and (s_decay != 0.0 or s_push != 0.0):
            # Coarse pressure: once per call on the [D] thresholds (the row modes add theirs in the kernel).
            grad_coarse = grad_coarse + (s_decay * coarse_s.to(grad_coarse.dtype) - s_push)
        grad_coarse = grad_coarse.to(coarse_s.dtype)
    if grad_psw is not None:
        assert psw is not None
        grad_psw = grad_psw.to(psw.dtype)
    return grad_rows, grad_coarse, grad_psw


def _kernels_for(device_type: str):
    return threshold_pool_cpu if device_type == "cpu" else triton_kernels()


def _kernel_dtype(rows: Tensor, dim: int, mode: int) -> torch.dtype | None:
    """The dtype the fused kernel reads `rows` in, or None if it has no kernel for them."""
    if rows.device.type == "cpu":
        return _acc_dtype(rows.dtype)  # half types are upcast once, float64 has its own kernel
    if rows.dtype in (torch.float32, torch.bfloat16, torch.float16) and triton_kernels().supports(dim, mode):
        return rows.dtype
    return None


def _fused_forward(rows, offsets, coarse_s, psw, dim, mode, gk, mean):
    kernel_dtype = kernel_available(rows.device) and _kernel_dtype(rows, dim, mode)
    if not kernel_dtype:
        return _reference_forward(rows, offsets, coarse_s, psw, dim, mode, gk, mean)
    rows_k, offsets_k, coarse_k, psw_k = _prepare(rows, offsets, coarse_s, psw, kernel_dtype)
    return _kernels_for(rows.device.type).forward(rows_k, offsets_k, coarse_k, psw_k, dim, mode, gk, mean)


def _fused_backward_grads(grad, rows, offsets, coarse_s, psw, dim, mode, gk, mean, s_decay, s_push,
                          nr, nc, nw) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
    """(grad rows, grad coarse_s, grad weights), None where not asked for (or no such input)."""
    needs = (nr, nc and coarse_s is not None, nw and psw is not None)
    kernel_dtype = kernel_available(rows.device) and _kernel_dtype(rows, dim, mode)
    if not kernel_dtype:
        return _reference_backward(
            grad, rows, offsets, coarse_s, psw, dim, mode, gk, mean, s_decay, s_push, needs
        )
    rows_k, offsets_k, coarse_k, psw_k = _prepare(rows, offsets, coarse_s, psw, kernel_dtype)
    grads = _kernels_for(rows.device.type).backward(
        grad.to(_acc_dtype(rows.dtype)).contiguous(), rows_k, offsets_k, coarse_k, psw_k, dim, mode, gk, mean,
        s_decay, s_push, *needs,
    )  # fmt: skip
    return _finish_backward(grads, rows, coarse_s, psw, mode, s_decay, s_push)


def _fused_backward(grad, rows, offsets, coarse_s, psw, dim, mode, gk, mean, s_decay, s_push, nr, nc, nw):
    grads = _fused_backward_grads(
        grad, rows, offsets, coarse_s, psw, dim, mode, gk, mean, s_decay, s_push, nr, nc, nw
    )
    return _empty_if_none(grads, rows)


for _device in ("cpu", "cuda"):
    threshold_pool_op.register_kernel(_device)(
        lambda rows, offsets, coarse_s, psw, dim, mode, gk, mean, s_decay, s_push: _fused_forward(
            rows, offsets, coarse_s, psw, dim, mode, gk, mean
        )
    )
    threshold_pool_backward_op.register_kernel(_device)(_fused_backward)


# ---- autograd -----------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output) -> None:
    rows, offsets, coarse_s, psw, dim, mode, gk, mean, s_decay, s_push = inputs
    ctx.save_for_backward(rows, offsets, coarse_s, psw)
    ctx.args = (dim, mode, gk, mean, s_decay, s_push)


def _needs(ctx, coarse_s: Tensor | None, psw: Tensor | None) -> tuple[bool, bool, bool]:
    """Which of (rows, coarse_s, per_sample_weights) want a gradient (an absent input never does)."""
    need_rows, _, need_coarse, need_weights = ctx.needs_input_grad[:4]
    return need_rows, need_coarse and coarse_s is not None, need_weights and psw is not None


def _grads_for_inputs(
    grads: tuple[Tensor | None, ...], needs: tuple[bool, bool, bool]
) -> tuple[Tensor | None, ...]:
    """The (grad rows, grad coarse_s, grad weights) of the kernels ([0] or None where not wanted) as
    autograd wants them: one entry per input of `threshold_pool_op`, None where no gradient flows."""
    grad_rows, grad_coarse, grad_psw = (g if need else None for g, need in zip(grads, needs))
    return (grad_rows, None, grad_coarse, grad_psw, None, None, None, None, None, None)


def _backward(ctx, grad_pooled):
    rows, offsets, coarse_s, psw = ctx.saved_tensors
    needs = _needs(ctx, coarse_s, psw)
    grads = torch.ops.pep_torchrec.threshold_pool_backward(
        grad_pooled, rows, offsets, coarse_s, psw, *ctx.args, *needs
    )
    return _grads_for_inputs(grads, needs)


threshold_pool_op.register_autograd(_backward, setup_context=_setup_context)


# ---- eager calls --------------------------------------------------------------------------------


class _EagerThresholdPool(torch.autograd.Function):
    """The op's own device kernels (`_fused_forward` / `_fused_backward`, exactly what the registered
    CPU and CUDA implementations run) behind a plain autograd.Function, for eager calls.

    Why: `torch.library.custom_op`'s Python dispatch (argument normalisation, alias checks, its
    autograd wrapper, the second op for the backward) costs about 0.2 ms per forward + backward on
    the CI machine, as much as the C++ kernels themselves at the training shape (4096 one-id bags,
    D = 16): `benchmarks/kernel.py` times both (columns `fused` and `op`).
    """

    @staticmethod
    def forward(ctx, rows, offsets, coarse_s, psw, dim, mode, gk, mean, s_decay, s_push):  # type: ignore[override]
        _setup_context(ctx, (rows, offsets, coarse_s, psw, dim, mode, gk, mean, s_decay, s_push), None)
        return _fused_forward(rows, offsets, coarse_s, psw, dim, mode, gk, mean)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_pooled):  # type: ignore[override]
        rows, offsets, coarse_s, psw = ctx.saved_tensors
        needs = _needs(ctx, coarse_s, psw)
        grads = _fused_backward_grads(grad_pooled, rows, offsets, coarse_s, psw, *ctx.args, *needs)
        return _grads_for_inputs(grads, needs)


def threshold_pool_fused(rows: Tensor, offsets: Tensor, coarse_s: Tensor | None,
                         per_sample_weights: Tensor | None, dim: int, mode: int, gk: float, mean: bool,
                         s_decay: float, s_push: float) -> Tensor:  # fmt: skip
    """`threshold_pool_op`, with the same arguments and results: eager calls go straight to its
    kernels (`_EagerThresholdPool`), traced ones through the registered op."""
    args = (rows, offsets, coarse_s, per_sample_weights, dim, mode, gk, mean, s_decay, s_push)
    if is_traced(rows):
        return threshold_pool_op(*args)
    return _EagerThresholdPool.apply(*args)


# ---- grouped: all features of one sharded TBE group in one call each way -----------------------
# Legend: F = features of the group, B = bags per feature, N_max = rows of the TBE output (feature
# f's N_f ids in rows [0, N_f)), W = stored row width (the same for every feature of the group).


def group_kernel_available(device: torch.device, dtype: torch.dtype, dim: int, mode: int) -> bool:
    """Whether `GroupedThresholdPool` has a kernel for rows of `dtype` on `device`, dim D and `mode`
    (a `MODE_CODES` value): the C++ one on CPU (float32/float64), the Triton one on CUDA
    (float32/bf16/fp16; ROW up to D = 1024)."""
    if device.type == "cpu":
        return dtype in (torch.float32, torch.float64) and threshold_pool_cpu.available()
    if device.type == "cuda":
        kernels = triton_kernels()
        return (
            dtype in (torch.float32, torch.bfloat16, torch.float16)
            and kernels is not None
            and kernels.supports(dim, mode)
        )
    return False


class GroupedThresholdPool(torch.autograd.Function):
    """threshold + pool of every feature of a sharded TBE group in one kernel call each way (CPU:
    C++, CUDA: Triton), reading the TBE output and writing its whole gradient.

    forward(rows_all [N_max, F·W], offsets [F·B + 1] (the KJT's: feature f's ids start at
    offsets[f·B]), per_sample_weights [sum N_f] | None (the KJT's weights, no gradient), F, D, mode
    code, gk, mean, s_decay, s_push) → pooled [B, F·D] (float32; float64 for float64 rows on CPU);
    backward → grad rows_all [N_max, F·W] in rows' dtype, rows past N_f zero. Equal, feature by
    feature, to `threshold_pool` on `rows_all[:N_f, f·W:(f+1)·W]` (tests/ops/test_threshold_pool_fused.py);
    COARSE (per-table [D] parameters) is not grouped. Needs `group_kernel_available`, real tensors
    (not traced: there is no fake implementation) and weights without gradient; the sharded lookup
    checks all three and takes the per-feature path otherwise.
    """

    @staticmethod
    def forward(ctx, rows_all, offsets, psw, num_features, dim, mode, gk, mean, s_decay, s_push):  # type: ignore[override]
        if is_traced(rows_all) or not group_kernel_available(rows_all.device, rows_all.dtype, dim, mode):
            raise ValueError(f"GroupedThresholdPool: no grouped kernel for {type(rows_all).__name__} "
                             f"{rows_all.dtype} rows on {rows_all.device} (traced, or no kernel)")  # fmt: skip
        if psw is not None and psw.requires_grad:
            raise ValueError("GroupedThresholdPool gives per-sample weights no gradient; "
                             "call threshold_pool per feature for that")  # fmt: skip
        assert rows_all.stride(1) == 1 or rows_all.shape[1] <= 1, "rows must have unit column stride"
        offsets = offsets.to(torch.int64).contiguous()
        acc = _acc_dtype(rows_all.dtype)
        psw = None if psw is None else psw.to(acc).contiguous()
        ctx.save_for_backward(rows_all, offsets, psw)
        ctx.args = (num_features, dim, mode, gk, mean)
        ctx.pressure = (s_decay, s_push)
        if rows_all.device.type == "cpu":
            return threshold_pool_cpu.group_forward(rows_all, offsets, psw, *ctx.args)
        return triton_kernels().forward(rows_all, offsets, None, psw, dim, mode, gk, mean, num_features)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        rows_all, offsets, psw = ctx.saved_tensors
        num_features, dim, mode, gk, mean = ctx.args
        s_decay, s_push = ctx.pressure
        grad_out = grad_out.to(_acc_dtype(rows_all.dtype)).contiguous()
        if rows_all.device.type == "cpu":
            grad_rows = threshold_pool_cpu.group_backward(
                grad_out, rows_all, offsets, psw, *ctx.args, s_decay, s_push
            )
        else:
            grad_rows, _, _ = triton_kernels().backward(
                grad_out, rows_all, offsets, None, psw, dim, mode, gk, mean, s_decay, s_push,
                True, False, False, num_features,
            )  # fmt: skip
        return grad_rows, None, None, None, None, None, None, None, None, None
