"""`make demo`: the whole PEP workflow end to end on the embedded synthetic data, then a result table.

Stages (each also a torchx component in pipelines/components.py):
  1. prepare   synthetic Criteo-like data (Zipf ids, planted signal in some fields) → Parquet + schema
  2. baseline  FM, one process: DistributedModelParallel + fused Adagrad + TrainPipelineSparseDist
  3. search    PEP (feature x dim thresholds) on 2 ranks under torchx dist.ddp: masks at 20/10/5 %
  4. retrain   lottery ticket from the 10 % mask (step-0 embedding x mask), one process
  5. magnitude the baseline to beat: top-|v| of the trained FM at 10 %, fine-tuned
  6. report    plots + Markdown of the search
  7. export    the 10 % retrain → compact row-wise mixed-dimension artifact (int8 too)
  8. serve     `pep-torchrec serve` on 127.0.0.1, scoring a few raw instances from the test split

    python -m pipelines.demo [--out out/demo] [--rows 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq

from pep_torchrec import cli
from pep_torchrec.serving.local import free_port, wait_ready
from pep_torchrec.training.run_dir import RunDir

REPO = Path(__file__).resolve().parents[1]
BUDGETS = "[0.2,0.1,0.05]"
# The model and optimizer settings every training stage shares (on top of its config file).
MODEL_OVERRIDES = [
    "model.embedding_dim=16",
    "model.init_std=0.01",
    "model.options={use_dense: true}",
    "optim.embedding.lr=0.02",
    "train.progress=false",
]


def _stage(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def _run(argv: list[str]) -> None:
    print("$ pep-torchrec " + " ".join(argv), flush=True)
    if cli.main(argv) != 0:
        raise SystemExit(f"stage failed: pep-torchrec {' '.join(argv)}")


def _torchx_train(args: list[str], overrides: list[str]) -> None:
    torchx = Path(sys.executable).parent / "torchx"
    cmd = [
        str(torchx),
        "run",
        "-s",
        "local_cwd",
        "dist.ddp",
        "-j",
        "1x2",
        "--env",
        "OMP_NUM_THREADS=1",
        "--script",
        "pep_torchrec/train.py",
        "--",
        *args,
        "--set",
        *overrides,
    ]
    print("$ torchx " + " ".join(cmd[1:]), flush=True)
    env = dict(os.environ, PATH=f"{torchx.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        raise SystemExit("torchx stage failed")
    print("\n".join(line for line in proc.stdout.splitlines() if "[0]:" in line), flush=True)


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _serve_and_score(artifact: Path, data: Path) -> None:
    """Start the service on a free loopback port, score test instances, show a 4xx, stop it."""
    port = free_port()
    cmd = [
        str(Path(sys.executable).parent / "pep-torchrec"),
        "serve",
        "--artifact",
        str(artifact),
        "--port",
        str(port),
    ]
    print("$ pep-torchrec " + " ".join(cmd[1:]), flush=True)
    server = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_ready(base, timeout_s=120, alive=lambda: server.poll() is None)
        except RuntimeError as e:
            raise SystemExit(f"the service did not become ready: {e}") from e
        schema = json.loads((data / "schema.json").read_text())
        table = pq.read_table(data / schema["splits"]["test"]["files"][0]).slice(0, 3).to_pylist()
        names = [f["name"] for f in schema["sparse_features"]] + schema["dense_features"]
        instances = [{k: row[k] for k in names} for row in table]
        status, body = _post(base + "/v1/predict", {"instances": instances})
        labels = [row["label"] for row in table]
        print(f"POST /v1/predict (3 test rows, labels {labels}) → {status} {body}")
        status, body = _post(base + "/v1/predict", {"instances": [{"no_such_feature": 1}]})
        print(f"POST /v1/predict with an unknown feature → {status} {body['detail'][0]['msg'][:100]}")
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            lines = [ln for ln in r.read().decode().splitlines() if ln.startswith("pep_requests_total")]
        print("GET /metrics: " + "; ".join(lines[:3]))
    finally:
        server.terminate()
        server.wait(timeout=30)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="out/demo", help="working directory (recreated)")
    parser.add_argument("--rows", type=int, default=100_000, help="synthetic rows")
    return parser.parse_args(argv)


def _prepare_and_baseline(data: Path, runs: Path, rows: int) -> None:
    """Stages 1-2: the synthetic data, then the FM baseline in one process."""
    _stage("1/8 prepare: synthetic Criteo-like data")
    _run(
        [
            "data",
            "prepare",
            "--dataset",
            "synthetic",
            "--out",
            str(data),
            "--rows",
            str(rows),
            "--num-sparse",
            "26",
            "--num-dense",
            "13",
            "--cardinality",
            "5000",
        ]
    )

    _stage("2/8 baseline: FM, 1 process")
    _run(
        [
            "train",
            "--config",
            "configs/criteo_fm.yaml",
            "--data",
            str(data),
            "--run-dir",
            str(runs / "base"),
            "--set",
            *MODEL_OVERRIDES,
            "train.epochs=4",
        ]
    )


def _search_retrain_magnitude(data: Path, runs: Path) -> None:
    """Stages 3-5: the PEP search on 2 ranks, the 10 % lottery ticket, and magnitude pruning fine-tuned."""
    _stage("3/8 PEP search: 2 ranks under torchx dist.ddp")
    _torchx_train(
        ["--config", "configs/criteo_fm_search.yaml", "--data", str(data), "--run-dir", str(runs / "search")],
        [*MODEL_OVERRIDES, f"pep.budgets={BUDGETS}", "train.eval_every=4"],
    )

    _stage("4/8 retrain: lottery ticket at 10 %")
    mask = RunDir(runs / "search").mask_dir(0.1)
    _run(
        [
            "train",
            "--config",
            "configs/criteo_fm_retrain.yaml",
            "--data",
            str(data),
            "--run-dir",
            str(runs / "retrain_10"),
            "--mask",
            str(mask),
            "--set",
            *MODEL_OVERRIDES,
            "train.epochs=4",
        ]
    )

    _stage("5/8 magnitude pruning at 10 %, fine-tuned")
    _run(["prune", "--run-dir", str(runs / "base"), "--budgets", "0.1", "--out", str(runs / "magnitude")])
    _run(
        [
            "train",
            "--config",
            "configs/criteo_fm_retrain.yaml",
            "--data",
            str(data),
            "--run-dir",
            str(runs / "magnitude_10"),
            "--mask",
            str(RunDir(runs / "magnitude").mask_dir(0.1)),
            "--set",
            *MODEL_OVERRIDES,
            "train.epochs=4",
        ]
    )


def _report_and_export(out: Path, runs: Path) -> dict[str, tuple[int, int]]:
    """Stages 6-7: the search report, then fp32 and int8 artifacts of the 10 % retrain; their
    (embedding table bytes, dense fp32 bytes)."""
    _stage("6/8 report")
    _run(["report", "--run-dir", str(runs / "search")])

    _stage("7/8 export: compact serving artifacts of the 10 % retrain")
    artifact = out / "artifact"
    _run(["export", "--run-dir", str(runs / "retrain_10"), "--out", str(artifact)])
    _run(
        [
            "export",
            "--run-dir",
            str(runs / "retrain_10"),
            "--out",
            str(out / "artifact_int8"),
            "--dtype",
            "int8",
        ]
    )
    sizes = {}
    for name in ("artifact", "artifact_int8"):
        manifest = json.loads((out / name / "manifest.json").read_text())
        sizes[name] = (manifest["total_bytes"], manifest["dense_fp32_bytes"])
    return sizes


def _print_results(runs: Path, sizes: dict[str, tuple[int, int]], started: float) -> None:
    """The result table: every run's metrics, the search snapshots, the artifact sizes."""
    _stage(f"result ({time.perf_counter() - started:.0f} s)")
    print(
        f"{'run':<14}{'ranks':>6}{'steps':>7}{'valid AUC':>11}{'test AUC':>10}{'test logloss':>14}"
        f"{'emb params kept':>17}{'of':>12}"
    )
    for name in ("base", "search", "retrain_10", "magnitude_10"):
        s = RunDir(runs / name).summary(required=True)
        print(
            f"{name:<14}{s['world_size']:>6}{s['steps']:>7}{s['valid_auc']:>11.4f}{s['test_auc']:>10.4f}"
            f"{s['test_logloss']:>14.4f}{s['embedding_params_kept']:>17,}{s['embedding_params_total']:>12,}"
        )
    snaps = RunDir(runs / "search").summary(required=True)["snapshots"]
    print(
        "search snapshots: "
        + ", ".join(f"{s['budget']:g} → {s['kept']:,} kept at step {s['step']}" for s in snaps)
    )
    for name, (total, dense) in sizes.items():
        print(
            f"{name}: embedding tables {total:,} bytes = {100 * total / dense:.1f}% of dense fp32 ({dense:,} bytes)"
        )
    print(f"report: {runs / 'search' / 'report' / 'report.md'}")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    data, runs = out / "synthetic", out / "runs"
    started = time.perf_counter()
    _prepare_and_baseline(data, runs, args.rows)
    _search_retrain_magnitude(data, runs)
    sizes = _report_and_export(out, runs)

    _stage("8/8 serve: score raw instances over loopback")
    _serve_and_score(out / "artifact", data)

    _print_results(runs, sizes, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
