"""`make demo`: the main job end to end on the embedded synthetic data, then a short result table.

Stages (each one is also a torchx component in pipelines/components.py):
  1. prepare   synthetic Criteo-like data (Zipf ids, planted signal) → Parquet + schema.json
  2. baseline  FM, one process, DistributedModelParallel + fused Adagrad
  3. baseline  DLRM on 2 ranks launched by torchx (dist.ddp, gloo)

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
from pathlib import Path

from pep_torchrec import cli

REPO = Path(__file__).resolve().parents[1]


def _stage(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def _torchx_train(config: str, data: Path, run_dir: Path, overrides: list[str]) -> None:
    torchx = Path(sys.executable).parent / "torchx"
    cmd = [str(torchx), "run", "-s", "local_cwd", "dist.ddp", "-j", "1x2", "--env", "OMP_NUM_THREADS=1",
           "--script", "pep_torchrec/train.py", "--", "--config", config, "--data", str(data),
           "--run-dir", str(run_dir), "--set", *overrides]
    print("$ torchx " + " ".join(cmd[1:]), flush=True)
    env = dict(os.environ, PATH=f"{torchx.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    subprocess.run(cmd, check=True, cwd=REPO, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/demo", help="working directory (recreated)")
    parser.add_argument("--rows", type=int, default=100_000, help="synthetic rows")
    args = parser.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    data, runs = out / "synthetic", out / "runs"
    started = time.perf_counter()
    quiet = ["train.progress=false"]

    _stage("1/3 prepare: synthetic Criteo-like data")
    if cli.main(["data", "prepare", "--dataset", "synthetic", "--out", str(data), "--rows", str(args.rows),
                 "--num-sparse", "26", "--num-dense", "13", "--cardinality", "20000"]) != 0:
        return 1

    _stage("2/3 baseline: FM, 1 process")
    base_overrides = ["model.embedding_dim=16", "train.epochs=2", "train.eval_every=0", *quiet]
    if cli.main(["train", "--config", "configs/criteo_fm.yaml", "--data", str(data), "--run-dir", str(runs / "fm"),
                 "--set", *base_overrides, "model.options={use_dense: true}"]) != 0:
        return 1

    _stage("3/3 baseline: DLRM, 2 ranks under torchx dist.ddp")
    _torchx_train("configs/criteo_dlrm.yaml", data, runs / "dlrm_2ranks",
                  ["model.embedding_dim=16", "model.options={bottom_mlp_dims: [64, 32], top_mlp_dims: [64, 32]}",
                   "train.epochs=2", *quiet])

    _stage(f"result ({time.perf_counter() - started:.0f} s)")
    print(f"{'run':<14}{'ranks':>6}{'steps':>7}{'valid AUC':>11}{'test AUC':>10}{'test logloss':>14}{'ex/s':>10}"
          f"{'emb params':>13}")
    for name in ("fm", "dlrm_2ranks"):
        s = json.loads((runs / name / "summary.json").read_text())
        print(f"{name:<14}{s['world_size']:>6}{s['steps']:>7}{s['valid_auc']:>11.4f}{s['test_auc']:>10.4f}"
              f"{s['test_logloss']:>14.4f}{s['examples_per_sec']:>10,.0f}{s['embedding_params_total']:>13,}")
    print(f"\nrun directories: {runs}/<run>/{{config.yaml,metrics.jsonl,summary.json,checkpoints/}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
