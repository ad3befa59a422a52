"""Tests for pep_torchrec.ops.threshold_pool: the PEP threshold + pooling reference op.

Legend: N = gathered rows, B = bags, D = embedding dim, W = stored row width.

The op is checked against `naive_threshold_pool`, an independent per-bag, per-row loop written
plainly here (its own sigmoid, clamp instead of relu), forward and backward (autograd through the
naive loop), over modes × pooling × per-sample weights × shapes. Values are drawn away from the
relu kink |v| = t, where the two formulations pick different subgradients.

Tolerances: float32 forwards differ from the loop only by summation order (≤ ~N ulp of the bag's
magnitude: rtol 1e-5, atol 1e-5); float64 backward comparisons are exact up to rounding (1e-10).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pep_torchrec.ops import (
    ROW_S_COLUMNS,
    ThresholdMode,
    margins,
    row_width,
    s_columns,
    threshold,
    threshold_pool,
)

MODES = list(ThresholdMode)
THRESHOLD_MODES = [ThresholdMode.ROW_DIM, ThresholdMode.ROW, ThresholdMode.COARSE]
POOLINGS = ["sum", "mean"]
# (D, bag lengths): odd dims, empty bags, a single row, all-empty, one huge bag.
SHAPES = [
    (3, [2, 0, 3, 1]),
    (5, [1]),
    (17, [0, 4, 0, 2, 5]),
    (4, [0, 0, 0]),
    (5, [400]),
]
GK = 0.7  # not 1, so a dropped gk factor shows


def make_inputs(
    dim: int,
    lengths: list[int],
    mode: ThresholdMode,
    *,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    gk: float = GK,
    margin_gap: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random (rows [N, W], offsets [B + 1], coarse_s [D] | None), with |v| − t never within
    `margin_gap` of 0 (away from the kink) and about half of the elements pruned."""
    gen = torch.Generator().manual_seed(seed)
    num_rows = sum(lengths)
    width = row_width(dim, mode)
    rows = torch.zeros(num_rows, width, dtype=torch.float64)
    v = torch.randn(num_rows, dim, generator=gen, dtype=torch.float64) * 0.6
    coarse_s = None
    if mode is ThresholdMode.ROW_DIM:
        rows[:, dim:] = torch.randn(num_rows, dim, generator=gen, dtype=torch.float64)
        t = gk * torch.sigmoid(rows[:, dim:])
    elif mode is ThresholdMode.ROW:
        rows[:, dim] = torch.randn(num_rows, generator=gen, dtype=torch.float64)
        # Junk in the pad columns: the op must ignore it.
        rows[:, dim + 1 :] = torch.randn(num_rows, ROW_S_COLUMNS - 1, generator=gen, dtype=torch.float64)
        t = gk * torch.sigmoid(rows[:, dim : dim + 1])
    elif mode is ThresholdMode.COARSE:
        coarse_s = torch.randn(dim, generator=gen, dtype=torch.float64)
        t = gk * torch.sigmoid(coarse_s)
    else:
        t = torch.zeros(())
        if mode is ThresholdMode.MASK:
            rows[:, dim:] = (torch.rand(num_rows, dim, generator=gen) > 0.4).double()
    margin = v.abs() - t
    v = torch.where(margin.abs() < margin_gap, v + torch.sign(v) * 2 * margin_gap, v)
    rows[:, :dim] = v
    offsets = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64)
    rows = rows.to(dtype)
    if coarse_s is not None:
        coarse_s = coarse_s.to(dtype)
    return rows, offsets, coarse_s


def naive_threshold_pool(
    rows: torch.Tensor,
    offsets: torch.Tensor,
    *,
    dim: int,
    mode: ThresholdMode,
    gk: float,
    coarse_s: torch.Tensor | None,
    per_sample_weights: torch.Tensor | None,
    pooling: str,
) -> torch.Tensor:
    """The op written as plainly as possible: for each bag, for each of its rows, v̂ then add."""
    pooled = []
    for b in range(offsets.numel() - 1):
        start, end = int(offsets[b]), int(offsets[b + 1])
        acc = torch.zeros(dim, dtype=rows.dtype)
        for n in range(start, end):
            row = rows[n]
            v = row[:dim]
            if mode is ThresholdMode.NONE:
                vhat = v
            elif mode is ThresholdMode.MASK:
                vhat = torch.where(row[dim:] > 0.5, v, torch.zeros_like(v))
            else:
                if mode is ThresholdMode.ROW_DIM:
                    s = row[dim : 2 * dim]
                elif mode is ThresholdMode.ROW:
                    s = row[dim].expand(dim)
                else:
                    s = coarse_s
                t = gk / (1.0 + torch.exp(-s))
                vhat = torch.sign(v) * torch.clamp(v.abs() - t, min=0.0)
            if per_sample_weights is not None:
                vhat = vhat * per_sample_weights[n]
            acc = acc + vhat
        if pooling == "mean" and end > start:
            acc = acc / (end - start)
        pooled.append(acc)
    if not pooled:
        return torch.zeros(0, dim, dtype=rows.dtype)
    return torch.stack(pooled)


def _weights(num_rows: int, with_weights: bool, dtype: torch.dtype, seed: int = 1) -> torch.Tensor | None:
    if not with_weights:
        return None
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(num_rows, generator=gen, dtype=torch.float64) * 2 - 0.5).to(dtype)


CASES = list(itertools.product(MODES, POOLINGS, [False, True], range(len(SHAPES))))


@pytest.mark.parametrize(
    ("mode", "pooling", "with_weights", "shape_index"),
    CASES,
    ids=[f"{m.value}-{p}-{'w' if w else 'nw'}-{SHAPES[i][0]}x{SHAPES[i][1][:3]}" for m, p, w, i in CASES],
)
def test_forward_and_backward_match_naive_loop(
    mode: ThresholdMode, pooling: str, with_weights: bool, shape_index: int
) -> None:
    dim, lengths = SHAPES[shape_index]
    # Forward in float32 (the production dtype).
    rows, offsets, coarse_s = make_inputs(dim, lengths, mode, dtype=torch.float32)
    psw = _weights(rows.shape[0], with_weights, torch.float32)
    kwargs = dict(dim=dim, mode=mode, gk=GK, coarse_s=coarse_s, per_sample_weights=psw, pooling=pooling)
    out = threshold_pool(rows, offsets, **kwargs)
    expected = naive_threshold_pool(rows, offsets, **kwargs)
    assert out.dtype == torch.float32 and out.shape == (len(lengths), dim)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    # Backward in float64: d/d rows, d/d coarse_s, d/d weights vs autograd through the loop.
    rows, offsets, coarse_s = make_inputs(dim, lengths, mode)
    psw = _weights(rows.shape[0], with_weights, torch.float64)
    leaves = [rows.requires_grad_()]
    if coarse_s is not None:
        leaves.append(coarse_s.requires_grad_())
    if psw is not None:
        leaves.append(psw.requires_grad_())
    kwargs = dict(dim=dim, mode=mode, gk=GK, coarse_s=coarse_s, per_sample_weights=psw, pooling=pooling)
    upstream = torch.randn(len(lengths), dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((threshold_pool(rows, offsets, **kwargs) * upstream).sum(), leaves)
    naive_out = naive_threshold_pool(rows, offsets, **kwargs)
    if naive_out.requires_grad:
        expected_grads = torch.autograd.grad((naive_out * upstream).sum(), leaves, allow_unused=True)
    else:  # all bags empty: nothing depends on the inputs
        expected_grads = [None] * len(leaves)
    for grad, expected_grad in zip(grads, expected_grads):
        if expected_grad is None:
            expected_grad = torch.zeros_like(grad)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10)

    # Columns that are not v or s get exact zeros (ROW pad, MASK m).
    if mode is ThresholdMode.ROW:
        assert torch.equal(
            grads[0][:, dim + 1 :], torch.zeros(rows.shape[0], ROW_S_COLUMNS - 1, dtype=rows.dtype)
        )
    if mode is ThresholdMode.MASK:
        assert torch.equal(grads[0][:, dim:], torch.zeros(rows.shape[0], dim, dtype=rows.dtype))


@pytest.mark.parametrize("mode", MODES, ids=[m.value for m in MODES])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_gradcheck(mode: ThresholdMode, pooling: str) -> None:
    """Finite differences in float64 away from the kink (margin gap 0.05 ≫ eps 1e-6)."""
    dim, lengths = 5, [2, 0, 3, 1]
    rows, offsets, coarse_s = make_inputs(dim, lengths, mode)
    psw = _weights(rows.shape[0], True, torch.float64).requires_grad_()
    rows.requires_grad_()
    if coarse_s is None:

        def fn(rows_, psw_):
            return threshold_pool(
                rows_, offsets, dim=dim, mode=mode, gk=GK, per_sample_weights=psw_, pooling=pooling
            )

        assert torch.autograd.gradcheck(fn, (rows, psw))
    else:
        coarse_s.requires_grad_()

        def fn(rows_, coarse_s_, psw_):
            return threshold_pool(
                rows_,
                offsets,
                dim=dim,
                mode=mode,
                gk=GK,
                coarse_s=coarse_s_,
                per_sample_weights=psw_,
                pooling=pooling,
            )

        assert torch.autograd.gradcheck(fn, (rows, coarse_s, psw))


def test_subgradient_formula_and_v_zero() -> None:
    """∂v̂/∂v = 1[|v| > t] (0 at v = 0, no NaN); ∂v̂/∂s = −sign(v)·1[|v| > t]·gk·σ(s)(1 − σ(s))."""
    dim = 4
    s = torch.tensor([0.3, -1.0, 2.0, 0.0], dtype=torch.float64)
    v = torch.tensor([0.0, -0.9, 0.2, 0.6], dtype=torch.float64)  # t = gk·σ(s) = .40, .19, .62, .35
    rows = torch.cat([v, s]).unsqueeze(0).requires_grad_()
    out = threshold_pool(rows, torch.tensor([0, 1]), dim=dim, mode="row_dim", gk=GK)
    out.sum().backward()
    t = GK * torch.sigmoid(s)
    kept = (v.abs() > t).double()
    assert torch.equal(kept, torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(rows.grad[0, :dim], kept, rtol=0, atol=0)
    sig = torch.sigmoid(s)
    torch.testing.assert_close(rows.grad[0, dim:], -torch.sign(v) * kept * GK * sig * (1 - sig))
    assert torch.isfinite(rows.grad).all()


@pytest.mark.parametrize("mode", THRESHOLD_MODES, ids=[m.value for m in THRESHOLD_MODES])
def test_pressure_terms_are_exact(mode: ThresholdMode) -> None:
    """grad_s gains s_decay·s − s_push per row occurrence (row modes) or once per call (COARSE),
    and nothing else changes."""
    dim, lengths = 3, [2, 0, 3, 1]
    s_decay, s_push = 0.25, 1.5
    rows, offsets, coarse_s = make_inputs(dim, lengths, mode)
    rows.requires_grad_()
    if coarse_s is not None:
        coarse_s.requires_grad_()
    leaves = [rows] + ([coarse_s] if coarse_s is not None else [])
    upstream = torch.randn(len(lengths), dim, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def grads(decay: float, push: float) -> tuple[torch.Tensor, ...]:
        out = threshold_pool(
            rows,
            offsets,
            dim=dim,
            mode=mode,
            gk=GK,
            coarse_s=coarse_s,
            pooling="mean",
            s_decay=decay,
            s_push=push,
        )
        return torch.autograd.grad((out * upstream).sum(), leaves)

    plain = grads(0.0, 0.0)
    pressed = grads(s_decay, s_push)
    expected_rows = torch.zeros_like(rows)
    cols = s_columns(dim, mode)
    if cols is not None:
        expected_rows[:, cols] = s_decay * rows.detach()[:, cols] - s_push
    torch.testing.assert_close(pressed[0] - plain[0], expected_rows, rtol=0, atol=1e-12)
    if coarse_s is not None:
        torch.testing.assert_close(
            pressed[1] - plain[1], s_decay * coarse_s.detach() - s_push, rtol=0, atol=1e-12
        )
    # The forward is untouched.
    out_plain = threshold_pool(rows, offsets, dim=dim, mode=mode, gk=GK, coarse_s=coarse_s)
    out_pressed = threshold_pool(
        rows, offsets, dim=dim, mode=mode, gk=GK, coarse_s=coarse_s, s_decay=1.0, s_push=1.0
    )
    assert torch.equal(out_plain, out_pressed)


@pytest.mark.parametrize("mode", [ThresholdMode.ROW_DIM, ThresholdMode.ROW], ids=["row_dim", "row"])
def test_pressure_counts_duplicate_ids_per_occurrence(mode: ThresholdMode) -> None:
    """Gathered from a table, a row looked up k times gets k × (s_decay·s − s_push)."""
    dim, s_push, s_decay = 4, 2.0, 0.5
    table, _, _ = make_inputs(dim, [5], mode)
    table.requires_grad_()
    ids = torch.tensor([3, 1, 3, 3, 0])  # row 3 three times, row 2 and 4 never
    offsets = torch.tensor([0, 2, 5])

    def table_grad(decay: float, push: float) -> torch.Tensor:
        out = threshold_pool(table[ids], offsets, dim=dim, mode=mode, gk=GK, s_decay=decay, s_push=push)
        (grad,) = torch.autograd.grad(out.sum(), table)
        return grad

    diff = table_grad(s_decay, s_push) - table_grad(0.0, 0.0)
    counts = torch.bincount(ids, minlength=5).double().unsqueeze(1)
    cols = s_columns(dim, mode)
    expected = torch.zeros_like(table)
    expected[:, cols] = counts * (s_decay * table.detach()[:, cols] - s_push)
    torch.testing.assert_close(diff, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", [ThresholdMode.MASK, ThresholdMode.NONE], ids=["mask", "none"])
def test_no_pressure_without_thresholds(mode: ThresholdMode) -> None:
    rows, offsets, _ = make_inputs(3, [2, 1], mode)
    rows.requires_grad_()
    out = threshold_pool(rows, offsets, dim=3, mode=mode, s_decay=1.0, s_push=1.0)
    (grad,) = torch.autograd.grad(out.sum(), rows)
    (plain,) = torch.autograd.grad(threshold_pool(rows, offsets, dim=3, mode=mode).sum(), rows)
    assert torch.equal(grad, plain)


def test_mask_mode() -> None:
    """Output uses v·m; m never gets gradient; masked v gets none either."""
    dim = 3
    v = torch.tensor([[1.0, -2.0, 3.0], [4.0, 5.0, -6.0]])
    m = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    rows = torch.cat([v, m], dim=1).requires_grad_()
    out = threshold_pool(rows, torch.tensor([0, 2]), dim=dim, mode="mask")
    torch.testing.assert_close(out, (v * m).sum(0, keepdim=True))
    out.sum().backward()
    torch.testing.assert_close(rows.grad[:, :dim], m)
    assert torch.equal(rows.grad[:, dim:], torch.zeros(2, dim))


def test_row_mode_pad_columns_get_zero_gradient() -> None:
    dim = 4
    rows, offsets, _ = make_inputs(dim, [3, 2], ThresholdMode.ROW, dtype=torch.float32)
    rows.requires_grad_()
    out = threshold_pool(rows, offsets, dim=dim, mode="row", s_decay=0.1, s_push=0.3)
    out.pow(2).sum().backward()
    assert torch.equal(rows.grad[:, dim + 1 :], torch.zeros(5, ROW_S_COLUMNS - 1))
    assert (rows.grad[:, dim] != 0).all()


@pytest.mark.parametrize("mode", MODES, ids=[m.value for m in MODES])
def test_threshold_and_margins_agree(mode: ThresholdMode) -> None:
    """kept ⇔ margin > 0 ⇔ v̂ ≠ 0, and v̂ = sign(v)·max(margin, 0) in the threshold modes."""
    dim = 5
    rows, _, coarse_s = make_inputs(dim, [40], mode, dtype=torch.float32)
    rows[0, 0] = 0.0  # v = 0: pruned in every mode
    vhat = threshold(rows, dim=dim, mode=mode, gk=GK, coarse_s=coarse_s)
    margin = margins(rows, dim=dim, mode=mode, gk=GK, coarse_s=coarse_s)
    assert vhat.shape == margin.shape == (40, dim)
    assert torch.equal(vhat != 0, margin > 0)
    assert not bool(margin[0, 0] > 0)
    if mode in THRESHOLD_MODES:
        torch.testing.assert_close(vhat, torch.sign(rows[:, :dim]) * margin.clamp(min=0))
    if mode is ThresholdMode.MASK:
        masked = rows[:, dim:] <= 0.5
        assert torch.equal(margin[masked], torch.full_like(margin[masked], -1.0))
    if mode is ThresholdMode.NONE:
        torch.testing.assert_close(margin, rows.abs())


def test_half_rows_accumulate_in_float32() -> None:
    dim = 4
    rows, offsets, _ = make_inputs(dim, [300, 1], ThresholdMode.ROW_DIM, dtype=torch.float32)
    out16 = threshold_pool(rows.half(), offsets, dim=dim, mode="row_dim", gk=GK)
    assert out16.dtype == torch.float32
    expected = threshold_pool(rows.half().float(), offsets, dim=dim, mode="row_dim", gk=GK)
    torch.testing.assert_close(out16, expected, rtol=1e-6, atol=1e-5)


def test_int32_offsets_and_string_modes() -> None:
    rows, offsets, _ = make_inputs(3, [2, 0, 1], ThresholdMode.ROW_DIM, dtype=torch.float32)
    a = threshold_pool(rows, offsets.int(), dim=3, mode="row_dim")
    b = threshold_pool(rows, offsets, dim=3, mode=ThresholdMode.ROW_DIM)
    assert torch.equal(a, b)


def test_row_width() -> None:
    assert row_width(8, "row_dim") == 16
    assert row_width(8, "mask") == 16
    assert row_width(8, "row") == 12
    assert row_width(8, "coarse") == 8
    assert row_width(8, "none") == 8
    assert s_columns(8, "row_dim") == slice(8, 16)
    assert s_columns(8, "row") == slice(8, 9)
    assert s_columns(8, "coarse") is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(rows=torch.zeros(3, 5), mode="row_dim"), "5 wide"),
        (dict(rows=torch.zeros(3, 3), mode="coarse"), "needs coarse_s"),
        (dict(rows=torch.zeros(3, 3), mode="coarse", coarse_s=torch.zeros(2)), r"coarse_s must be \[D\]"),
        (dict(rows=torch.zeros(3, 3), mode="none", coarse_s=torch.zeros(3)), "only used in mode 'coarse'"),
        (dict(rows=torch.zeros(3, 3), mode="none", pooling="max"), "pooling must be one of"),
        (dict(rows=torch.zeros(3, 3), mode="none", offsets=torch.tensor([0, 2])), "from 0 to N = 3"),
        (dict(rows=torch.zeros(3, 3), mode="none", offsets=torch.tensor([0, 2, 1, 3])), "non-decreasing"),
        (
            dict(rows=torch.zeros(3, 3), mode="none", per_sample_weights=torch.ones(2)),
            r"per_sample_weights must be \[N\]",
        ),
    ],
)
def test_bad_inputs_are_refused(kwargs: dict, message: str) -> None:
    offsets = kwargs.pop("offsets", torch.tensor([0, 1, 3]))
    rows = kwargs.pop("rows")
    with pytest.raises(ValueError, match=message):
        threshold_pool(rows, offsets, dim=3, **kwargs)


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="bogus"):
        threshold_pool(torch.zeros(1, 3), torch.tensor([0, 1]), dim=3, mode="bogus")


def test_mean_divides_by_row_count_not_weight_sum() -> None:
    rows = torch.tensor([[1.0], [3.0]])
    out = threshold_pool(
        rows,
        torch.tensor([0, 2]),
        dim=1,
        mode="none",
        pooling="mean",
        per_sample_weights=torch.tensor([2.0, 0.5]),
    )
    assert math.isclose(float(out), (2.0 + 1.5) / 2)
