"""Service throughput over loopback: server and client on separate cores, keep-alive connections.

    .venv/bin/python -m benchmarks.serving_load [--run-dir out/demo/runs/retrain_10] [--seconds 4]

The run (a retrain run, or a search run at its smallest budget; `make demo` makes the default) is
exported twice: `compact` (the pruned tables as the artifact stores them) and `dense` (the same kept
values in dense tables). For each artifact `pep-torchrec serve` (one uvicorn worker, torch 1 thread)
runs in a subprocess pinned to one core; this process, the load generator, pins itself to another.
Each client thread keeps one HTTP/1.1 keep-alive connection (http.client) and sends its next request
when the last one answered (closed loop), after a warm-up. Scenarios: batch 1 with 8 threads, batch 64
with 8 threads, batch 1 with one thread (the latency floor). Layouts alternate in ABBA order, so a
drift in machine load hits both; the table gives medians over rounds.

`--server-path DIR` puts DIR first on the server's PYTHONPATH: the same load against another
checkout's `pep_torchrec` (how the "before" numbers in the README were taken).

Results: benchmarks/results/serving_load.{json,md}.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, machine_info, markdown_table, write_results
from pep_torchrec.serving.local import free_port, wait_ready

# (name, instances per request, client threads)
SCENARIOS = [("batch 1, 8 threads", 1, 8), ("batch 64, 8 threads", 64, 8), ("batch 1, 1 thread", 1, 1)]
# Issue 13's targets on this machine: (scenario, metric, bound, at least?)
TARGETS = [
    ("batch 1, 8 threads", "req_per_s", 1000, True),
    ("batch 1, 8 threads", "p99_ms", 20, False),
    ("batch 64, 8 threads", "instances_per_s", 25000, True),
    ("batch 1, 1 thread", "p50_ms", 1.0, False),
]
METRICS = ("req_per_s", "instances_per_s", "p50_ms", "p99_ms")


def _pin(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def _serve(artifact: Path, port: int, cpu: int | None, server_path: Path | None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if server_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(server_path), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "pep_torchrec.cli", "serve", "--artifact", str(artifact),
           "--port", str(port), "--num-threads", "1", "--log-level", "warning"]  # fmt: skip
    return subprocess.Popen(cmd, cwd=server_path or REPO, env=env, preexec_fn=lambda: _pin(cpu))


def closed_loop(
    port: int, body: bytes, *, threads: int, seconds: float, warmup: int
) -> tuple[list[float], int, float]:
    """`threads` keep-alive clients sending `body` for `seconds`: (latencies in s, non-200 count,
    elapsed s). Each thread's first `warmup` requests (connection, first calls) are not counted."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    ready = threading.Barrier(threads + 1)
    go = threading.Event()
    stop_at = [0.0]
    headers = {"content-type": "application/json"}

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            for _ in range(warmup):
                conn.request("POST", "/v1/predict", body, headers)
                response = conn.getresponse()
                answer = response.read()
                if response.status != 200:
                    raise RuntimeError(f"warm-up request answered {response.status}: {answer[:200]!r}")
            ready.wait()
            go.wait()
            mine, bad = [], 0
            while True:
                start = time.perf_counter()
                if start >= stop_at[0]:
                    break
                conn.request("POST", "/v1/predict", body, headers)
                response = conn.getresponse()
                response.read()
                mine.append(time.perf_counter() - start)
                bad += response.status != 200
        finally:
            conn.close()
        with lock:
            latencies.extend(mine)
            errors[0] += bad

    workers = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    ready.wait(timeout=120)
    begin = time.perf_counter()
    stop_at[0] = begin + seconds
    go.set()
    for w in workers:
        w.join()
    return latencies, errors[0], time.perf_counter() - begin


def measure(
    artifact: Path, instance: dict, *, seconds: float, warmup: int, server_cpu: int | None,
    server_path: Path | None,
) -> list[dict]:  # fmt: skip
    """Every scenario against one server process of `artifact`."""
    port = free_port()
    proc = _serve(artifact, port, server_cpu, server_path)
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout_s=120, alive=lambda: proc.poll() is None)
        rows = []
        for name, batch, threads in SCENARIOS:
            body = json.dumps({"instances": [instance] * batch}).encode()
            lat, errors, elapsed = closed_loop(port, body, threads=threads, seconds=seconds, warmup=warmup)
            ms = np.array(lat) * 1e3
            rows.append(
                {
                    "scenario": name,
                    "batch": batch,
                    "threads": threads,
                    "requests": len(ms),
                    "errors": errors,
                    "req_per_s": len(ms) / elapsed,
                    "instances_per_s": len(ms) * batch / elapsed,
                    "p50_ms": float(np.percentile(ms, 50)),
                    "p99_ms": float(np.percentile(ms, 99)),
                }
            )
        return rows
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=REPO / "out/demo/runs/retrain_10",
        help="a retrain run, or a search run (exported at its smallest budget); default: `make demo`'s",
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per scenario")
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds, each serving both layouts")
    parser.add_argument("--warmup", type=int, default=50, help="uncounted requests per client thread")
    parser.add_argument("--server-path", type=Path, help="put this first on the server's PYTHONPATH")
    parser.add_argument("--name", default="serving_load", help="results file name (without suffix)")
    parser.add_argument("--note", default="", help="a line for the results (e.g. what --server-path holds)")
    return parser.parse_args(argv)


def _print_row(round_: int, layout: str, row: dict) -> None:
    print(
        f"round {round_} {layout:8s} {row['scenario']:20s} {row['req_per_s']:8.0f} req/s "
        f"{row['instances_per_s']:9.0f} inst/s  p50 {row['p50_ms']:6.2f} ms  "
        f"p99 {row['p99_ms']:6.2f} ms  non-200 {row['errors']}",
        flush=True,
    )


def _summarise(rows: list[dict], order: list[str]) -> list[dict]:
    """Per scenario and layout: the median of each metric over the rounds, and all non-200 answers."""
    summary = []
    for name, batch, threads in SCENARIOS:
        for layout in order:
            mine = [r for r in rows if (r["layout"], r["scenario"]) == (layout, name)]
            summary.append(
                {
                    "scenario": name,
                    "layout": layout,
                    "batch": batch,
                    "threads": threads,
                    **{k: float(np.median([r[k] for r in mine])) for k in METRICS},
                    "errors": sum(r["errors"] for r in mine),
                }
            )
    return summary


def _targets(summary: list[dict], order: list[str]) -> list[dict]:
    """Issue 13's targets (TARGETS) against the summary, per layout."""
    targets = []
    for name, metric, bound, at_least in TARGETS:
        for layout in order:
            value = next(s[metric] for s in summary if (s["scenario"], s["layout"]) == (name, layout))
            targets.append(
                {
                    "scenario": name,
                    "layout": layout,
                    "target": f"{metric} {'>=' if at_least else '<='} {bound:g}",
                    "value": value,
                    "met": "yes" if (value >= bound if at_least else value <= bound) else "no",
                }
            )
    return targets


def _ratios(summary: list[dict]) -> list[dict]:
    """Compact / dense on req/s and p50, per scenario (req/s ratio >= 1: compact at least as fast)."""
    ratios = []
    for name, _, _ in SCENARIOS:
        by = {s["layout"]: s for s in summary if s["scenario"] == name}
        ratios.append(
            {
                "scenario": name,
                "req_ratio": by["compact"]["req_per_s"] / by["dense"]["req_per_s"],
                "p50_ratio": by["compact"]["p50_ms"] / by["dense"]["p50_ms"],
            }
        )
    return ratios


def _markdown(
    info: dict, command: str, args: argparse.Namespace, budget: float | None, server_cpu: int | None,
    client_cpu: int | None, summary: list[dict], ratios: list[dict], targets: list[dict],
) -> str:  # fmt: skip
    pinning = (
        f"server pinned to CPU {server_cpu}, client process to CPU {client_cpu}"
        if server_cpu is not None
        else "one CPU: server and client share it"
    )
    return "\n".join(
        [
            "# Service throughput over loopback",
            "",
            f"{info['date']}, {info['host_cpu']} ({info['cpu_count']} cores), commit {info['git_commit']}, "
            f"`{command}`. Run: `{args.run_dir}`" + (f" (budget {budget:g})" if budget else "") + ".",
            "",
            f"`pep-torchrec serve` (one uvicorn worker, torch 1 thread); {pinning}. One keep-alive",
            f"HTTP/1.1 connection per client thread (http.client), closed loop, {args.seconds:g} s per "
            f"scenario after {args.warmup} warm-up requests per thread; medians over {args.rounds} "
            "ABBA rounds (compact, dense, dense, compact, ...).",
            "",
            *([args.note, ""] if args.note else []),
            markdown_table(
                summary,
                [
                    ("scenario", "scenario", ""),
                    ("layout", "artifact", ""),
                    ("req_per_s", "req/s", ",.0f"),
                    ("instances_per_s", "instances/s", ",.0f"),
                    ("p50_ms", "p50 ms", ".2f"),
                    ("p99_ms", "p99 ms", ".2f"),
                    ("errors", "non-200", "d"),
                ],
            ),
            "",
            "Compact / dense (req/s ratio >= 1 and p50 ratio <= 1: compact at least as fast):",
            "",
            markdown_table(
                ratios,
                [
                    ("scenario", "scenario", ""),
                    ("req_ratio", "req/s ratio", ".3f"),
                    ("p50_ratio", "p50 ratio", ".3f"),
                ],
            ),
            "",
            "Issue 13's targets:",
            "",
            markdown_table(
                targets,
                [
                    ("scenario", "scenario", ""),
                    ("layout", "artifact", ""),
                    ("target", "target", ""),
                    ("value", "measured", ",.2f"),
                    ("met", "met", ""),
                ],
            ),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    from pep_torchrec.training.run_dir import RunDir, mask_budget

    run = RunDir(args.run_dir)
    if not run.is_finished():
        raise SystemExit(
            f"error: --run-dir {args.run_dir}: not a finished run (no summary.json); run `make demo`"
        )

    from pep_torchrec.export.converter import ArtifactConverter
    from pep_torchrec.serving.predictor import Predictor

    masks = run.mask_dirs()
    budget = min(mask_budget(p) for p in masks) if masks else None
    # Server and client each on a core of their own when there are two; otherwise they share.
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    server_cpu, client_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        converter = ArtifactConverter(args.run_dir, budget=budget)
        converter.convert(out / "compact")
        converter.convert(out / "dense", layout="dense")
        instance = Predictor.from_path(out / "compact").example_instance()
        _pin(client_cpu)
        order = ["compact", "dense"]
        for round_ in range(args.rounds):
            for layout in order if round_ % 2 == 0 else order[::-1]:
                for row in measure(
                    out / layout, instance, seconds=args.seconds, warmup=args.warmup,
                    server_cpu=server_cpu, server_path=args.server_path,
                ):  # fmt: skip
                    rows.append({"layout": layout, "round": round_, **row})
                    _print_row(round_, layout, row)
    summary = _summarise(rows, order)
    targets = _targets(summary, order)
    ratios = _ratios(summary)
    info = machine_info()
    command = " ".join(["python -m benchmarks.serving_load", *(sys.argv[1:] if argv is None else argv)])
    md = _markdown(info, command, args, budget, server_cpu, client_cpu, summary, ratios, targets)
    payload = {
        "machine": info,
        "run_dir": str(args.run_dir),
        "budget": budget,
        "server_cpu": server_cpu,
        "client_cpu": client_cpu,
        "server_path": str(args.server_path) if args.server_path else None,
        "note": args.note,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "summary": summary,
        "ratios": ratios,
        "targets": targets,
        "rows": rows,
    }
    json_path, md_path = write_results(args.name, payload, md)
    print(md)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
