#!/usr/bin/env bash
# GPU check of the Triton threshold_pool kernels: correctness against the pure-PyTorch reference on
# CUDA (single-feature op and the grouped launch the sharded lookup uses), then timings in GB/s
# against the measured copy bandwidth: single-feature cases, and TBE groups at production shapes
# (F = 26 features; B = 65,536 bags of one id, and 16,384 bags of 20 ids; D = 16 / 64 / 128) beside
# `torch.compile` of the same formula on the same rows and a copy of the same bytes; then the
# train-step ratio PEP / base of a torch-only DLRM-style model with 10^6-row tables at batch 65,536
# and 4,096 (`benchmarks/gpu_train_step.py`: the image has no TorchRec).
#
#     PEP_GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_check.sh
#                                   # writes gpu_check.{json,md} (+ gpu_host_profile.txt) to $OUT, else benchmarks/results/
#
# Self-contained on torch + triton (the GPU machine has neither torchrec nor fbgemm): it imports only
# `pep_torchrec.ops` (torch-only) and `benchmarks.kernel` from this checkout, through PYTHONPATH, and
# reports the versions it found. Budget: < 8 minutes (a hard `timeout` of 7.5 min around Python;
# every section writes the results file so far, so a timeout still leaves a partial report).
# TRITON_CACHE_DIR defaults to a fresh directory: every kernel is compiled in this run.
# Exit status: 0 all checks passed, 1 a check failed, 2 no CUDA / no Triton, 124 timeout.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PEP_GPU_CHECK_OUT="$OUT_DIR"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$(mktemp -d)}"
echo "gpu_check: python $PY, output $OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

timeout --signal=INT --kill-after=20 450 "$PY" - <<'PYEOF'
import json, os, platform, statistics, sys, time, traceback
from datetime import datetime, timezone
from pathlib import Path

out_dir = Path(os.environ["PEP_GPU_CHECK_OUT"])
report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
          "commit": os.environ.get("PEP_GIT_COMMIT"),
          "checks": [], "timings": [], "errors": []}
started = time.perf_counter()


def save() -> None:
    report["wall_s"] = round(time.perf_counter() - started, 1)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    lines = ["# GPU check: Triton threshold_pool vs reference", "",
             f"{report['date']}, {report.get('gpu')}, torch {report.get('torch')}, triton {report.get('triton')}, "
             f"python {report['python']}, copy bandwidth {report.get('copy_gbs', float('nan')):.0f} GB/s, "
             f"commit {report['commit']}.", "",
             f"Correctness: {sum(c['ok'] for c in report['checks'])}/{len(report['checks'])} cases pass.", ""]
    bad = [c for c in report["checks"] if not c["ok"]]
    for c in bad[:20]:
        lines.append(f"- FAIL {c['case']}: {c.get('detail')}")
    if report["timings"]:
        lines += ["", "| mode | D | B | P | dtype | ref f+b ms | fused fwd ms | fused f+b ms | speedup | fused f+b GB/s | of copy |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for t in report["timings"]:
            lines.append(f"| {t['mode']} | {t['dim']} | {t['bags']} | {t['pooling']} | {t['dtype']} | "
                         f"{t['reference_fwd_bwd_ms']:.3f} | {t['fused_fwd_ms']:.3f} | {t['fused_fwd_bwd_ms']:.3f} | "
                         f"{t['speedup_fwd_bwd']:.1f} | {t['fused_fwd_bwd_gbs']:.0f} | {t['fused_fwd_bwd_of_copy']:.2f} |")
    if report.get("groups"):
        lines += ["", "TBE groups (`GroupedThresholdPool`, float32, forward + backward; bytes 4·(3·B·P·F·W + 2·B·F·D); "
                  "`compiled`: `torch.compile` of the formula on the same rows; `copy`: `copy_` of the same bytes). "
                  "GPU: device time with the host running ahead (`benchmarks.kernel._gpu_ms`); wall: host clock "
                  "around the calls, Python and launch overhead included. Ratios paired per repeat, medians:", "",
                  "| mode | F | B | P | D | fused GPU ms | GB/s | of copy bw | compiled GPU ms | compiled / fused | "
                  "copy GPU ms | fused wall ms | of copy bw (wall) | compiled wall ms | compiled / fused (wall) | ref wall ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for g in report["groups"]:
            opt = lambda k, f: format(g[k], f) if k in g else ""  # noqa: E731
            lines.append(f"| {g['mode']} | {g['features']} | {g['bags']} | {g['pooling']} | {g['dim']} | "
                         f"{opt('fused_fwd_bwd_gpu_ms', '.3f')} | {opt('fused_fwd_bwd_gpu_gbs', '.0f')} | "
                         f"{opt('fused_of_copy_gpu', '.2f')} | {opt('compiled_fwd_bwd_gpu_ms', '.3f')} | "
                         f"{opt('compiled_over_fused_gpu', '.2f')} | {opt('copy_gpu_ms', '.3f')} | "
                         f"{g['fused_fwd_bwd_ms']:.3f} | {g['fused_of_copy']:.2f} | {opt('compiled_fwd_bwd_ms', '.3f')} | "
                         f"{opt('compiled_over_fused', '.2f')} | {opt('reference_fwd_bwd_ms', '.3f')} |")
    if report.get("train_steps"):
        lines += ["", "Train step (26 tables, one id per table per sample, SparseAdam tables + fused Adam MLPs; "
                  "ratios paired per repeat, medians):", "",
                  "| rows/table | D | batch | base ms | PEP feature ms | / base | PEP feature_dim ms | / base |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in report["train_steps"]:
            lines.append(f"| {t['rows_per_table']} | {t['dim']} | {t['batch']} | {t['base_step_ms']:.2f} | "
                         f"{t['pep_feature_step_ms']:.2f} | {t['pep_feature_over_base']:.3f} | "
                         f"{t['pep_feature_dim_step_ms']:.2f} | {t['pep_feature_dim_over_base']:.3f} |")
    for e in report["errors"]:
        lines += ["", "Error: " + e.splitlines()[-1]]
    lines += ["", f"wall {report['wall_s']} s", ""]
    (out_dir / "gpu_check.md").write_text("\n".join(lines))


try:
    import torch
    report["torch"] = torch.__version__
    try:
        import triton
        report["triton"] = triton.__version__
    except Exception as err:  # noqa: BLE001
        report["errors"].append(f"triton import failed: {err!r}")
    # PEP_GPU_CHECK_DEVICE=cpu: a dry run of this script's logic on the CPU kernels (no GPU here).
    dev = torch.device(os.environ.get("PEP_GPU_CHECK_DEVICE", "cuda"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        report["errors"].append("torch.cuda.is_available() is False")
    report["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    save()
    print(json.dumps({k: report.get(k) for k in ("torch", "triton", "gpu", "python")}), flush=True)
    if report["errors"]:
        sys.exit(2)

    from pep_torchrec.ops import ThresholdMode, row_width, threshold_pool, threshold_pool_reference
    from pep_torchrec.ops import library
    if not library.kernel_available(dev):
        report["errors"].append(f"pep_torchrec: no fused kernel on {dev} (see warnings)")
        save()
        sys.exit(2)
    report["dispatch_default"] = library.default_impl(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    # ---- correctness: Triton (through the registered op) vs the float64 reference ---------------
    # Tolerances: float32 kernels vs a float64 reference: rtol/atol 1e-5 (summation order, expf);
    # bf16/fp16 rows: the same inputs rounded to the half type are given to the reference, the kernel
    # accumulates in float32 and stores row gradients in the half type: rtol/atol 2e-2; float32
    # grad_coarse sums over all N rows (up to 10^4): 1e-4.
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, [2, 0, 3, 1]), (16, [1] * 4096), (17, [0, 4, 0, 2, 5]), (4, [0, 0, 0]), (8, [3000, 1]),
              (64, [20] * 512), (128, [0, 7, 1, 300]), (130, [5, 0, 2, 40]), (300, [3, 1, 0, 9])]
    for mode, code in library.MODE_CODES.items():
        for dim, lengths in shapes:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                if dtype != torch.float32 and dim not in (16, 17, 130):
                    continue
                for weighted, mean, pad in ((False, False, 0), (True, True, 5)):
                    name = f"{mode.value} D={dim} B={len(lengths)} N={sum(lengths)} {str(dtype)[6:]} w={int(weighted)} mean={int(mean)} pad={pad}"
                    try:
                        n, width = sum(lengths), row_width(dim, mode)
                        wide = torch.randn(n, width + pad, generator=gen) * 0.6
                        if mode is ThresholdMode.MASK:
                            wide[:, dim:width] = (torch.rand(n, dim, generator=gen) > 0.4).float()
                        rows_h = wide.to(dtype)  # the half-type values both sides see
                        cs = torch.randn(dim, generator=gen) if mode is ThresholdMode.COARSE else None
                        w = torch.rand(n, generator=gen) + 0.5 if weighted else None
                        off = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int64)
                        grad = torch.randn(len(lengths), dim, generator=gen)
                        kw = dict(dim=dim, mode=mode, gk=0.7, pooling="mean" if mean else "sum", s_decay=0.1, s_push=0.2)

                        def run(fn, device, rdtype):
                            r = rows_h.to(device=device, dtype=rdtype)[:, :width].detach().requires_grad_()
                            acc = torch.float64 if rdtype == torch.float64 else torch.float32
                            c = None if cs is None else cs.to(device=device, dtype=acc).requires_grad_()
                            ww = None if w is None else w.to(device=device, dtype=acc).requires_grad_()
                            o = fn(r, off.to(device), coarse_s=c, per_sample_weights=ww, **kw)
                            if o.numel():
                                o.backward(grad.to(device=device, dtype=o.dtype))
                            gs = [None if x is None or x.grad is None else x.grad.double().cpu() for x in (r, c, ww)]
                            return [o.detach().double().cpu(), *gs]

                        want = run(threshold_pool_reference, torch.device("cpu"), torch.float64)
                        os.environ["PEP_TORCHREC_OPS"] = "fused"
                        got = run(threshold_pool, dev, dtype)
                        sync()
                        worst = 0.0
                        for label, g, r_ in zip(("out", "grad_rows", "grad_coarse", "grad_w"), got, want):
                            # grad_coarse sums over all N rows in float32 (1e4 here): 1e-4.
                            tol = 2e-2 if dtype != torch.float32 else (1e-4 if label == "grad_coarse" else 1e-5)
                            if r_ is None and g is None:
                                continue
                            g = torch.zeros_like(r_) if g is None else g
                            r_ = torch.zeros_like(g) if r_ is None else r_
                            if g.numel():
                                worst = max(worst, (g - r_).abs().max().item())
                            torch.testing.assert_close(g, r_, rtol=tol, atol=tol, msg=lambda m: f"{label}: {m}")
                        report["checks"].append({"case": name, "ok": True, "max_abs_err": worst})
                    except Exception as err:  # noqa: BLE001
                        report["checks"].append({"case": name, "ok": False, "detail": str(err)[-800:]})
    # ---- the grouped launch (grid B x F) the sharded lookup uses, vs the reference per feature -----
    for mode, code in library.MODE_CODES.items():
        if mode is ThresholdMode.COARSE:
            continue  # per-table [D] parameters: never grouped
        for dtype in (torch.float32, torch.bfloat16) if dev.type == "cuda" else (torch.float32,):
            for weighted, mean in ((False, False), (True, True)):
                name = f"grouped {mode.value} {str(dtype)[6:]} w={int(weighted)} mean={int(mean)}"
                try:
                    dim, lengths_F = 16, [[1] * 300, [0] * 300, [2, 0, 5] * 100, [1, 3] * 150]
                    nums = [sum(x) for x in lengths_F]
                    width = row_width(dim, mode)
                    rows_all = (torch.randn(max(nums), len(lengths_F) * width, generator=gen) * 0.6).to(dtype)
                    if mode is ThresholdMode.MASK:
                        for f in range(len(lengths_F)):
                            rows_all[:, f * width + dim:(f + 1) * width] = (torch.rand(max(nums), dim, generator=gen) > 0.4).to(dtype)
                    kjt = torch.tensor([0] + torch.tensor(sum(lengths_F, [])).cumsum(0).tolist(), dtype=torch.int64)
                    w = torch.rand(sum(nums), generator=gen) + 0.5 if weighted else None
                    starts = [0] + torch.tensor(nums).cumsum(0).tolist()
                    leaf = rows_all.double().requires_grad_()
                    ref = torch.cat([threshold_pool_reference(
                        leaf[:nums[f], f * width:(f + 1) * width],
                        torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist()), dim=dim, mode=mode, gk=0.7,
                        per_sample_weights=None if w is None else w[starts[f]:starts[f + 1]].double(),
                        pooling="mean" if mean else "sum", s_decay=0.1, s_push=0.2) for f, lens in enumerate(lengths_F)], dim=1)
                    grad = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
                    ref.backward(grad)
                    dleaf = rows_all.to(dev).requires_grad_()
                    out = library.GroupedThresholdPool.apply(dleaf, kjt.to(dev), None if w is None else w.to(dev),
                                                             len(lengths_F), dim, code, 0.7, mean, 0.1, 0.2)
                    out.backward(grad.to(device=dev, dtype=out.dtype))
                    sync()
                    tol = 1e-5 if dtype == torch.float32 else 2e-2
                    torch.testing.assert_close(out.double().cpu(), ref.detach(), rtol=tol, atol=tol, msg=lambda m: f"out: {m}")
                    torch.testing.assert_close(dleaf.grad.double().cpu(), leaf.grad, rtol=tol, atol=tol, msg=lambda m: f"grad: {m}")
                    report["checks"].append({"case": name, "ok": True,
                                             "max_abs_err": (out.double().cpu() - ref.detach()).abs().max().item()})
                except Exception as err:  # noqa: BLE001
                    report["checks"].append({"case": name, "ok": False, "detail": repr(err)[-800:]})
    save()
    n_ok = sum(c["ok"] for c in report["checks"])
    print(f"correctness: {n_ok}/{len(report['checks'])} pass ({time.perf_counter() - started:.0f}s)", flush=True)

    # ---- timings -----------------------------------------------------------------------------
    from benchmarks.kernel import copy_bandwidth_gbs, make_case, time_case, time_group
    big = dev.type == "cuda"
    report["copy_gbs"] = copy_bandwidth_gbs(dev, mib=1024 if big else 64)
    save()
    for mode, dim, bags, pooling, weights in [
        (ThresholdMode.ROW_DIM, 16, 65536, 1, False), (ThresholdMode.ROW, 16, 65536, 1, False),
        (ThresholdMode.ROW_DIM, 16, 16384, 20, False), (ThresholdMode.COARSE, 64, 16384, 20, False),
        (ThresholdMode.MASK, 64, 16384, 20, False), (ThresholdMode.ROW_DIM, 128, 8192, 50, True),
    ][: None if big else 2]:
        bags = bags if big else bags // 16
        if time.perf_counter() - started > 200:
            report["errors"].append("single-feature timings cut short to stay within the time budget")
            break
        try:
            case = make_case(mode, dim, bags, pooling, dev, weights)
            res = time_case(case, dev, repeats=7 if big else 3, inner=10 if big else 2)
            row = {"mode": mode.value, "dim": dim, "bags": bags, "pooling": pooling, "weights": weights,
                   "dtype": "float32", **res}
            for impl in ("reference", "fused"):
                row[f"{impl}_fwd_bwd_of_copy"] = res[f"{impl}_fwd_bwd_gbs"] / report["copy_gbs"]
            report["timings"].append(row)
            print(f"{mode.value} D={dim} B={bags} P={pooling}: fused f+b {res['fused_fwd_bwd_ms']:.3f} ms "
                  f"({res['fused_fwd_bwd_gbs']:.0f} GB/s), ref {res['reference_fwd_bwd_ms']:.3f} ms", flush=True)
        except Exception:  # noqa: BLE001
            report["errors"].append(traceback.format_exc()[-2000:])
        save()

    # ---- TBE groups at production shapes, beside torch.compile and a copy of the same bytes -----
    report["groups"] = []
    groups = [  # (mode, D, B, P, reference): F = 26 always
        (ThresholdMode.ROW_DIM, 16, 4096, 1, True), (ThresholdMode.ROW, 16, 4096, 1, True),
        (ThresholdMode.ROW_DIM, 16, 65536, 1, False), (ThresholdMode.ROW, 16, 65536, 1, False),
        (ThresholdMode.ROW_DIM, 64, 65536, 1, False), (ThresholdMode.ROW, 64, 65536, 1, False),
        (ThresholdMode.ROW_DIM, 128, 65536, 1, False),
        (ThresholdMode.ROW_DIM, 16, 16384, 20, False), (ThresholdMode.ROW_DIM, 64, 16384, 20, False),
        (ThresholdMode.ROW_DIM, 128, 16384, 20, False),
    ]
    for i, (mode, dim, bags, pooling, reference) in enumerate(groups if big else groups[:2]):
        if time.perf_counter() - started > 330:
            report["errors"].append("grouped timings cut short to stay within the time budget")
            break
        try:
            # The CPU dry run compiles the baseline once (Inductor's C++ build is slow on 2 cores).
            g = time_group(mode, dim, 26, bags if big else 64, 7 if big else 2, 10 if big else 1, dev,
                           pooling=pooling, compiled=big or i == 0, reference=reference)
            g["fused_of_copy"] = g["fused_fwd_bwd_gbs"] / report["copy_gbs"]
            if "fused_fwd_bwd_gpu_gbs" in g:
                g["fused_of_copy_gpu"] = g["fused_fwd_bwd_gpu_gbs"] / report["copy_gbs"]
            report["groups"].append(g)
            print(f"group {mode.value} D={dim} B={g['bags']} P={pooling}: fused wall {g['fused_fwd_bwd_ms']:.3f} ms "
                  f"GPU {g.get('fused_fwd_bwd_gpu_ms', float('nan')):.3f} ms "
                  f"({g.get('fused_of_copy_gpu', float('nan')):.2f} of copy bw), compiled GPU "
                  f"{g.get('compiled_fwd_bwd_gpu_ms', float('nan')):.3f} ms, copy GPU {g.get('copy_gpu_ms', float('nan')):.3f} ms",
                  flush=True)
        except Exception:  # noqa: BLE001
            report["errors"].append(traceback.format_exc()[-2000:])
        if big:
            torch.cuda.empty_cache()
        save()

    # ---- where the host time of one grouped forward + backward goes (cProfile, B = 4096) ----------
    try:
        import cProfile, io, pstats
        width = row_width(16, ThresholdMode.ROW_DIM)
        rows_p = torch.randn(4096, 26 * width, device=dev).requires_grad_()
        offsets_p = torch.arange(26 * 4096 + 1, device=dev)
        grad_p = torch.randn(4096, 26 * 16, device=dev)

        def grouped_step():
            library.GroupedThresholdPool.apply(rows_p, offsets_p, None, 26, 16, 0, 1.0, False, 1e-5, 0.0).backward(grad_p)
            rows_p.grad = None

        for _ in range(5):
            grouped_step()
        sync()
        profiler = cProfile.Profile()
        t0 = time.perf_counter()
        profiler.enable()
        for _ in range(200):
            grouped_step()
        profiler.disable()
        sync()
        report["host_us_per_grouped_fwd_bwd"] = (time.perf_counter() - t0) / 200 * 1e6
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        (out_dir / "gpu_host_profile.txt").write_text(text.getvalue())
        print(f"host time per grouped fwd+bwd (profiled): {report['host_us_per_grouped_fwd_bwd']:.0f} us", flush=True)
    except Exception:  # noqa: BLE001
        report["errors"].append(traceback.format_exc()[-2000:])
    save()

    # ---- the train-step ratio (fused Adam), 10^6-row tables, two batch sizes ---------------------
    from benchmarks.gpu_train_step import time_models
    report["train_steps"] = []
    for dim, batch in ((16, 65536), (64, 65536), (16, 4096), (64, 4096)) if big else ((16, 512),):
        if time.perf_counter() - started > 400:
            report["errors"].append("train-step ratios cut short to stay within the time budget")
            break
        try:
            t = time_models(dev, rows=1_000_000 if big else 1000, dim=dim, batch=batch, repeats=7 if big else 2,
                            steps=10 if big else 2)
            report["train_steps"].append(t)
            print("train step:", json.dumps(t), flush=True)
        except Exception:  # noqa: BLE001
            report["errors"].append(traceback.format_exc()[-2000:])
        if big:
            torch.cuda.empty_cache()
        save()
except SystemExit:
    raise
except BaseException:  # noqa: BLE001  (KeyboardInterrupt from timeout --signal=INT included)
    report["errors"].append(traceback.format_exc()[-3000:])
    save()
    raise
save()
print((out_dir / "gpu_check.md").read_text())
sys.exit(0 if report["checks"] and all(c["ok"] for c in report["checks"]) else 1)
PYEOF
status=$?
echo "gpu_check: exit $status; results in $OUT_DIR/gpu_check.{json,md}"
exit $status
