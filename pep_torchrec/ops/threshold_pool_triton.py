"""The Triton kernels of `threshold_pool` (CUDA; on CPU only under `TRITON_INTERPRET=1`, for tests).

Legend: N = gathered rows, B = bags (per feature), D = embedding dim, W = stored row width,
F = features, BLOCK_B × BLOCK_D = the tile of bags × columns a program holds.

Work split. One program per (tile of BLOCK_B bags, feature): the 1-D grid is
cdiv(B, BLOCK_B) · F with the feature fastest, so neighbouring programs read neighbouring column
blocks of the same TBE rows. A program walks its columns BLOCK_D at a time (one step for D ≤ 128,
and always one for ROW, whose s-gradient is a sum over the row) and, inside, the j-th row of all its
bags at once (j < the tile's longest bag; shorter bags are masked). So
- bags of one id (the TBE gather case: one id per feature per sample) are element-wise. With D in
  one block, a program speculatively loads TBE row b for its bag b beside the offsets, then checks
  that every bag of its tile is one id at row b (else it walks the bags): the row loads do not wait
  for the offsets (on an H200, one-id F = 26 groups at D 16 went from 0.65 to 0.89 of copy
  bandwidth, `benchmarks/gpu_tile_sweep.py` at commit 1139563 and after; the first design, one
  bag per program, reached 0.04);
- every pooled row and every gradient row is written by exactly one program (no atomics on rows,
  deterministic); the [D] coarse gradient takes one atomic add per (program, column block), and a
  per-sample-weight gradient one per (row, column block) (a plain sum when D ≤ BLOCK_D);
- the backward writes every column of every row of the group in one pass: the v- and s-gradients,
  zeros in MASK's m columns and ROW's pad columns, and zeros in a group's padding rows (feature f's
  rows [N_f, N_max) of the TBE output), so its output needs no zero-filled allocation.
Bags of any length work (a long bag is walked row by row by one program; fine for recommendation
pooling factors ≲ 10^3). Offsets are int64 and row addresses are int64 (tables past 2^31 elements).
Rows may be float32, bfloat16 or float16 and are read at any row stride (the sharded lookup passes
the TBE output); math and accumulation are float32, gradients are stored in the rows' dtype.

Which kernel a launch compiles is a function of (MODE, rows dtype, BLOCK_B × BLOCK_D, VEC) and of
the divisibility by 16 of the strides, widths and D (Triton's own specialization, which decides
vector widths): pooling, weights, the backward's NEED_* flags, F and the batch's counts are runtime
scalars (`do_not_specialize`), and absent inputs are passed as tensors of the same dtype. So every
kernel a launch can build is few enough to compile ahead of time for sm_80 and sm_90 in the CPU
test suite (`tests/ops/test_threshold_pool_compile.py`, through the launchers below).

Features (the grouped launch `GroupedThresholdPool` makes, one per sharded TBE group): feature
f's bag b is KJT positions offsets[f·B + b] .. offsets[f·B + b + 1]; position n lives in TBE row
n − offsets[f·B] at columns [f·W, (f+1)·W) (the TBE output [N_max, F·W]: feature f's ids in rows
[0, N_f)); weights are indexed by n itself (the KJT's); pooled bag (f, b) goes to out + b·ldo + f·D.
A single-feature call is F = 1.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

# ThresholdMode codes (library.MODE_CODES). A @triton.jit function may only read module globals
# that are tl.constexpr; the launchers compare plain ints (`.value`).
ROW_DIM = tl.constexpr(0)
ROW = tl.constexpr(1)
COARSE = tl.constexpr(2)
MASK = tl.constexpr(3)
NONE = tl.constexpr(4)
MODE_VALUES = (ROW_DIM.value, ROW.value, COARSE.value, MASK.value, NONE.value)

# Elements of a program's tile (BLOCK_B · BLOCK_D): 512, one 16-byte vector per thread at 4 warps.
# Measured on an H200 (`benchmarks/gpu_tile_sweep.py` → benchmarks/results/gpu_tile_sweep.md: the
# kernels alone, F = 26 TBE groups, share of copy bandwidth): 512 × 4 warps is best or tied in every
# shape, e.g. one id per bag D 16: 0.89 (256: 0.72, 1024: 0.71, 2048: 0.75), D 64: 0.93 (1024: 0.92,
# 2048: 0.80); 20 ids D 16: 0.89 (others 0.67-0.79); 8 warps lose everywhere but one tie.
TILE = 512
# Widest column block for the modes that may loop over column blocks (ROW holds its whole row).
MAX_BLOCK_D = 128
# ROW holds a row in one tile; past this D its registers spill: such tables use the reference.
MAX_ROW_DIM = 1024


# Runtime scalars Triton must not specialize on (it compiles a variant for an int == 1 and for one
# divisible by 16): the batch-dependent counts, F (1 for the op, the group size otherwise) and the
# 0/1 flags. One binary serves them all; what is left to specialize (strides, widths, D: their
# divisibility by 16 decides vector widths) is what tests/ops/test_threshold_pool_compile.py enumerates.
_FWD_RUNTIME = ["num_bags", "num_features", "num_rows", "has_psw", "mean"]
_BWD_RUNTIME = [
    "num_bags",
    "num_features",
    "num_rows",
    "has_psw",
    "mean",
    "need_rows",
    "need_coarse",
    "need_psw",
]


@triton.jit
def _bag_tile(offsets_ptr, num_bags, f, b, b_ok):
    """The bags b of feature f: KJT start positions, first TBE rows (start − the feature's first
    position), row counts (0 where not b_ok) and the longest count."""
    first = f.to(tl.int64) * num_bags
    pos0 = tl.load(offsets_ptr + first)  # feature f's first KJT position: its TBE row 0
    start = tl.load(offsets_ptr + first + b, mask=b_ok, other=0)
    end = tl.load(offsets_ptr + first + b + 1, mask=b_ok, other=0)
    count = end - start
    return start, start - pos0, count, tl.max(count, axis=0)


@triton.jit
def _one_id_tile(b, b_ok, row, count):
    """Whether every bag of the tile is one id at TBE row b: the speculative loads were right."""
    return tl.sum((b_ok & ((count != 1) | (row != b))).to(tl.int32), axis=0) == 0


@triton.jit
def _load_rows(rows_ptr, r, stride_row, f, width, dim, d, ok, MODE: tl.constexpr, VEC: tl.constexpr):
    """v [BLOCK_B, BLOCK_D] of TBE rows r at columns d of feature f, and the row's other operand:
    s (ROW_DIM: [BLOCK_B, BLOCK_D]; ROW: [BLOCK_B, 1]) or m (MASK); v again where there is none.
    Masked lanes read 0 (v = 0 is never kept: |0| − t ≤ 0, so they add nothing)."""
    # The launcher promises VEC | stride_row and VEC | width: 16-byte vector loads.
    base = rows_ptr + tl.multiple_of(r * stride_row + f * width, VEC)[:, None]
    tile_ok = ok[:, None] & (d < dim)[None, :]
    v = tl.load(base + d[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    if MODE == ROW_DIM or MODE == MASK:
        aux = tl.load(base + dim + d[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    elif MODE == ROW:
        aux = tl.load(base + dim, mask=ok[:, None], other=0.0).to(tl.float32)
    else:
        aux = v
    return v, aux


@triton.jit
def _threshold(v, aux, sig_d, gk, MODE: tl.constexpr):
    """(v̂, kept, σ(s)) of a tile: sign(v)·relu(|v| − gk·σ(s)); MASK: v·1[m > 0.5]; NONE: v.
    sig_d: σ(coarse_s) [1, BLOCK_D] (COARSE only)."""
    if MODE == NONE:
        return v, v == v, v
    if MODE == MASK:
        keep = aux > 0.5
        return tl.where(keep, v, 0.0), keep, v
    if MODE == COARSE:
        sig = sig_d + tl.zeros_like(v)
    else:
        sig = tl.sigmoid(aux)
    mag = tl.abs(v) - gk * sig
    kept = mag > 0.0  # the relu kink (mag = 0) is pruned, with zero gradient
    return tl.where(kept, tl.where(v < 0.0, -mag, mag), 0.0), kept, sig


@triton.jit
def _coarse_sigmoid(coarse_s_ptr, d, dim, MODE: tl.constexpr):
    """σ(coarse_s) of columns d as [1, BLOCK_D] (COARSE; zeros otherwise)."""
    if MODE == COARSE:
        return tl.sigmoid(tl.load(coarse_s_ptr + d, mask=d < dim, other=0.0).to(tl.float32))[None, :]
    return tl.zeros_like(d.to(tl.float32))[None, :]


@triton.jit
def _pool_block(rows_ptr, stride_row, psw_ptr, f, width, dim, d, sig_d, gk, has_psw, start, row, count, max_count,
                MODE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, VEC: tl.constexpr):  # fmt: skip
    """Σ over each bag's rows of w·v̂ at columns d: [BLOCK_B, BLOCK_D] float32 (bags of any length:
    the j-th row of every bag at once, shorter bags masked)."""
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    for j in range(0, max_count):
        ok = j < count
        v, aux = _load_rows(rows_ptr, row + j, stride_row, f, width, dim, d, ok, MODE, VEC)
        vhat, _, _ = _threshold(v, aux, sig_d, gk, MODE)
        if has_psw:
            vhat = vhat * tl.load(psw_ptr + start + j, mask=ok, other=0.0).to(tl.float32)[:, None]
        acc += vhat
    return acc


@triton.jit(do_not_specialize=_FWD_RUNTIME)
def _fwd_kernel(
    rows_ptr, stride_row, offsets_ptr, coarse_s_ptr, psw_ptr, out_ptr,
    num_bags, num_features, num_rows, dim, width, ldo, gk, has_psw, mean,
    MODE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, VEC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    f = pid % num_features
    b = (pid // num_features).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = b < num_bags
    d = tl.arange(0, BLOCK_D)
    out_ptrs = out_ptr + b[:, None] * ldo + f * dim + d[None, :]
    if dim <= BLOCK_D:  # one column block (D ≤ 128, and always ROW)
        # Speculate that every bag of the tile is one id, the TBE gather case (bag b of feature f is
        # then TBE row b): the rows' loads issue beside the offsets' loads instead of after them.
        v, aux = _load_rows(rows_ptr, b, stride_row, f, width, dim, d, b_ok & (b < num_rows), MODE, VEC)
        sig_d = _coarse_sigmoid(coarse_s_ptr, d, dim, MODE)
        start, row, count, max_count = _bag_tile(offsets_ptr, num_bags, f, b, b_ok)
        if _one_id_tile(b, b_ok, row, count):
            acc, _, _ = _threshold(v, aux, sig_d, gk, MODE)  # a one-row bag: sum and mean are v̂ itself
            if has_psw:
                acc = acc * tl.load(psw_ptr + start, mask=b_ok, other=0.0).to(tl.float32)[:, None]
        else:
            acc = _pool_block(rows_ptr, stride_row, psw_ptr, f, width, dim, d, sig_d, gk, has_psw, start, row,
                              count, max_count, MODE, BLOCK_B, BLOCK_D, VEC)  # fmt: skip
            if mean:
                acc = acc / tl.maximum(count, 1).to(tl.float32)[:, None]  # an empty bag stays 0
        tl.store(out_ptrs, acc, mask=b_ok[:, None] & (d < dim)[None, :])
    else:
        start, row, count, max_count = _bag_tile(offsets_ptr, num_bags, f, b, b_ok)
        for d0 in range(0, dim, BLOCK_D):
            sig_d = _coarse_sigmoid(coarse_s_ptr, d0 + d, dim, MODE)
            acc = _pool_block(rows_ptr, stride_row, psw_ptr, f, width, dim, d0 + d, sig_d, gk, has_psw, start, row,
                              count, max_count, MODE, BLOCK_B, BLOCK_D, VEC)  # fmt: skip
            if mean:
                acc = acc / tl.maximum(count, 1).to(tl.float32)[:, None]
            tl.store(out_ptrs + d0, acc, mask=b_ok[:, None] & (d0 + d < dim)[None, :])


@triton.jit
def _row_grads(grad_rows_ptr, grad_psw_ptr, r, ok, pos, f, width, ldg, dim, d, v, aux, g, g_e, sig_d, gk,
               s_decay, s_push, need_rows, need_psw, MODE: tl.constexpr, VEC: tl.constexpr):  # fmt: skip
    """Write the gradient of TBE rows r at columns d (v, and the s / m / pad columns) from g_e, the
    gradient reaching v̂ (weights applied); add Σ_d g·v̂ to grad_psw[pos]. Returns the tile's
    s-gradient summed over rows (COARSE's partial)."""
    vhat, kept, sig = _threshold(v, aux, sig_d, gk, MODE)
    grad_base = grad_rows_ptr + tl.multiple_of(r * ldg + f * width, VEC)[:, None]
    tile_ok = ok[:, None] & (d < dim)[None, :]
    out_ty = grad_rows_ptr.dtype.element_ty
    g_s = tl.zeros_like(v)
    if MODE == NONE:
        g_v = g_e
    elif MODE == MASK:
        g_v = tl.where(kept, g_e, 0.0)  # masked elements get zero gradient (retrain)
        if need_rows:  # the m columns get none
            tl.store(grad_base + dim + d[None, :], tl.zeros_like(v).to(out_ty), mask=tile_ok)
    else:
        g_v = tl.where(kept, g_e, 0.0)
        # ∂v̂/∂s = −sign(v)·1[kept]·gk·σ(1 − σ); kept ⇒ v ≠ 0.
        g_s = tl.where(kept, tl.where(v < 0.0, g_e, -g_e) * gk * sig * (1.0 - sig), 0.0)
        if MODE == ROW_DIM:
            if need_rows:  # + the sparsity pressure s_decay·s − s_push, once per row occurrence
                tl.store(
                    grad_base + dim + d[None, :], (g_s + s_decay * aux - s_push).to(out_ty), mask=tile_ok
                )
        elif MODE == ROW:
            if need_rows:
                # s is broadcast over D (this block is the whole row): its gradient is the row sum,
                # + the pressure, in column D; the 3 pad columns (W = D + 4) get 0.
                g_row = tl.sum(g_s, axis=1)[:, None] + s_decay * aux - s_push  # [BLOCK_B, 1]
                pad = tl.arange(0, 4)[None, :]
                tl.store(grad_base + dim + pad, tl.where(pad == 0, g_row, 0.0).to(out_ty), mask=ok[:, None])
    if need_rows:
        tl.store(grad_base + d[None, :], g_v.to(out_ty), mask=tile_ok)
    if need_psw:
        # A row's weight gradient sums over all D: accumulated over column blocks (float32,
        # zero-initialised by the launcher; one program owns the row, so the order is fixed).
        tl.atomic_add(grad_psw_ptr + pos, tl.sum(g * vhat, axis=1), mask=ok, sem="relaxed")
    coarse_part = tl.zeros_like(d.to(tl.float32))
    if MODE == COARSE:  # a reduction over the tile's bags (across warps): only where it is used
        coarse_part = tl.sum(g_s, axis=0)
    return coarse_part


@triton.jit
def _grad_block(grad_rows_ptr, grad_psw_ptr, rows_ptr, stride_row, psw_ptr, f, width, ldg, dim, d, g, sig_d, gk,
                s_decay, s_push, has_psw, need_rows, need_psw, start, row, count, max_count,
                MODE: tl.constexpr, VEC: tl.constexpr):  # fmt: skip
    """The row gradients of every bag's rows at columns d (g: the bags' pooled gradient, mean
    already applied), the j-th row of every bag at once; returns COARSE's [BLOCK_D] partial."""
    grad_coarse = tl.zeros_like(d.to(tl.float32))
    for j in range(0, max_count):
        ok = j < count
        v, aux = _load_rows(rows_ptr, row + j, stride_row, f, width, dim, d, ok, MODE, VEC)
        g_e = g
        if has_psw:
            g_e = g * tl.load(psw_ptr + start + j, mask=ok, other=0.0).to(tl.float32)[:, None]
        grad_coarse += _row_grads(grad_rows_ptr, grad_psw_ptr, row + j, ok, start + j, f, width, ldg, dim, d, v, aux,
                                  g, g_e, sig_d, gk, s_decay, s_push, need_rows, need_psw, MODE, VEC)  # fmt: skip
    return grad_coarse


@triton.jit(do_not_specialize=_BWD_RUNTIME)
def _bwd_kernel(
    grad_out_ptr, rows_ptr, stride_row, offsets_ptr, coarse_s_ptr, psw_ptr,
    grad_rows_ptr, grad_coarse_ptr, grad_psw_ptr,
    num_bags, num_features, num_rows, dim, width, ldgo, ldg, gk, s_decay, s_push,
    has_psw, mean, need_rows, need_coarse, need_psw,
    MODE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, VEC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    f = pid % num_features
    tile = pid // num_features
    b = tile.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = b < num_bags
    d = tl.arange(0, BLOCK_D)
    g_ptrs = grad_out_ptr + b[:, None] * ldgo + f * dim + d[None, :]
    if dim <= BLOCK_D:  # one column block; speculative one-id loads as in the forward
        v, aux = _load_rows(rows_ptr, b, stride_row, f, width, dim, d, b_ok & (b < num_rows), MODE, VEC)
        g = tl.load(g_ptrs, mask=b_ok[:, None] & (d < dim)[None, :], other=0.0).to(tl.float32)
        sig_d = _coarse_sigmoid(coarse_s_ptr, d, dim, MODE)
        start, row, count, max_count = _bag_tile(offsets_ptr, num_bags, f, b, b_ok)
        if _one_id_tile(b, b_ok, row, count):
            g_e = g  # a one-row bag: mean divides by 1
            if has_psw:
                g_e = g * tl.load(psw_ptr + start, mask=b_ok, other=0.0).to(tl.float32)[:, None]
            grad_coarse = _row_grads(grad_rows_ptr, grad_psw_ptr, b, b_ok, start, f, width, ldg, dim, d, v, aux, g, g_e,
                                     sig_d, gk, s_decay, s_push, need_rows, need_psw, MODE, VEC)  # fmt: skip
        else:
            if mean:
                g = g / tl.maximum(count, 1).to(tl.float32)[:, None]
            grad_coarse = _grad_block(grad_rows_ptr, grad_psw_ptr, rows_ptr, stride_row, psw_ptr, f, width, ldg, dim,
                                      d, g, sig_d, gk, s_decay, s_push, has_psw, need_rows, need_psw, start, row,
                                      count, max_count, MODE, VEC)  # fmt: skip
        if MODE == COARSE:
            if need_coarse:
                # One atomic add of a [BLOCK_D] partial per program (float32: order-dependent in the last bits).
                tl.atomic_add(grad_coarse_ptr + d, grad_coarse, mask=d < dim, sem="relaxed")
    else:
        start, row, count, max_count = _bag_tile(offsets_ptr, num_bags, f, b, b_ok)
        for d0 in range(0, dim, BLOCK_D):
            g = tl.load(g_ptrs + d0, mask=b_ok[:, None] & (d0 + d < dim)[None, :], other=0.0).to(tl.float32)
            if mean:
                g = g / tl.maximum(count, 1).to(tl.float32)[:, None]
            sig_d = _coarse_sigmoid(coarse_s_ptr, d0 + d, dim, MODE)
            grad_coarse = _grad_block(grad_rows_ptr, grad_psw_ptr, rows_ptr, stride_row, psw_ptr, f, width, ldg, dim,
                                      d0 + d, g, sig_d, gk, s_decay, s_push, has_psw, need_rows, need_psw, start, row,
                                      count, max_count, MODE, VEC)  # fmt: skip
            if MODE == COARSE:
                if need_coarse:
                    tl.atomic_add(grad_coarse_ptr + d0 + d, grad_coarse, mask=d0 + d < dim, sem="relaxed")
    if need_rows:
        # A group's padding rows (feature f's TBE rows [N_f, N_max)) get zero gradient, split over
        # the feature's programs. (A single-feature call has none: its bags cover every row.)
        num_tiles = tl.cdiv(num_bags, BLOCK_B)
        first = f.to(tl.int64) * num_bags
        num_ids = tl.load(offsets_ptr + first + num_bags) - tl.load(offsets_ptr + first)
        out_ty = grad_rows_ptr.dtype.element_ty
        for r0 in range(num_ids + tile.to(tl.int64) * BLOCK_B, num_rows, num_tiles.to(tl.int64) * BLOCK_B):
            r = r0 + tl.arange(0, BLOCK_B)
            for c0 in range(0, width, BLOCK_D):
                tl.store(grad_rows_ptr + r[:, None] * ldg + f * width + c0 + d[None, :],
                         tl.zeros([BLOCK_B, BLOCK_D], dtype=out_ty),
                         mask=(r < num_rows)[:, None] & (c0 + d < width)[None, :])  # fmt: skip


class Launch(NamedTuple):
    """One kernel launch: `kernel[grid](*args, **constexprs)`. The CPU compile test builds these
    from CPU tensors and compiles them for real GPU targets."""

    kernel: Any
    grid: tuple[int]
    args: tuple
    constexprs: dict[str, int]

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs)


def blocks(dim: int, mode: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_D): BLOCK_D the next power of two ≥ D within [16, 128] (ROW: ≥ D, up to
    `MAX_ROW_DIM`), BLOCK_B = TILE / BLOCK_D bags (≥ 1)."""
    block_d = max(16, triton.next_power_of_2(dim))
    if mode != ROW.value:
        block_d = min(block_d, MAX_BLOCK_D)
    return max(1, TILE // block_d), block_d


def supports(dim: int, mode: int) -> bool:
    """Whether these kernels take tables of dim D in `mode` (ROW holds a row in one tile)."""
    return mode != ROW.value or dim <= MAX_ROW_DIM


def _vec(rows: Tensor, stride_row: int, width: int) -> int:
    """Elements per 16-byte vector if every row block starts on one (stride and width multiples
    of it: the promise behind the kernels' `tl.multiple_of`), else 1."""
    vec = 16 // rows.element_size()
    return vec if stride_row % vec == 0 and width % vec == 0 else 1


def _row_stride(rows: Tensor) -> int:
    return rows.stride(0) if rows.shape[0] > 1 else rows.shape[1]


def _grid(num_bags: int, num_features: int, block_b: int) -> tuple[int]:
    return (triton.cdiv(num_bags, block_b) * num_features,)


def forward_launch(rows: Tensor, offsets: Tensor, coarse_s: Tensor | None, per_sample_weights: Tensor | None,
                   out: Tensor, dim: int, mode: int, gk: float, mean: bool, num_features: int) -> Launch:  # fmt: skip
    num_bags = (offsets.numel() - 1) // num_features
    block_b, block_d = blocks(dim, mode)
    stride, width = _row_stride(rows), rows.shape[1] // num_features
    # Absent inputs are passed as `out` (float32, never read): the pointer types, hence the compiled
    # kernel, do not depend on which inputs are present.
    args = (
        rows, stride, offsets, coarse_s if coarse_s is not None else out,
        per_sample_weights if per_sample_weights is not None else out, out,
        num_bags, num_features, rows.shape[0], dim, width, num_features * dim, gk, int(per_sample_weights is not None),
        int(mean),
    )  # fmt: skip
    return Launch(_fwd_kernel, _grid(num_bags, num_features, block_b), args,
                  dict(MODE=mode, BLOCK_B=block_b, BLOCK_D=block_d, VEC=_vec(rows, stride, width)))  # fmt: skip


def backward_launch(grad_pooled: Tensor, rows: Tensor, offsets: Tensor, coarse_s: Tensor | None,
                    per_sample_weights: Tensor | None, grad_rows: Tensor | None, grad_coarse: Tensor | None,
                    grad_psw: Tensor | None, dim: int, mode: int, gk: float, mean: bool, s_decay: float,
                    s_push: float, num_features: int) -> Launch:  # fmt: skip
    num_rows, full_width = rows.shape
    num_bags = (offsets.numel() - 1) // num_features
    block_b, block_d = blocks(dim, mode)
    stride, width = _row_stride(rows), full_width // num_features
    # Absent inputs and outputs are passed as tensors of their dtype that are never touched
    # (grad_pooled: float32; rows for grad_rows): one compiled kernel whatever is present.
    dummy = grad_pooled
    args = (
        grad_pooled, rows, stride, offsets, coarse_s if coarse_s is not None else dummy,
        per_sample_weights if per_sample_weights is not None else dummy,
        grad_rows if grad_rows is not None else rows, grad_coarse if grad_coarse is not None else dummy,
        grad_psw if grad_psw is not None else dummy,
        num_bags, num_features, num_rows, dim, width, num_features * dim, full_width, gk, s_decay, s_push,
        *(int(flag) for flag in (per_sample_weights is not None, mean, grad_rows is not None,
                                 grad_coarse is not None, grad_psw is not None)),
    )  # fmt: skip
    # The gradient rows are [N, F·W] contiguous: VEC must divide its row stride F·W too (it does
    # whenever it divides W).
    return Launch(_bwd_kernel, _grid(num_bags, num_features, block_b), args,
                  dict(MODE=mode, BLOCK_B=block_b, BLOCK_D=block_d, VEC=_vec(rows, stride, width)))  # fmt: skip


def forward(
    rows: Tensor,
    offsets: Tensor,
    coarse_s: Tensor | None,
    per_sample_weights: Tensor | None,
    dim: int,
    mode: int,
    gk: float,
    mean: bool,
    num_features: int | None = None,
) -> Tensor:
    """pooled [B, F·D] float32. rows [N, F·W] (unit column stride; fp32/bf16/fp16), offsets
    [F·B + 1] int64, coarse_s [D] (single-feature calls only) / per_sample_weights [N] contiguous or
    None. num_features None: a single-feature call (the op); an int: a grouped launch."""
    num_features = 1 if num_features is None else num_features
    num_bags = (offsets.numel() - 1) // num_features if num_features else 0
    out = torch.empty(num_bags, num_features * dim, dtype=torch.float32, device=rows.device)
    if num_bags == 0:
        return out
    forward_launch(rows, offsets, coarse_s, per_sample_weights, out, dim, mode, gk, mean, num_features)()
    return out


def backward(
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
    num_features: int | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(grad rows [N, F·W] in rows' dtype, grad coarse_s [D] float32 without the pressure term, grad
    weights [N] float32), each None unless asked for. grad_pooled: [B, F·D] contiguous.
    num_features None: a single-feature call (the op: its bags cover every row); an int: a grouped
    launch, whose rows no bag reads (a TBE group's padding) get zero gradient; no weight gradient."""
    grouped = num_features is not None
    num_features = 1 if num_features is None else num_features
    assert not (grouped and need_weights), "a grouped launch gives per-sample weights no gradient"
    num_rows, width = rows.shape
    num_bags = (offsets.numel() - 1) // num_features if num_features else 0
    device = rows.device
    # The kernel writes every column of every row (padding rows included) when B > 0.
    grad_rows = None
    if need_rows:
        grad_rows = (torch.empty if num_bags else torch.zeros)(
            num_rows, width, dtype=rows.dtype, device=device
        )
    grad_coarse = torch.zeros(dim, dtype=torch.float32, device=device) if need_coarse else None
    grad_psw = torch.zeros(num_rows, dtype=torch.float32, device=device) if need_weights else None
    if num_bags == 0 or not (need_rows or need_coarse or need_weights):
        return grad_rows, grad_coarse, grad_psw
    backward_launch(grad_pooled, rows, offsets, coarse_s, per_sample_weights, grad_rows, grad_coarse, grad_psw,
                    dim, mode, gk, mean, s_decay, s_push, num_features)()  # fmt: skip
    return grad_rows, grad_coarse, grad_psw
