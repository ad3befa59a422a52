"""The fused kernels of `threshold_pool` against the pure-PyTorch reference (the spec).

Legend: N = gathered rows, B = bags, D = embedding dim, W = stored row width.

* CPU C++ (`threshold_pool_cpu`, through the registered op): table-driven forward + backward (rows,
  coarse_s, per-sample weights) over every mode, sum/mean, odd D, empty bags, 1-row tables, a huge
  bag, weights, sparsity pressure, float32 and float64, and row-strided inputs (the sharded lookup
  passes column slices of the TBE output).
* Triton (`threshold_pool_triton`) under `TRITON_INTERPRET=1` on small shapes, in a subprocess
  (the variable must be set before triton is imported; skipped with the reason if triton is absent).
* The dispatch policy (`PEP_TORCHREC_OPS`) and the build-failure fallback (warning + reference).

Tolerances. Inputs are drawn with |v| − t at least 0.05 away from the relu kink, so both sides
make the same keep/prune decision. float64: the kernel uses libm exp and only the summation order
differs: rtol 1e-10, atol 1e-12. float32: the kernel's vectorised exp is within ~2 ulp of expf, so
thresholds differ by ~1e-7 and pooled sums over ≤ 400 rows by ≤ 400·2^-23·|v̂|: rtol 1e-5, atol 2e-5.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from pep_torchrec.ops import (
    ThresholdMode,
    library,
    row_width,
    threshold_pool,
    threshold_pool_cpu,
    threshold_pool_reference,
)

REPO = Path(__file__).resolve().parents[2]
GK = 0.7  # not 1, so a dropped gk factor shows
MODES = list(ThresholdMode)
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=2e-5)}

needs_cpu_kernel = pytest.mark.skipif(
    not threshold_pool_cpu.available(), reason="the C++ kernel could not be built here (no compiler?)"
)


def make_inputs(dim: int, lengths: list[int], mode: ThresholdMode, dtype: torch.dtype, seed: int = 0,
                weights: bool = False, row_stride_pad: int = 0):  # fmt: skip
    """(rows [N, W] (a column slice of a wider buffer when row_stride_pad > 0), offsets [B + 1],
    coarse_s [D] | None, weights [N] | None), |v| − t kept ≥ 0.05 from 0."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    width = row_width(dim, mode)
    rows = torch.zeros(n, width, dtype=torch.float64)
    v = torch.randn(n, dim, generator=gen, dtype=torch.float64) * 0.6
    coarse_s = None
    t = torch.zeros(())
    if mode is ThresholdMode.ROW_DIM:
        rows[:, dim:] = torch.randn(n, dim, generator=gen, dtype=torch.float64) * 2
        t = GK * torch.sigmoid(rows[:, dim:])
    elif mode is ThresholdMode.ROW:
        rows[:, dim:] = torch.randn(n, width - dim, generator=gen, dtype=torch.float64)  # junk pads
        t = GK * torch.sigmoid(rows[:, dim : dim + 1])
    elif mode is ThresholdMode.COARSE:
        coarse_s = torch.randn(dim, generator=gen, dtype=torch.float64)
        t = GK * torch.sigmoid(coarse_s)
    elif mode is ThresholdMode.MASK:
        rows[:, dim:] = (torch.rand(n, dim, generator=gen, dtype=torch.float64) > 0.4).double()
    margin = v.abs() - t
    rows[:, :dim] = torch.where(margin.abs() < 0.05, v + torch.sign(v) * 0.1, v)
    if row_stride_pad:
        wide = torch.randn(n, width + row_stride_pad, generator=gen, dtype=torch.float64)
        wide[:, 1 : 1 + width] = rows
        rows = wide[:, 1 : 1 + width]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    psw = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5 if weights else None
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cast(rows), offsets, cast(coarse_s), cast(psw)


@dataclasses.dataclass(frozen=True)
class Case:
    dim: int
    lengths: tuple[int, ...]
    weights: bool = False
    pooling: str = "sum"
    s_decay: float = 0.0
    s_push: float = 0.0
    dtype: torch.dtype = torch.float64
    row_stride_pad: int = 0

    def __str__(self) -> str:
        lens = self.lengths if len(self.lengths) <= 6 else f"{len(self.lengths)}bags"
        return (f"D{self.dim}-{lens}-w{int(self.weights)}-{self.pooling}-p{self.s_decay},{self.s_push}-"
                f"{str(self.dtype)[6:]}-pad{self.row_stride_pad}")  # fmt: skip


CASES = [
    Case(3, (2, 0, 3, 1)),  # odd D, an empty bag
    Case(5, (1,), weights=True, pooling="mean"),  # a 1-row table
    Case(17, (0, 4, 0, 2, 5), weights=True),  # odd D > 16 (SIMD tail)
    Case(4, (0, 0, 0), pooling="mean"),  # all bags empty (N = 0)
    Case(8, (400,), weights=True, pooling="mean"),  # one huge bag
    Case(16, (1,) * 64, s_decay=0.3, s_push=0.2),  # the train shape, with pressure
    Case(16, (3, 0, 7, 1, 2), weights=True, pooling="mean", s_decay=0.1, s_push=-0.4),
    Case(24, (5, 1, 0, 9), dtype=torch.float32),
    Case(16, (1,) * 33, weights=True, pooling="mean", s_decay=0.2, s_push=0.1, dtype=torch.float32),
    Case(9, (4, 2, 6), weights=True, dtype=torch.float32, row_stride_pad=11),  # column slice
    Case(16, (2, 3, 0, 1), s_decay=0.5, row_stride_pad=7),
]


def _run(fn, rows, offsets, coarse_s, psw, case: Case, mode: ThresholdMode):
    leaves = (
        [rows.detach().clone().requires_grad_()]
        if case.row_stride_pad == 0
        else [rows.detach().requires_grad_()]
    )
    leaves.append(None if coarse_s is None else coarse_s.detach().clone().requires_grad_())
    leaves.append(None if psw is None else psw.detach().clone().requires_grad_())
    out = fn(leaves[0], offsets, leaves[1], leaves[2])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    if out.numel():
        out.backward(grad)
    return out.detach(), [None if x is None else x.grad for x in leaves]


# The two ways into the CPU kernels: the registered op through the dispatcher (what torch.compile
# traces) and the eager autograd.Function `threshold_pool` calls.
ENTRIES = {"op": library.threshold_pool_op, "eager": library.threshold_pool_fused}


@needs_cpu_kernel
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cpu_kernel_matches_reference(case: Case, mode: ThresholdMode, entry: str) -> None:
    rows, offsets, coarse_s, psw = make_inputs(case.dim, list(case.lengths), mode, case.dtype,
                                               weights=case.weights, row_stride_pad=case.row_stride_pad)  # fmt: skip
    common = dict(
        dim=case.dim, mode=mode, gk=GK, pooling=case.pooling, s_decay=case.s_decay, s_push=case.s_push
    )

    def reference(r, o, c, w):
        return threshold_pool_reference(r, o, coarse_s=c, per_sample_weights=w, **common)

    def fused(r, o, c, w):
        return ENTRIES[entry](r, o, c, w, case.dim, library.MODE_CODES[mode], GK,
                              case.pooling == "mean", case.s_decay, case.s_push)  # fmt: skip

    ref_out, ref_grads = _run(reference, rows, offsets, coarse_s, psw, case, mode)
    out, grads = _run(fused, rows, offsets, coarse_s, psw, case, mode)
    assert out.dtype == ref_out.dtype and out.shape == (len(case.lengths), case.dim)
    torch.testing.assert_close(out, ref_out, **TOL[case.dtype])
    for name, g, ref_g in zip(("rows", "coarse_s", "weights"), grads, ref_grads):
        if ref_g is None and out.numel() and name == "rows" and rows.numel():
            raise AssertionError("reference produced no row gradient")
        if g is None or ref_g is None:
            assert (g is None or not g.any()) and (ref_g is None or not ref_g.any()), name
            continue
        torch.testing.assert_close(g, ref_g, **TOL[case.dtype], msg=lambda m, name=name: f"grad {name}: {m}")


@needs_cpu_kernel
def test_cpu_kernel_half_rows_upcast() -> None:
    rows, offsets, _, psw = make_inputs(8, [3, 0, 2], ThresholdMode.ROW_DIM, torch.float32, weights=True)
    rows = rows.to(torch.bfloat16)
    out = library.threshold_pool_op(rows, offsets, None, psw, 8, 0, GK, False, 0.0, 0.0)
    ref = threshold_pool_reference(rows, offsets, dim=8, mode="row_dim", gk=GK, per_sample_weights=psw)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


@needs_cpu_kernel
def test_opcheck() -> None:
    """torch.library's own checks (schema, fake impl, autograd registration) on two small cases."""
    for mode, weights in ((ThresholdMode.ROW_DIM, True), (ThresholdMode.COARSE, False)):
        rows, offsets, coarse_s, psw = make_inputs(5, [2, 0, 3], mode, torch.float64, weights=weights)
        rows.requires_grad_()
        if coarse_s is not None:
            coarse_s.requires_grad_()
        args = (rows, offsets, coarse_s, psw, 5, library.MODE_CODES[mode], GK, True, 0.1, 0.2)
        torch.library.opcheck(library.threshold_pool_op, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))  # fmt: skip


@needs_cpu_kernel
def test_traced_calls_go_through_the_registered_op() -> None:
    """Eager `threshold_pool` calls the kernels directly; torch.compile and fake tensors must see the
    registered op (with its fake implementation) instead, and agree with eager."""
    rows, offsets, _, psw = make_inputs(6, [2, 0, 3], ThresholdMode.ROW_DIM, torch.float32, weights=True)

    def fn(r):
        return threshold_pool(r, offsets, dim=6, mode="row_dim", gk=GK, per_sample_weights=psw,
                              s_decay=0.1, s_push=0.2)  # fmt: skip

    eager_rows = rows.clone().requires_grad_()
    eager = fn(eager_rows)
    eager.sum().backward()
    torch._dynamo.reset()
    compiled_rows = rows.clone().requires_grad_()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(compiled_rows)
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    torch.testing.assert_close(compiled_rows.grad, eager_rows.grad, rtol=0, atol=0)

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = threshold_pool(mode.from_tensor(rows), mode.from_tensor(offsets), dim=6, mode="row_dim")
    assert fake.shape == (3, 6) and fake.dtype == torch.float32
    # A fake made from a Parameter passes isinstance(·, Parameter); outside the mode it must still
    # reach the op's fake implementation, never the C++ kernel (which would read a fake pointer).
    fake_param = mode.from_tensor(torch.nn.Parameter(rows.clone()))
    fake = threshold_pool(fake_param, mode.from_tensor(offsets), dim=6, mode="row_dim")
    assert type(fake).__name__ == "FakeTensor" and fake.shape == (3, 6)
    # The grouped path has no fake implementation: it refuses, with the reason.
    with pytest.raises(ValueError, match="no grouped kernel for FakeTensor"):
        library.GroupedThresholdPool.apply(mode.from_tensor(torch.randn(4, 24)), mode.from_tensor(torch.arange(9)),
                                           None, 2, 6, 0, GK, False, 0.0, 0.0)  # fmt: skip
    with pytest.raises(ValueError, match="per-sample weights no gradient"):
        library.GroupedThresholdPool.apply(torch.randn(4, 24), torch.arange(9), torch.ones(8, requires_grad=True),
                                           2, 6, 0, GK, False, 0.0, 0.0)  # fmt: skip


def test_dispatch_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setenv("PEP_TORCHREC_OPS", "reference")
    assert library.default_impl(cpu) == "reference"
    monkeypatch.setenv("PEP_TORCHREC_OPS", "bogus")
    with pytest.raises(ValueError, match="PEP_TORCHREC_OPS"):
        library.default_impl(cpu)
    built = "fused" if threshold_pool_cpu.available() else "reference"
    for choice in ("fused", "auto", ""):
        monkeypatch.setenv("PEP_TORCHREC_OPS", choice)
        assert library.default_impl(cpu) == built, choice
    monkeypatch.delenv("PEP_TORCHREC_OPS")
    assert library.default_impl(cpu) == built
    assert library.default_impl(torch.device("meta")) == "reference"  # no kernel for that device


def test_build_failure_falls_back_to_reference(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A compiler that fails → one RuntimeWarning, and the op (and `threshold_pool`) compute the
    reference."""
    fresh = threshold_pool_cpu._NATIVE
    monkeypatch.setattr(
        threshold_pool_cpu,
        "_NATIVE",
        type(fresh)(
            fresh.source,
            fresh.flags,
            abi_symbol=fresh.abi_symbol,
            abi_version=fresh.abi_version,
            configure=fresh.configure,
            what=fresh.what,
            fallback=fresh.fallback,
        ),
    )
    monkeypatch.setenv("PEP_TORCHREC_CACHE", str(tmp_path))  # no cached object to find
    broken = tmp_path / "broken-c++"
    broken.write_text("#!/bin/sh\necho 'error: simulated compiler failure' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    monkeypatch.setenv("PEP_TORCHREC_OPS", "fused")
    rows, offsets, _, _ = make_inputs(6, [2, 3], ThresholdMode.ROW_DIM, torch.float32)
    with pytest.warns(RuntimeWarning, match="could not be built.*simulated compiler failure"):
        assert not threshold_pool_cpu.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warn once: no second warning
        out = threshold_pool(rows, offsets, dim=6, mode="row_dim", gk=GK)
        op_out = library.threshold_pool_op(rows, offsets, None, None, 6, 0, GK, False, 0.0, 0.0)
    ref = threshold_pool_reference(rows, offsets, dim=6, mode="row_dim", gk=GK)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(op_out, ref, rtol=0, atol=0)
    assert library.default_impl(torch.device("cpu")) == "reference"


# ---- Triton, interpreted on CPU -----------------------------------------------------------------

_TRITON_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    assert os.environ["TRITON_INTERPRET"] == "1"
    from pep_torchrec.ops import ThresholdMode, row_width, threshold_pool_reference
    from pep_torchrec.ops import threshold_pool_triton as T
    from pep_torchrec.ops.library import MODE_CODES
    gen = torch.Generator().manual_seed(0)
    # (D, bag lengths, weights, mean, row-stride pad): odd D, empty bags, a long bag, more bags than
    # one tile holds (BLOCK_B = 32 at D <= 16), D past one column block (130: two blocks of 128;
    # ROW holds it in one block of 256) with weights (their gradient sums over the blocks).
    cases = [(5, [2, 0, 3, 1], True, True, 0), (16, [1, 1, 0, 1], False, False, 3),
             (3, [70, 0, 2], True, False, 0), (4, [0, 0], False, True, 0), (8, [1, 2, 0] * 50, True, False, 0),
             (130, [3, 0, 2], True, True, 0),
             # one id per bag over two tiles (the speculative one-id path, weights and mean), and a
             # tile of one-id bags that do not start at TBE row b (a 2-id bag before them).
             (16, [1] * 40, True, True, 0), (16, [2] + [1] * 40, False, False, 0)]
    worst = 0.0
    for mode, code in MODE_CODES.items():
        for dim, lengths, weighted, mean, pad in cases:
            n, width = sum(lengths), row_width(dim, mode)
            wide = torch.randn(n, width + pad, generator=gen)
            rows = wide[:, :width]
            if mode is ThresholdMode.MASK:
                rows[:, dim:] = (torch.rand(n, dim, generator=gen) > 0.4).float()
            cs = torch.randn(dim, generator=gen) if mode is ThresholdMode.COARSE else None
            w = torch.rand(n, generator=gen) if weighted else None
            off = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int64)
            r = rows.detach().clone().requires_grad_()
            c = None if cs is None else cs.clone().requires_grad_()
            ww = None if w is None else w.clone().requires_grad_()
            ref = threshold_pool_reference(r, off, dim=dim, mode=mode, gk=0.7, coarse_s=c, per_sample_weights=ww,
                                           pooling="mean" if mean else "sum", s_decay=0.1, s_push=0.2)
            g = torch.randn(ref.shape, generator=gen)
            if ref.numel():
                ref.backward(g)
            out = T.forward(rows, off, cs, w, dim, code, 0.7, mean)
            gr, gc, gw = T.backward(g, rows, off, cs, w, dim, code, 0.7, mean, 0.1, 0.2, True, cs is not None, w is not None)
            pairs = [(out, ref.detach()), (gr, r.grad if r.grad is not None else torch.zeros_like(rows))]
            if gc is not None:
                pairs.append((gc + 0.1 * cs - 0.2, c.grad))  # the launcher leaves coarse pressure to the op
            if gw is not None:
                pairs.append((gw, ww.grad if ww.grad is not None else torch.zeros_like(w)))
            for got, want in pairs:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{mode} {dim} {lengths}: {m}")
                if got.numel():
                    worst = max(worst, (got - want).abs().max().item())
    # Grouped launch (grid (B, F)): a TBE-shaped [N_max, F·W] buffer, feature f's ids in rows
    # [0, N_f), junk in the padding rows (which must get zero gradient), KJT offsets and weights.
    for mode, code in MODE_CODES.items():
        if mode is ThresholdMode.COARSE:
            continue  # per-table [D] parameters: not grouped
        for weighted, mean in ((False, False), (True, True)):
            dim, lengths_F = 6, [[2, 0, 3], [0, 0, 0], [1, 1, 1], [4, 0, 1]]
            nums = [sum(x) for x in lengths_F]
            width = row_width(dim, mode)
            rows_all = torch.randn(max(nums), len(lengths_F) * width, generator=gen)
            if mode is ThresholdMode.MASK:
                for f in range(len(lengths_F)):
                    rows_all[:, f * width + dim:(f + 1) * width] = (torch.rand(max(nums), dim, generator=gen) > 0.4).float()
            kjt = torch.tensor([0] + torch.tensor(sum(lengths_F, [])).cumsum(0).tolist(), dtype=torch.int64)
            w = torch.rand(sum(nums), generator=gen) if weighted else None
            leaf = rows_all.clone().requires_grad_()
            starts = [0] + torch.tensor(nums).cumsum(0).tolist()
            ref = torch.cat([
                threshold_pool_reference(leaf[:nums[f], f * width:(f + 1) * width],
                                         torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist()),
                                         dim=dim, mode=mode, gk=0.7,
                                         per_sample_weights=None if w is None else w[starts[f]:starts[f + 1]],
                                         pooling="mean" if mean else "sum", s_decay=0.1, s_push=0.2)
                for f, lens in enumerate(lengths_F)], dim=1)
            g = torch.randn(ref.shape, generator=gen)
            ref.backward(g)
            out = T.forward(rows_all, kjt, None, w, dim, code, 0.7, mean, len(lengths_F))
            gr, _, _ = T.backward(g, rows_all, kjt, None, w, dim, code, 0.7, mean, 0.1, 0.2, True, False, False, len(lengths_F))
            for got, want in ((out, ref.detach()), (gr, leaf.grad)):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"grouped {mode}: {m}")
                worst = max(worst, (got - want).abs().max().item())
    print("TRITON_OK", worst)
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_interpreted() -> None:
    """Forward + backward of the Triton kernels vs the reference, all modes, single-feature and
    grouped launches (float32, rtol/atol 1e-5: float32 math in both, different summation order)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0 and "TRITON_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]


# ---- the grouped path (all features of a TBE group in one call) --------------------------------


@needs_cpu_kernel
@pytest.mark.parametrize("mode", [m for m in MODES if m is not ThresholdMode.COARSE], ids=lambda m: m.value)
@pytest.mark.parametrize("weights,pooling,dtype", [(False, "sum", torch.float64), (True, "mean", torch.float64),
                                                   (True, "sum", torch.float32)])  # fmt: skip
def test_grouped_cpu_matches_per_feature_reference(mode: ThresholdMode, weights: bool, pooling: str,
                                                   dtype: torch.dtype) -> None:  # fmt: skip
    """`GroupedThresholdPool` on a TBE-shaped [N_max, F·W] buffer (feature f's ids in rows [0, N_f),
    later rows are padding) equals `threshold_pool_reference` per feature on the block
    rows_all[:N_f, f·W:(f+1)·W], forward and backward (padding rows get zero gradient)."""
    dim = 7
    lengths_F = [[2, 0, 3, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [9, 0, 0, 0, 2]]  # F = 4, B = 5
    num_ids_F = [sum(x) for x in lengths_F]
    blocks = [
        make_inputs(dim, lens, mode, dtype, seed=f, weights=weights) for f, lens in enumerate(lengths_F)
    ]
    width = row_width(dim, mode)
    num_max = max(num_ids_F)
    rows_all = torch.randn(num_max, len(lengths_F) * width, dtype=dtype)  # junk in the padding rows
    for f, (rows, _, _, _) in enumerate(blocks):
        rows_all[: num_ids_F[f], f * width : (f + 1) * width] = rows
    kjt_offsets = torch.tensor([0, *torch.tensor(sum(lengths_F, [])).cumsum(0).tolist()], dtype=torch.int64)
    psw = torch.cat([b[3] for b in blocks]) if weights else None
    common = dict(dim=dim, mode=mode, gk=GK, pooling=pooling, s_decay=0.3, s_push=0.1)

    ref_leaf = rows_all.clone().requires_grad_()
    ref = torch.cat(
        [threshold_pool_reference(ref_leaf[: num_ids_F[f], f * width : (f + 1) * width], offsets,
                                  per_sample_weights=b[3], **common)
         for f, (b, offsets) in enumerate((b, b[1]) for b in blocks)], dim=1)  # fmt: skip
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    ref.backward(grad)

    leaf = rows_all.clone().requires_grad_()
    out = library.GroupedThresholdPool.apply(
        leaf, kjt_offsets, psw, len(lengths_F), dim, library.MODE_CODES[mode], GK, pooling == "mean", 0.3, 0.1
    )
    out.backward(grad)
    torch.testing.assert_close(out, ref.detach(), **TOL[dtype])
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, **TOL[dtype])


# ---- the GPU check script, dry-run on CPU ---------------------------------------------------------


@needs_cpu_kernel
def test_gpu_check_script_dry_run_on_cpu(tmp_path: Path) -> None:
    """`benchmarks/gpu_check.sh` only runs for real on a CUDA machine; its CPU dry run
    (PEP_GPU_CHECK_DEVICE=cpu, small sizes, the C++ kernels in place of Triton) runs every section
    here, so the script cannot rot between the rare GPU runs: all correctness cases pass, and the
    grouped timings and the train-step ratio are reported."""
    env = dict(os.environ, OUT=str(tmp_path), PEP_GPU_CHECK_DEVICE="cpu", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=300, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["checks"] and all(c["ok"] for c in report["checks"]), report["checks"]
    assert any(c["case"].startswith("grouped") for c in report["checks"])
    assert {g["mode"] for g in report["groups"]} == {"row_dim", "row"}
    assert report["groups"][0]["compiled_fwd_bwd_ms"] > 0 and report["groups"][0]["reference_fwd_bwd_ms"] > 0
    assert report["train_steps"][0]["pep_feature_dim_over_base"] > 0 and not report["errors"]
