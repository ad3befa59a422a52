"""Serving benchmarks: artifact size, compact pooled lookup throughput, service QPS / latency.

    .venv/bin/python -m benchmarks.serving --run-dir runs/ml_search [--retrain-runs R1,R2] [--quick]

1. Artifact bytes vs dense fp32 for every mask of a search run (RUN/masks/budget_*) and every given
   retrain run × fp32/fp16/int8:
   `total_bytes` (the embedding tables) / `dense_fp32_bytes`, and `artifact_bytes` (every file).
2. Pooled lookup throughput (1 thread): `CompactEmbeddingBag` (fused kernel, and its torch path) vs a
   dense `nn.EmbeddingBag` over the same ids, D = 16/32/64, 5% of the elements kept uniformly at
   random, a table of R rows; interleaved repeats, hot (repeated) and fresh ids.
   Then the predictor's in-process cost per request (feature mapping, whole predict).
3. Service over loopback (127.0.0.1 only): uvicorn in a subprocess, a bounded closed-loop load
   generator (C clients, each sending its next request when the last one answered, for S seconds),
   compact vs dense artifact of the same model; QPS and p50/p99 latency.

Results: benchmarks/results/serving.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import REPO, machine_info, markdown_table, write_results
from pep_torchrec.serving.local import free_port, wait_ready


def artifact_sizes(run_dir: Path, out: Path, retrain_runs: list[Path] = ()) -> list[dict]:
    """Every budget of a search run (the snapshot thresholded: at most the budget stays) and every
    given retrain run (v · m: exactly its mask's count), × fp32/fp16/int8."""
    from pep_torchrec.export.converter import ArtifactConverter
    from pep_torchrec.training.run_dir import RunDir, mask_budget, read_meta

    sources = [
        (f"search {mask.name}", mask_budget(mask), ArtifactConverter(run_dir, budget=mask_budget(mask)))
        for mask in sorted(RunDir(run_dir).mask_dirs(), key=lambda p: p.name)
    ]
    for run in retrain_runs:
        converter = ArtifactConverter(run)
        sources.append((f"retrain {run.name}", float(read_meta(converter.cfg.pep.mask)["budget"]), converter))
    rows = []
    for i, (source, budget, converter) in enumerate(sources):
        for dtype in ("fp32", "fp16", "int8"):
            m = converter.convert(out / f"sizes_{i}_{dtype}", dtype=dtype)
            rows.append(
                {
                    "source": source,
                    "budget": budget,
                    "dtype": dtype,
                    "kept_params": m["kept_params"],
                    "kept_pct": 100 * m["kept_share"],
                    "total_bytes": m["total_bytes"],
                    "dense_fp32_bytes": m["dense_fp32_bytes"],
                    "ratio_pct": 100 * m["total_bytes"] / m["dense_fp32_bytes"],
                    "artifact_bytes": m["artifact_bytes"],
                    "checkpoint_step": m["source"]["step"],
                }
            )
    return rows


def lookup_throughput(
    num_rows: int, dims: list[int], keep: float, bags: int, ids_per_bag: int, repeats: int
) -> list[dict]:
    """Per D: dense nn.EmbeddingBag vs CompactEmbeddingBag (fused kernel, and its torch path) on the
    same ids, timed interleaved (dense, fused, torch, dense, ...) so machine noise hits all alike.
    `hot`: one id batch repeated (its rows stay cached); `fresh`: a new random batch every repeat.
    Reported: the minimum and the median over repeats; speed-up = dense time / fused time."""
    from pep_torchrec.export.compact import CompactEmbeddingBag, load_kernel
    from pep_torchrec.export.format import compress_table

    torch.set_num_threads(1)
    fused_available = load_kernel() is not None
    gen = torch.Generator().manual_seed(0)
    rows = []
    for dim in dims:
        table = torch.randn(num_rows, dim, generator=gen)
        table *= torch.rand(num_rows, dim, generator=gen) < keep
        compact = CompactEmbeddingBag(compress_table(table, "fp32"))
        dense = torch.nn.EmbeddingBag(num_rows, dim, mode="sum", include_last_offset=True)
        with torch.no_grad():
            dense.weight.copy_(table)
        n = bags * ids_per_bag
        offsets = torch.arange(0, n + 1, ids_per_bag)
        fns = {"dense": dense, "fused": compact, "torch": compact.forward_reference}
        with torch.no_grad():
            check = torch.randint(0, num_rows, (n,), generator=gen)
            assert torch.equal(compact(check, offsets), compact.forward_reference(check, offsets))
            torch.testing.assert_close(compact(check, offsets), dense(check, offsets), rtol=1e-5, atol=1e-5)
            for mode in ("hot", "fresh"):
                hot_ids = torch.randint(0, num_rows, (n,), generator=gen)
                times: dict[str, list[float]] = {name: [] for name in fns}
                for _ in range(repeats):
                    ids = hot_ids if mode == "hot" else torch.randint(0, num_rows, (n,), generator=gen)
                    for name, fn in fns.items():
                        start = time.perf_counter()
                        fn(ids, offsets)
                        times[name].append(time.perf_counter() - start)
                result = {
                    "dim": dim,
                    "rows": num_rows,
                    "keep": keep,
                    "ids": n,
                    "ids_mode": mode,
                    "fused_kernel": fused_available,
                }
                for name, t in times.items():
                    result[f"{name}_ms_min"] = 1e3 * float(np.min(t))
                    result[f"{name}_ms"] = 1e3 * float(np.median(t))
                result["speedup_min"] = result["dense_ms_min"] / result["fused_ms_min"]
                result["speedup"] = result["dense_ms"] / result["fused_ms"]
                result["torch_path_speedup"] = result["dense_ms"] / result["torch_ms"]
                result["compact_mb"] = compact.nbytes / 1e6
                result["dense_mb"] = dense.weight.nbytes / 1e6
                rows.append(result)
    return rows


def predictor_cost(artifact: Path, instance: dict, repeats: int) -> dict:
    """In-process cost of one request's parts (1 thread): feature mapping, the whole predict."""
    from pep_torchrec.serving.predictor import Predictor

    torch.set_num_threads(1)
    predictor = Predictor.from_path(artifact)
    out = {}
    for batch in (1, 64):
        instances = [instance] * batch
        for _ in range(5):
            predictor.predict(instances)
        for name, fn in (("features", predictor.features), ("predict", predictor.predict)):
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn(instances)
                times.append(time.perf_counter() - start)
            out[f"{name}_us_b{batch}"] = 1e6 * float(np.median(times))
    return out


def service_load(artifact: Path, instance: dict, *, clients: int, seconds: float, batch: int) -> dict:
    import httpx

    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pep_torchrec.cli",
            "serve",
            "--artifact",
            str(artifact),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=REPO,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, timeout_s=60, alive=lambda: proc.poll() is None)
        body = {"instances": [instance] * batch}
        latencies: list[float] = []
        errors = [0]
        lock = threading.Lock()
        stop_at = time.time() + seconds

        def loop() -> None:
            with httpx.Client(base_url=base, timeout=10) as client:
                client.post("/v1/predict", json=body)  # connection + warm-up, not timed
                mine = []
                while time.time() < stop_at:
                    start = time.perf_counter()
                    r = client.post("/v1/predict", json=body)
                    mine.append(time.perf_counter() - start)
                    if r.status_code != 200:
                        with lock:
                            errors[0] += 1
                with lock:
                    latencies.extend(mine)

        threads = [threading.Thread(target=loop) for _ in range(clients)]
        start = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.time() - start
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    lat = np.array(latencies) * 1e3
    return {
        "requests": len(lat),
        "errors": errors[0],
        "qps": len(lat) / elapsed,
        "instances_per_s": len(lat) * batch / elapsed,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "clients": clients,
        "batch": batch,
    }


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", required=True, help="a finished search run with masks/budget_*")
    parser.add_argument(
        "--retrain-runs",
        default="",
        help="comma-separated retrain runs whose artifacts' sizes are measured too (exactly their mask kept)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    return parser.parse_args(argv)


def _sizes_markdown(sizes: list[dict]) -> list[str]:
    """The artifact-size section."""
    return [
        "## Artifact size (embedding tables vs the same tables dense fp32)",
        "",
        "A search snapshot is exported thresholded (at most the budget stays: floor elements below their",
        "threshold are zero); a retrain run keeps exactly its mask.",
        "",
        markdown_table(
            sizes,
            [
                ("source", "source", ""),
                ("budget", "budget", "g"),
                ("dtype", "dtype", ""),
                ("kept_params", "kept", ","),
                ("kept_pct", "kept % of params", ".2f"),
                ("total_bytes", "tables B", ","),
                ("dense_fp32_bytes", "dense fp32 B", ","),
                ("ratio_pct", "% of dense", ".2f"),
                ("artifact_bytes", "all files B", ","),
            ],
        ),
        "",
    ]


def _lookup_markdown(lookups: list[dict]) -> list[str]:
    """The pooled-lookup section."""
    return [
        "## Pooled lookup, 1 thread, 5% kept (uniform), bags of 8 ids",
        "",
        "Interleaved repeats; `hot` = one id batch repeated, `fresh` = a new batch each repeat. "
        "Speed-up = dense / fused (min over repeats, and median); `torch ms` = the fused kernel's "
        f"pure-PyTorch reference path. Fused kernel loaded: {lookups[0]['fused_kernel']}.",
        "",
        markdown_table(
            lookups,
            [
                ("dim", "D", ""),
                ("ids_mode", "ids", ""),
                ("ids", "ids/batch", ","),
                ("dense_ms_min", "dense ms (min)", ".3f"),
                ("fused_ms_min", "fused ms (min)", ".3f"),
                ("speedup_min", "speed-up (min)", ".2f"),
                ("dense_ms", "dense ms (med)", ".3f"),
                ("fused_ms", "fused ms (med)", ".3f"),
                ("speedup", "speed-up (med)", ".2f"),
                ("torch_ms", "torch ms (med)", ".3f"),
                ("dense_mb", "dense MB", ".1f"),
                ("compact_mb", "compact MB", ".1f"),
            ],
        ),
        "",
    ]


def _predictor_markdown(cost: dict[str, dict]) -> list[str]:
    """The in-process predictor section."""
    return [
        "## Predictor in-process, 1 thread (median µs per call)",
        "",
        markdown_table(
            [{"layout": k, **v} for k, v in cost.items()],
            [
                ("layout", "layout", ""),
                ("features_us_b1", "features, 1 inst", ".0f"),
                ("predict_us_b1", "predict, 1 inst", ".0f"),
                ("features_us_b64", "features, 64 inst", ".0f"),
                ("predict_us_b64", "predict, 64 inst", ".0f"),
            ],
        ),
        "",
    ]


def _service_markdown(service: list[dict]) -> list[str]:
    """The loopback service section."""
    return [
        "## Service over loopback (4 closed-loop clients)",
        "",
        markdown_table(
            service,
            [
                ("layout", "layout", ""),
                ("batch", "instances/request", ""),
                ("round", "round", ""),
                ("requests", "requests", ","),
                ("errors", "errors", ""),
                ("qps", "QPS", ".0f"),
                ("p50_ms", "p50 ms", ".2f"),
                ("p99_ms", "p99 ms", ".2f"),
            ],
        ),
        "",
    ]


def _markdown(payload: dict, run_dir: Path) -> list[str]:
    """serving.md, as lines: the header, then one section per measurement."""
    return [
        "# Serving benchmarks",
        "",
        f"Run: `{run_dir}`; machine: {payload['machine']['host_cpu']}, "
        f"{payload['machine']['cpu_count']} cores; {payload['machine']['date']}",
        "",
        *_sizes_markdown(payload["sizes"]),
        *_lookup_markdown(payload["lookup"]),
        *_predictor_markdown(payload["predictor_cost"]),
        *_service_markdown(payload["service"]),
    ]


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    run_dir = Path(args.run_dir)
    quick = args.quick
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        sizes = artifact_sizes(run_dir, out, [Path(r) for r in args.retrain_runs.split(",") if r])
        lookups = lookup_throughput(
            200_000 if quick else 1_000_000, [16, 32, 64], 0.05, 2048, 8, 5 if quick else 41
        )
        from pep_torchrec.export.converter import ArtifactConverter
        from pep_torchrec.serving.predictor import Predictor
        from pep_torchrec.training.run_dir import RunDir, mask_budget

        budget = min(mask_budget(p) for p in RunDir(run_dir).mask_dirs())
        converter = ArtifactConverter(run_dir, budget=budget)
        converter.convert(out / "compact")
        converter.convert(out / "dense", layout="dense")
        instance = Predictor.from_path(out / "compact").example_instance()
        cost = {
            layout: predictor_cost(out / layout, instance, 50 if quick else 200)
            for layout in ("compact", "dense")
        }
        service = []
        # ABBA order per batch size: a drift in machine load (2 shared cores) hits both layouts alike.
        for batch in (1, 64):
            for round_, layout in enumerate(("compact", "dense", "dense", "compact")):
                row = service_load(out / layout, instance, clients=4, seconds=3 if quick else 8, batch=batch)
                service.append({"layout": layout, "budget": budget, "round": round_, **row})
    payload = {
        "machine": machine_info(),
        "run_dir": str(run_dir.resolve()),
        "sizes": sizes,
        "lookup": lookups,
        "predictor_cost": cost,
        "service": service,
    }
    md = _markdown(payload, run_dir)
    json_path, md_path = write_results("serving", payload, "\n".join(md))
    print("\n".join(md))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
