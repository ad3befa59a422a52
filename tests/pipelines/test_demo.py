"""`make demo` end to end (pipelines/demo.py) on a small synthetic set: every stage runs, the search
reaches every budget, the service answers. Guards the shipped configs the demo builds on (a search
config whose pressure settings conflict with the demo's overrides broke it once)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.demo", "--out", str(tmp_path / "demo"), "--rows", "20000"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    snapshots = re.search(r"search snapshots: (.*)", out)
    assert snapshots is not None, out[-2000:]
    assert all(f"{b} →" in snapshots.group(1) for b in ("0.2", "0.1", "0.05")), snapshots.group(1)
    assert re.search(r"POST /v1/predict \(3 test rows.*→ 200", out), out[-2000:]
    assert (tmp_path / "demo" / "artifact" / "manifest.json").is_file()
