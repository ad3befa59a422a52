"""The `threshold_pool` op alone: fused kernel vs the pure-PyTorch reference, forward and
forward+backward, in ms and in GB/s against the machine's measured copy bandwidth.

    OMP_NUM_THREADS=1 python -m benchmarks.kernel [--quick] [--device cpu|cuda] [--name kernel]

Legend: N = gathered rows, B = bags, D = embedding dim, W = stored row width.

Per case (mode, D, B, pooling factor P = ids per bag, N = B·P) the implementations run
interleaved (the order rotates every repeat: this is a shared machine), and a time is the median
over repeats. Bytes counted are the compulsory traffic of a fused kernel:
    forward   read rows N·W + offsets + weights, write pooled B·D
    backward  read grad B·D + rows N·W (+ weights), write grad rows N·W (+ grad weights)
so GB/s = those bytes / time, and `of_copy` = GB/s / the bandwidth of `dst.copy_(src)` between two
preallocated 256 MiB buffers (read + write counted, DRAM-bound), measured in the same process. The
train shape (B 4096 × D 16) fits in cache, so there `of_copy` can pass 1.

`fused` is what `threshold_pool` runs in eager mode: the op's kernels for the device (C++ on CPU,
Triton on CUDA) behind a plain autograd.Function (`library.threshold_pool_fused`); `op` is the same
kernels through the registered `pep_torchrec::threshold_pool` (the dispatcher path torch.compile
traces), so `op − fused` is custom_op's Python dispatch cost; `reference` is
`threshold_pool_reference`. Autograd overhead is included in all three.
Writes benchmarks/results/<name>.{json,md} (machine, versions, date, config).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from pep_torchrec.ops import (
    ThresholdMode,
    library,
    row_width,
    threshold_pool_reference,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth_gbs(device: torch.device, mib: int = 256, repeats: int = 7) -> float:
    """GB/s of `dst.copy_(src)` between two preallocated `mib` MiB float32 buffers (bytes read +
    written), median of repeats. (Not `clone()`: that also pays the allocation's page faults, which
    made the CPU figure 4x too low.)"""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src).zero_()  # touched: no page faults inside the timing
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def make_case(mode: ThresholdMode, dim: int, num_bags: int, pooling: int, device: torch.device,
              weights: bool = False, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    num_rows = num_bags * pooling
    width = row_width(dim, mode)
    rows = torch.randn(num_rows, width, generator=gen) * 0.5
    if mode is ThresholdMode.MASK:
        rows[:, dim:] = (torch.rand(num_rows, dim, generator=gen) > 0.5).float()
    coarse_s = torch.randn(dim, generator=gen) if mode is ThresholdMode.COARSE else None
    offsets = torch.arange(0, num_rows + 1, pooling, dtype=torch.int64)
    psw = torch.rand(num_rows, generator=gen) if weights else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return {"rows": to(rows), "offsets": to(offsets), "coarse_s": to(coarse_s), "psw": to(psw),
            "dim": dim, "mode": mode}  # fmt: skip


def _bytes(case: dict[str, Any], backward: bool) -> int:
    n, w = case["rows"].shape
    b = case["offsets"].numel() - 1
    d = case["dim"]
    psw = case["psw"] is not None
    fwd = 4 * (n * w + b * d + (n if psw else 0)) + 8 * (b + 1)
    bwd = 4 * (b * d + 2 * n * w + (2 * n if psw else 0)) + 8 * (b + 1)
    return fwd + (bwd if backward else 0)


def _runner(impl: str, case: dict[str, Any], backward: bool) -> Callable[[], None]:
    mode = case["mode"]
    rows = case["rows"].detach().requires_grad_(backward)
    coarse = case["coarse_s"]
    coarse = None if coarse is None else coarse.detach().requires_grad_(backward)

    def call() -> torch.Tensor:
        if impl == "reference":
            return threshold_pool_reference(
                rows, case["offsets"], dim=case["dim"], mode=mode, gk=1.0, coarse_s=coarse,
                per_sample_weights=case["psw"], s_decay=1e-5, s_push=0.0,
            )  # fmt: skip
        entry = library.threshold_pool_op if impl == "op" else library.threshold_pool_fused
        return entry(
            rows, case["offsets"], coarse, case["psw"], case["dim"], library.MODE_CODES[mode], 1.0,
            False, 1e-5, 0.0,
        )  # fmt: skip

    if not backward:

        def fwd() -> None:
            with torch.no_grad():
                call()

        return fwd

    def fwd_bwd() -> None:
        out = call()
        out.backward(torch.ones_like(out))
        rows.grad = None
        if coarse is not None:
            coarse.grad = None

    return fwd_bwd


IMPLS = ("reference", "fused", "op")


def time_case(case: dict[str, Any], device: torch.device, repeats: int, inner: int) -> dict[str, Any]:
    """Median ms per call of reference / fused / op, forward and forward+backward, interleaved."""
    result: dict[str, Any] = {}
    for backward in (False, True):
        fns = {impl: _runner(impl, case, backward) for impl in IMPLS}
        for fn in fns.values():  # warm-up (JIT / first-call costs)
            fn()
        samples: dict[str, list[float]] = {impl: [] for impl in fns}
        for r in range(repeats):
            order = list(fns)[r % len(fns) :] + list(fns)[: r % len(fns)]
            for impl in order:
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(inner):
                    fns[impl]()
                _sync(device)
                samples[impl].append((time.perf_counter() - t0) / inner * 1e3)
        key = "fwd_bwd" if backward else "fwd"
        for impl, ts in samples.items():
            ms = statistics.median(ts)
            result[f"{impl}_{key}_ms"] = ms
            result[f"{impl}_{key}_gbs"] = _bytes(case, backward) / (ms * 1e-3) / 1e9
        result[f"speedup_{key}"] = result[f"reference_{key}_ms"] / result[f"fused_{key}_ms"]
        result[f"op_speedup_{key}"] = result[f"reference_{key}_ms"] / result[f"op_{key}_ms"]
    return result


def threshold_formula(rows_all: torch.Tensor, num_bags: int, pooling: int, num_features: int, dim: int,
                      mode: ThresholdMode) -> torch.Tensor:  # fmt: skip
    """The element-wise PEP formula on a TBE group's rows [B·P, F·W] (P ids per bag, fixed), summed
    over each bag: [B, F·D]. The `torch.compile` baseline of `time_group` (backward by autograd, no
    pressure term): what a hand-written kernel must beat."""
    x = rows_all.view(num_bags, pooling, num_features, -1)
    v = x[..., :dim]
    s = x[..., dim : 2 * dim] if mode is ThresholdMode.ROW_DIM else x[..., dim : dim + 1]
    vhat = torch.sign(v) * torch.relu(v.abs() - torch.sigmoid(s))
    return vhat.sum(1).reshape(num_bags, num_features * dim)


def time_group(
    mode: ThresholdMode, dim: int, num_features: int, num_bags: int, repeats: int, inner: int,
    device: torch.device | None = None, pooling: int = 1, compiled: bool = False, reference: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """A sharded TBE group as the lookup sees it: F features × B bags of P ids each in one
    [B·P, F·W] float32 buffer; forward + backward (the gradient precomputed) of
    - `fused`: `GroupedThresholdPool` (one call each way: C++ on CPU, Triton on CUDA);
    - `reference` (optional): F `threshold_pool_reference` calls on the column blocks;
    - `compiled` (optional, ROW_DIM / ROW): `torch.compile` of `threshold_formula` on the same rows;
    and `copy`: `dst.copy_(src)` moving the same bytes (half read, half written).
    Bytes counted (float32): rows read twice (forward, backward) and their gradient written, the
    pooled output written and its gradient read: 4·(3·B·P·F·W + 2·B·F·D). Interleaved repeats of
    `inner` calls, medians; `device` defaults to CPU."""
    device = device or torch.device("cpu")
    width = row_width(dim, mode)
    num_rows = num_bags * pooling
    rows_all = (torch.randn(num_rows, num_features * width, device=device) * 0.5).requires_grad_()
    offsets = torch.arange(0, num_features * num_rows + 1, pooling, dtype=torch.int64, device=device)
    bag_offsets = torch.arange(0, num_rows + 1, pooling, dtype=torch.int64, device=device)
    grad = torch.randn(num_bags, num_features * dim, device=device)
    code = library.MODE_CODES[mode]
    nbytes = 4 * (3 * num_rows * num_features * width + 2 * num_bags * num_features * dim)

    def fwd_bwd(forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def call() -> None:
            forward().backward(grad)
            rows_all.grad = None

        return call

    fns = {"fused": fwd_bwd(lambda: library.GroupedThresholdPool.apply(
        rows_all, offsets, None, num_features, dim, code, 1.0, False, 1e-5, 0.0))}  # fmt: skip
    if reference:
        fns["reference"] = fwd_bwd(lambda: torch.cat([
            threshold_pool_reference(rows_all[:, f * width : (f + 1) * width], bag_offsets, dim=dim, mode=mode,
                                     s_decay=1e-5) for f in range(num_features)], dim=1))  # fmt: skip
    if compiled:
        torch._dynamo.reset()  # each shape compiles afresh (no recompile limit reached, no eager fallback)
        formula = torch.compile(threshold_formula, dynamic=False)
        fns["compiled"] = fwd_bwd(lambda: formula(rows_all, num_bags, pooling, num_features, dim, mode))
    src = torch.empty(nbytes // 8, dtype=torch.float32, device=device).uniform_()
    dst = torch.zeros_like(src)
    fns["copy"] = lambda: dst.copy_(src)
    for fn in fns.values():  # warm-up: Triton / Inductor compilation, allocator
        fn()
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    gpu_samples: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for impl in names[r % len(names) :] + names[: r % len(names)]:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                fns[impl]()
            _sync(device)
            samples[impl].append((time.perf_counter() - t0) / inner * 1e3)
            if device.type == "cuda":
                gpu_samples[impl].append(_gpu_ms(fns[impl], inner, host_ms=samples[impl][-1] * inner))
    result: dict[str, Any] = {
        "mode": mode.value, "dim": dim, "features": num_features, "bags": num_bags, "pooling": pooling,
        "bytes": nbytes,
    }  # fmt: skip
    # wall: host clock around `inner` calls (Python and launch overhead included: at small sizes the
    # host is the bottleneck); gpu (CUDA only): device time of the same calls, the host running ahead.
    for clock, table in (("", samples), ("gpu_", gpu_samples)):
        if not table["fused"]:
            continue
        ms = {impl: statistics.median(ts) for impl, ts in table.items()}
        result[f"fused_fwd_bwd_{clock}ms"] = ms["fused"]
        result[f"copy_{clock}ms"] = ms["copy"]
        result[f"fused_fwd_bwd_{clock}gbs"] = nbytes / (ms["fused"] * 1e-3) / 1e9
        for impl in ("reference", "compiled"):  # paired per repeat: impl / fused, median
            if impl in ms:
                result[f"{impl}_fwd_bwd_{clock}ms"] = ms[impl]
                result[f"{impl}_over_fused{'_' + clock[:-1] if clock else ''}"] = statistics.median(
                    a / f for a, f in zip(table[impl], table["fused"]))  # fmt: skip
    if "reference_over_fused" in result:
        result["speedup_fwd_bwd"] = result["reference_over_fused"]
    return result


def _gpu_ms(fn: Callable[[], Any], inner: int, host_ms: float) -> float:
    """Device time per call of `fn` (CUDA): a device-side sleep of 1.5x the host time of `inner`
    calls (`host_ms`, ≥ 10 ms) is queued first, so the host has enqueued all the calls before the
    device reaches them and the events time the device's work alone, as in a training loop whose
    host runs ahead."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e6 * max(10.0, 1.5 * host_ms)))  # cycles: ~2e6 per ms at the H200's 2 GHz
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / inner


def cases(quick: bool) -> list[tuple[ThresholdMode, int, int, int, bool]]:
    """(mode, D, B, pooling, weights): the train benchmark's shape (B 4096, 1 id / bag, D 16)
    first, then larger pooling factors and dims."""
    out = [(m, 16, 4096, 1, False) for m in ThresholdMode]
    out += [(ThresholdMode.ROW_DIM, 16, 4096, 20, False), (ThresholdMode.ROW, 16, 4096, 20, False),
            (ThresholdMode.ROW_DIM, 64, 4096, 20, True)]  # fmt: skip
    if not quick:
        out += [(ThresholdMode.ROW_DIM, 128, 2048, 50, False), (ThresholdMode.COARSE, 64, 4096, 20, False)]
    return out


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--name", default="kernel")
    return parser.parse_args(argv)


def _time_cases(
    quick: bool, device: torch.device, repeats: int, inner: int, copy_gbs: float
) -> list[dict[str, Any]]:
    """One row per single-feature case (`cases`), printed as it is timed."""
    rows: list[dict[str, Any]] = []
    for mode, dim, num_bags, pooling, weights in cases(quick):
        case = make_case(mode, dim, num_bags, pooling, device, weights)
        res = time_case(case, device, repeats, inner)
        row = {
            "mode": mode.value,
            "dim": dim,
            "bags": num_bags,
            "pooling": pooling,
            "weights": weights,
            **res,
        }
        for impl in ("reference", "fused"):
            row[f"{impl}_fwd_bwd_of_copy"] = res[f"{impl}_fwd_bwd_gbs"] / copy_gbs
        rows.append(row)
        print(f"{mode.value:8s} D={dim:<3d} B={num_bags} P={pooling:<3d} w={int(weights)}: "
              f"fwd ref {res['reference_fwd_ms']:.3f} fused {res['fused_fwd_ms']:.3f} ms | fwd+bwd ref "
              f"{res['reference_fwd_bwd_ms']:.3f} fused {res['fused_fwd_bwd_ms']:.3f} ms "
              f"(x{res['speedup_fwd_bwd']:.2f}, fused {res['fused_fwd_bwd_gbs']:.1f} GB/s)", flush=True)  # fmt: skip
    return rows


def _time_groups(device: torch.device, repeats: int, inner: int, copy_gbs: float) -> list[dict[str, Any]]:
    """The training path's TBE group (F = 26, B = 4096, D = 16) where the device has a grouped kernel."""
    groups: list[dict[str, Any]] = []
    for mode in (ThresholdMode.ROW_DIM, ThresholdMode.ROW):
        if library.group_kernel_available(device, torch.float32, 16, library.MODE_CODES[mode]):
            g = time_group(mode, 16, 26, 4096, repeats, inner, device)
            g["fused_fwd_bwd_of_copy"] = g["fused_fwd_bwd_gbs"] / copy_gbs
            groups.append(g)
            print(f"group {mode.value} F=26 B=4096 D=16: fwd+bwd ref {g['reference_fwd_bwd_ms']:.2f} ms, grouped "
                  f"{g['fused_fwd_bwd_ms']:.2f} ms (x{g['speedup_fwd_bwd']:.2f})", flush=True)  # fmt: skip
    return groups


def _headline(
    rows: list[dict[str, Any]], groups: list[dict[str, Any]], copy_gbs: float, device: torch.device
) -> dict[str, Any]:
    speedups = [r["speedup_fwd_bwd"] for r in rows]
    # The threshold modes (NONE is plain pooling: it has nothing to fuse but the pooling itself).
    thresholded = [r["speedup_fwd_bwd"] for r in rows if r["mode"] != ThresholdMode.NONE.value]
    headline = {
        "copy_gbs": copy_gbs,
        "fwd_bwd_speedup_median": statistics.median(speedups),
        "fwd_bwd_speedup_min": min(speedups),
        "fwd_bwd_speedup_min_threshold_modes": min(thresholded),
        "op_fwd_bwd_speedup_median": statistics.median(r["op_speedup_fwd_bwd"] for r in rows),
        "kernel_available": library.kernel_available(device),
        "dispatch_default": library.default_impl(device),
    }
    if groups:
        headline["group_fwd_bwd_speedup_min"] = min(g["speedup_fwd_bwd"] for g in groups)
    return headline


def _markdown(
    info: dict[str, Any], device: torch.device, copy_gbs: float, repeats: int, inner: int,
    rows: list[dict[str, Any]], groups: list[dict[str, Any]], headline: dict[str, Any],
) -> str:  # fmt: skip
    from benchmarks.common import markdown_table

    return "\n".join([
        "# threshold_pool kernel: fused vs reference", "",
        f"{info['date']}, {info['host_cpu']} ({info['cpu_count']} cores, shared), {device}, torch "
        f"{info['versions']['torch']}, threads {info['torch_threads']}, `{info['command']}`.", "",
        f"Copy bandwidth (`copy_` between preallocated 256 MiB buffers, read+write): {copy_gbs:.1f} GB/s. "
        f"Times are medians of {repeats} interleaved repeats of {inner} calls. `fused`: what "
        "`threshold_pool` runs in eager mode; `op`: the same kernels through the registered op "
        "(custom_op dispatch).", "",
        markdown_table(rows, [
            ("mode", "mode", ""), ("dim", "D", "d"), ("bags", "B", "d"), ("pooling", "P", "d"),
            ("weights", "psw", ""), ("reference_fwd_ms", "ref fwd ms", ".3f"), ("fused_fwd_ms", "fused fwd ms", ".3f"),
            ("reference_fwd_bwd_ms", "ref f+b ms", ".3f"), ("fused_fwd_bwd_ms", "fused f+b ms", ".3f"),
            ("speedup_fwd_bwd", "f+b speedup", ".2f"), ("op_fwd_bwd_ms", "op f+b ms", ".3f"),
            ("op_speedup_fwd_bwd", "op speedup", ".2f"), ("fused_fwd_bwd_gbs", "fused f+b GB/s", ".1f"),
            ("fused_fwd_bwd_of_copy", "of copy", ".2f"), ("reference_fwd_bwd_of_copy", "ref of copy", ".2f"),
        ]), "",
        "## A sharded TBE group in one call (`GroupedThresholdPool` vs the per-feature reference)", "",
        markdown_table(groups, [
            ("mode", "mode", ""), ("dim", "D", "d"), ("features", "F", "d"), ("bags", "B", "d"),
            ("reference_fwd_bwd_ms", "ref f+b ms", ".2f"), ("fused_fwd_bwd_ms", "grouped f+b ms", ".2f"),
            ("speedup_fwd_bwd", "speedup", ".2f"), ("fused_fwd_bwd_gbs", "GB/s", ".1f"),
            ("fused_fwd_bwd_of_copy", "of copy", ".2f"),
        ]) if groups else "(no grouped path on this device)", "",
        "Headline: " + ", ".join(f"{k} = {v:.3f}" if isinstance(v, float) else f"{k} = {v}" for k, v in headline.items()),
        "",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import machine_info, write_results

    args = _parse_args(argv)
    device = torch.device(args.device)
    repeats, inner = (5, 3) if args.quick else (9, 5)
    if not library.kernel_available(device):
        print(f"note: no fused kernel on {device}: 'fused' runs the reference")
    copy_gbs = copy_bandwidth_gbs(device)
    rows = _time_cases(args.quick, device, repeats, inner, copy_gbs)
    groups = _time_groups(device, repeats, inner, copy_gbs)
    headline = _headline(rows, groups, copy_gbs, device)
    info = machine_info()
    payload = {"machine": info, "config": {"device": str(device), "repeats": repeats, "inner": inner,
               "quick": args.quick}, "headline": headline, "cases": rows, "groups": groups}  # fmt: skip
    md = _markdown(info, device, copy_gbs, repeats, inner, rows, groups, headline)
    write_results(args.name, payload, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
