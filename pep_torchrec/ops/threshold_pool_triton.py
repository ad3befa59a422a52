"""The Triton kernels of `threshold_pool` (CUDA; on CPU only under `TRITON_INTERPRET=1`, for tests).

Legend: N = gathered rows, B = bags (per feature), D = embedding dim, W = stored row width,
F = features, BLOCK_N × BLOCK_D = the tile of rows × columns a program holds.

One program per (bag, feature) (grid = (B, F)), holding all D columns (BLOCK_D = next power of two
≥ D, the rest masked: any D works) and walking the bag's rows BLOCK_N at a time. So every pooled
row and every gradient row is written by exactly one program (no atomics, deterministic), the
per-row s-gradient of ROW mode (a sum over D) stays inside one program, and only the [D]
coarse-threshold gradient needs an atomic add per bag. Offsets are int64 and row addresses are
computed in int64 (tables past 2^31 elements). Rows may be float32, bfloat16 or float16 (and are
read at any row stride: the sharded lookup passes a column slice of the TBE output); all math and
accumulation is float32, gradients are stored in the rows' dtype. A bag with a huge pooling factor
is walked by one program: fine for recommendation bags (pooling factors ≲ 10^3), a split-bag
variant would be needed for 10^5-row bags.

Features (the grouped launch `GroupedThresholdPool` makes, one per sharded TBE group): feature
f's bag b is rows offsets[f·B + b] .. offsets[f·B + b + 1] of a KJT's offsets; its row n lives at
rows + (n − offsets[f·B])·stride_row + f·W (the TBE output [N_max, F·W]: feature f's ids in rows
[0, N_f)); weights are indexed by n itself (the KJT's); pooled bag (f, b) goes to
out + b·ldo + f·D. A single-feature call is F = 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# ThresholdMode codes, as in library.py.
ROW_DIM, ROW, COARSE, MASK, NONE = 0, 1, 2, 3, 4
# Elements per tile: BLOCK_N · BLOCK_D ≈ 2048 keeps the tile in registers for D up to a few hundred.
_TILE = 2048


@triton.jit
def _fwd_kernel(
    rows_ptr, stride_row, offsets_ptr, coarse_s_ptr, psw_ptr, out_ptr,
    B, D, W, ldo, gk,
    MODE: tl.constexpr, HAS_PSW: tl.constexpr, MEAN: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    f = tl.program_id(1).to(tl.int64)
    row0 = tl.load(offsets_ptr + f * B)  # int64: feature f's first id
    start = tl.load(offsets_ptr + f * B + b)  # int64 bag bounds (KJT positions)
    end = tl.load(offsets_ptr + f * B + b + 1)
    rows_ptr = rows_ptr + f * W  # feature f's columns; its id n is row n − row0
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    # COARSE: one threshold per column, shared by every row of every bag.
    coarse_t = tl.zeros([BLOCK_D], dtype=tl.float32)
    if MODE == COARSE:
        coarse_t = gk * tl.sigmoid(tl.load(coarse_s_ptr + d, mask=d_ok, other=0.0).to(tl.float32))
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        tile_ok = n_ok[:, None] & d_ok[None, :]
        r = n - row0  # the ids' rows in the TBE output (int64: no overflow on large tables)
        row_base = rows_ptr + r[:, None] * stride_row
        # Masked lanes read 0: v = 0 is never kept (|0| − t ≤ 0), so they add nothing.
        v = tl.load(row_base + d[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        if MODE == NONE:
            vhat = v
        elif MODE == MASK:
            m = tl.load(row_base + D + d[None, :], mask=tile_ok, other=0.0).to(tl.float32)
            vhat = tl.where(m > 0.5, v, 0.0)
        else:
            if MODE == ROW_DIM:
                t = gk * tl.sigmoid(
                    tl.load(row_base + D + d[None, :], mask=tile_ok, other=0.0).to(tl.float32)
                )
            elif MODE == ROW:
                s_n = tl.load(rows_ptr + r * stride_row + D, mask=n_ok, other=0.0).to(tl.float32)
                t = (gk * tl.sigmoid(s_n))[:, None]  # one threshold per row, broadcast over D
            else:
                t = coarse_t[None, :]
            mag = tl.abs(v) - t
            # sign(v)·relu(|v| − t); pruned elements (mag ≤ 0, the relu kink included) give 0.
            vhat = tl.where(mag > 0.0, tl.where(v < 0.0, -mag, mag), 0.0)
        if HAS_PSW:
            w = tl.load(psw_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
            vhat = vhat * w[:, None]
        acc += tl.sum(vhat, axis=0)
    if MEAN:
        # Divide by the row count; an empty bag (count 0) stays 0.
        acc = acc / tl.maximum(end - start, 1).to(tl.float32)
    tl.store(out_ptr + b * ldo + f * D + d, acc, mask=d_ok)


@triton.jit
def _bwd_kernel(
    grad_out_ptr, rows_ptr, stride_row, offsets_ptr, coarse_s_ptr, psw_ptr,
    grad_rows_ptr, grad_coarse_ptr, grad_psw_ptr,
    B, D, W, ldgo, ldg, gk, s_decay, s_push,
    MODE: tl.constexpr, HAS_PSW: tl.constexpr, MEAN: tl.constexpr,
    NEED_ROWS: tl.constexpr, NEED_COARSE: tl.constexpr, NEED_PSW: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    f = tl.program_id(1).to(tl.int64)
    row0 = tl.load(offsets_ptr + f * B)
    start = tl.load(offsets_ptr + f * B + b)
    end = tl.load(offsets_ptr + f * B + b + 1)
    rows_ptr = rows_ptr + f * W  # as in the forward
    grad_rows_ptr = grad_rows_ptr + f * W
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    # The gradient reaching each row's w·v̂ (mean: divided by the count).
    g = tl.load(grad_out_ptr + b * ldgo + f * D + d, mask=d_ok, other=0.0).to(tl.float32)
    if MEAN:
        g = g / tl.maximum(end - start, 1).to(tl.float32)
    coarse_sig = tl.zeros([BLOCK_D], dtype=tl.float32)
    if MODE == COARSE:
        coarse_sig = tl.sigmoid(tl.load(coarse_s_ptr + d, mask=d_ok, other=0.0).to(tl.float32))
    grad_coarse = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        tile_ok = n_ok[:, None] & d_ok[None, :]
        r = n - row0
        row_base = rows_ptr + r[:, None] * stride_row
        grad_base = grad_rows_ptr + r[:, None] * ldg
        v = tl.load(row_base + d[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        if HAS_PSW:
            w = tl.load(psw_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
            g_e = g[None, :] * w[:, None]  # gradient reaching v̂
        else:
            g_e = g[None, :] + tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        if MODE == NONE:
            vhat = v
            g_v = g_e
        elif MODE == MASK:
            keep = tl.load(row_base + D + d[None, :], mask=tile_ok, other=0.0).to(tl.float32) > 0.5
            vhat = tl.where(keep, v, 0.0)
            g_v = tl.where(keep, g_e, 0.0)  # masked elements get zero gradient (retrain)
        else:
            if MODE == ROW_DIM:
                s = tl.load(row_base + D + d[None, :], mask=tile_ok, other=0.0).to(tl.float32)
                sig = tl.sigmoid(s)
            elif MODE == ROW:
                s_n = tl.load(rows_ptr + r * stride_row + D, mask=n_ok, other=0.0).to(tl.float32)
                sig = tl.sigmoid(s_n)[:, None] + tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            else:
                sig = coarse_sig[None, :] + tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            mag = tl.abs(v) - gk * sig
            kept = mag > 0.0  # relu'(0) = 0: an element at its threshold is pruned
            vhat = tl.where(kept, tl.where(v < 0.0, -mag, mag), 0.0)
            g_v = tl.where(kept, g_e, 0.0)
            # ∂v̂/∂s = −sign(v)·1[kept]·gk·σ(1 − σ); kept ⇒ v ≠ 0.
            g_s = tl.where(kept, tl.where(v < 0.0, g_e, -g_e) * gk * sig * (1.0 - sig), 0.0)
            if NEED_ROWS:
                if MODE == ROW_DIM:
                    # + the sparsity pressure s_decay·s − s_push, once per row occurrence.
                    tl.store(grad_base + D + d[None, :],
                             (g_s + s_decay * s - s_push).to(grad_rows_ptr.dtype.element_ty), mask=tile_ok)  # fmt: skip
                if MODE == ROW:
                    # s is broadcast over D: its gradient is the row sum (pad columns: zeroed by the launcher).
                    g_row = tl.sum(g_s, axis=1) + s_decay * s_n - s_push
                    tl.store(grad_rows_ptr + r * ldg + D, g_row.to(grad_rows_ptr.dtype.element_ty), mask=n_ok)
            if NEED_COARSE:
                grad_coarse += tl.sum(g_s, axis=0)
        if NEED_ROWS:
            tl.store(grad_base + d[None, :], g_v.to(grad_rows_ptr.dtype.element_ty), mask=tile_ok)
        if NEED_PSW:
            tl.store(grad_psw_ptr + n, tl.sum(g[None, :] * vhat, axis=1), mask=n_ok)
    if NEED_COARSE:
        # One atomic add of a [D] partial per bag (float32: order-dependent in the last bits).
        tl.atomic_add(grad_coarse_ptr + d, grad_coarse, mask=d_ok)


def _blocks(dim: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(dim)
    return max(1, min(64, _TILE // block_d)), block_d


def _row_stride(rows: Tensor) -> int:
    return rows.stride(0) if rows.shape[0] > 1 else rows.shape[1]


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
    block_n, block_d = _blocks(dim)
    _fwd_kernel[(num_bags, num_features)](
        rows, _row_stride(rows), offsets, coarse_s if coarse_s is not None else rows,
        per_sample_weights if per_sample_weights is not None else rows, out,
        num_bags, dim, rows.shape[1] // num_features, num_features * dim, gk,
        MODE=mode, HAS_PSW=per_sample_weights is not None, MEAN=mean, BLOCK_N=block_n, BLOCK_D=block_d,
    )  # fmt: skip
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
    grad_rows = None
    if need_rows:
        # The kernel writes every v / s column of every row a bag reads; pad (ROW) and mask (MASK)
        # columns, and a group's padding rows, must read 0.
        fill = torch.zeros if mode in (ROW, MASK) or grouped else torch.empty
        grad_rows = fill(num_rows, width, dtype=rows.dtype, device=device)
    grad_coarse = torch.zeros(dim, dtype=torch.float32, device=device) if need_coarse else None
    grad_psw = torch.zeros(num_rows, dtype=torch.float32, device=device) if need_weights else None
    if num_bags == 0:
        return grad_rows, grad_coarse, grad_psw
    block_n, block_d = _blocks(dim)
    dummy = grad_pooled
    _bwd_kernel[(num_bags, num_features)](
        grad_pooled, rows, _row_stride(rows), offsets, coarse_s if coarse_s is not None else dummy,
        per_sample_weights if per_sample_weights is not None else dummy,
        grad_rows if grad_rows is not None else dummy, grad_coarse if grad_coarse is not None else dummy,
        grad_psw if grad_psw is not None else dummy,
        num_bags, dim, width // num_features, num_features * dim, width, gk, s_decay, s_push,
        MODE=mode, HAS_PSW=per_sample_weights is not None, MEAN=mean,
        NEED_ROWS=grad_rows is not None, NEED_COARSE=grad_coarse is not None, NEED_PSW=grad_psw is not None,
        BLOCK_N=block_n, BLOCK_D=block_d,
    )  # fmt: skip
    return grad_rows, grad_coarse, grad_psw
