"""End-to-end training: the debug config in-process, kill-and-resume equality, 2 ranks under torchx,
the sharding dry run, and FM on the real ml-100k data reaching the AUC an independent FM reaches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pep_torchrec import cli
from pep_torchrec.train import main as train_main
from tests.helpers.launch import REPO, TORCHX, launch_env, launch_torchx_ddp, needs_torchx, run_command

SHARED_DATA = Path(os.environ.get("PEP_SHARED_DATA", REPO.parent / "shared" / "data"))
DEBUG = str(REPO / "configs" / "debug_cpu.yaml")


def _evals(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields (they legitimately differ between runs)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("examples_per_sec", "train_seconds")} for r in rows]


def test_debug_config_writes_run_outputs(tmp_path, debug_data):
    run = tmp_path / "run"
    assert (
        train_main(
            [
                "--config",
                DEBUG,
                "--data",
                str(debug_data),
                "--run-dir",
                str(run),
                "--set",
                "train.progress=false",
                "--set",
                "train.max_steps=50",
            ]
        )
        == 0
    )
    summary = json.loads((run / "summary.json").read_text())
    for key in (
        "stage",
        "dataset",
        "model",
        "world_size",
        "steps",
        "examples_per_sec",
        "valid_auc",
        "test_auc",
        "test_logloss",
        "embedding_params_total",
        "embedding_params_kept",
    ):
        assert key in summary, key
    assert summary["steps"] == 50 and summary["world_size"] == 1
    assert summary["embedding_params_total"] == 8 * 1000 * 8
    assert 0.6 < summary["test_auc"] < 1.0  # the planted model is learnable
    assert (run / "config.yaml").is_file()
    assert [r["step"] for r in _evals(run)] == [25, 50]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000025", "step_00000050"]


def test_unknown_config_key_is_a_clear_error(tmp_path, debug_data, capsys):
    code = train_main(
        [
            "--config",
            DEBUG,
            "--data",
            str(debug_data),
            "--run-dir",
            str(tmp_path / "r"),
            "--set",
            "train.epochz=1",
        ]
    )
    assert code == 2
    assert "unknown key train.epochz" in capsys.readouterr().err


def test_killed_run_resumes_to_identical_metrics(tmp_path, debug_data):
    args = [
        sys.executable,
        "-m",
        "pep_torchrec.train",
        "--config",
        DEBUG,
        "--data",
        str(debug_data),
        "--set",
        "train.progress=false",
        "--set",
        "train.max_steps=100",
    ]
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_command([*args, "--run-dir", str(full)])

    proc = subprocess.Popen(
        [*args, "--run-dir", str(killed)],
        env=launch_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = killed / "checkpoints" / "step_00000025" / "trainer_state.json"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists(), "the run never wrote its first checkpoint"
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"

    run_command([*args, "--run-dir", str(killed), "--resume"])
    a, b = (json.loads((d / "summary.json").read_text()) for d in (full, killed))
    for key in ("steps", "best_step", "valid_auc", "valid_logloss", "test_auc", "test_logloss"):
        assert a[key] == b[key], key
    assert _evals(full) == _evals(killed)


def test_resume_without_a_run_fails_clearly(tmp_path, debug_data, capsys):
    """--resume into a missing or empty directory, or one without a complete checkpoint: one
    `error:` line and exit 2, no traceback."""
    args = ["--config", DEBUG, "--data", str(debug_data), "--resume", "--set", "train.progress=false"]
    (tmp_path / "empty").mkdir()
    partial = tmp_path / "partial"
    (partial / "checkpoints" / "step_00000025.tmp").mkdir(parents=True)
    (partial / "config.yaml").write_text("{}\n")
    for run_dir, message in ((tmp_path / "missing", "holds no run"), (tmp_path / "empty", "holds no run"),
                             (partial, "no complete checkpoint")):  # fmt: skip
        assert train_main([*args, "--run-dir", str(run_dir)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --resume: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "missing").exists()  # a refused start writes nothing


def test_run_dir_of_a_previous_run_is_refused_unless_overwrite(tmp_path, debug_data, capsys):
    """A second run into a run directory would mix checkpoints (and a later --resume would continue
    the old run): refused without --overwrite; --overwrite replaces the old run's files."""
    run = tmp_path / "r"
    args = [
        "--config",
        DEBUG,
        "--data",
        str(debug_data),
        "--run-dir",
        str(run),
        "--set",
        "train.progress=false",
    ]
    assert train_main([*args, "--set", "train.max_steps=25"]) == 0
    old_steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert train_main([*args, "--set", "train.max_steps=20"]) == 2
    err = capsys.readouterr().err
    assert f"error: --run-dir {run} holds a previous run (checkpoints, summary.json, metrics.jsonl)" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == old_steps  # untouched
    assert train_main([*args, "--overwrite", "--set", "model.name=fmm"]) == 2  # a bad config replaces nothing
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == old_steps
    (run / "notes.txt").write_text("mine")  # not a run output: --overwrite leaves it
    assert train_main([*args, "--set", "train.max_steps=20", "--overwrite"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000020"]
    assert json.loads((run / "summary.json").read_text())["steps"] == 20
    assert (run / "notes.txt").read_text() == "mine"
    assert train_main([*args, "--resume", "--overwrite"]) == 2
    assert "choose one" in capsys.readouterr().err


def test_auto_resume_starts_or_resumes(tmp_path, debug_data):
    """--auto-resume (what a restarted job passes): a fresh directory starts, one with a complete
    checkpoint resumes from it."""
    run = tmp_path / "r"
    args = ["--config", DEBUG, "--data", str(debug_data), "--run-dir", str(run), "--auto-resume",
            "--set", "train.progress=false"]  # fmt: skip
    assert train_main([*args, "--set", "train.max_steps=25"]) == 0
    assert train_main([*args, "--set", "train.max_steps=50"]) == 0
    assert [r["step"] for r in _evals(run) if "valid_auc" in r] == [25, 50]
    assert json.loads((run / "summary.json").read_text())["steps"] == 50
    assert train_main([*args, "--resume"]) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "model.name=fmm"], "model.name: 'fmm' is not one of"),
        (["--set", "data.batch_size=0"], "data.batch_size: must be at least 1"),
        (["--set", "pep.budgets=[1.5]"], "pep.budgets: 1.5 is not a share"),
        (["--mask", "/nonexistent/mask"], "--mask /nonexistent/mask: not a mask directory"),
        (["--overwrite"], "--overwrite needs --run-dir"),
    ],
)
def test_user_mistakes_are_one_error_line(tmp_path, debug_data, capsys, argv, message):
    code = train_main(
        ["--config", DEBUG, "--data", str(debug_data), "--run-dir", str(tmp_path / "r"), *argv]
        if "--overwrite" not in argv
        else ["--config", DEBUG, "--data", str(debug_data), *argv]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()


def test_failed_start_leaves_nothing_behind(tmp_path, debug_data, monkeypatch):
    """A run that fails before its first checkpoint removes what it wrote (config.yaml, an empty
    metrics.jsonl, the search's init/): the directory too if the start created it."""
    from pep_torchrec.training.trainer import Trainer

    def fail(self):
        raise RuntimeError("boom at step 0")

    monkeypatch.setattr(Trainer, "train", fail)
    args = ["--config", DEBUG, "--data", str(debug_data), "--set", "train.progress=false"]
    with pytest.raises(RuntimeError, match="boom"):
        train_main([*args, "--run-dir", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="boom"):
        train_main([*args, "--run-dir", str(kept)])
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]


def test_train_needs_a_config(tmp_path, debug_data, capsys):
    """Without --config (and not resuming) training would run the built-in defaults: refused."""
    assert cli.main(["train", "--data", str(debug_data), "--run-dir", str(tmp_path / "r")]) == 2
    assert "error: --config is required" in capsys.readouterr().err


def test_dry_run_plans_sixteen_ranks(debug_data, capsys):
    assert (
        train_main(
            [
                "--config",
                DEBUG,
                "--data",
                str(debug_data),
                "--dry-run",
                "--set",
                "sharding.dry_run_world_size=16",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "16 ranks (2 nodes x 8)" in out
    assert out.count("t_C") >= 8  # every table appears in the plan
    assert "  15 " in out  # a memory line for the last rank


@needs_torchx
def test_torchx_two_ranks(tmp_path, debug_data):
    run = tmp_path / "run"
    launch_torchx_ddp(
        "--config",
        DEBUG,
        "--data",
        str(debug_data),
        "--run-dir",
        str(run),
        "--set",
        "train.progress=false",
        "train.max_steps=50",
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["steps"] == 50
    assert 0.6 < summary["test_auc"] < 1.0


def _rank_pid(run_dir: Path, rank: int) -> int | None:
    """The pid of the training process of `rank` writing `run_dir` (from /proc), or None."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"pep_torchrec/train.py" in b" ".join(cmdline) and str(run_dir).encode() in cmdline and \
                f"RANK={rank}".encode() in environ:  # fmt: skip
            return int(proc.name)
    return None


@needs_torchx
def test_torchx_run_resumes_by_itself_after_a_rank_dies(tmp_path, debug_data):
    """`pipelines/components.py:train --max_restarts 1`: rank 1 is killed after the first checkpoint;
    torchrun restarts both ranks, which resume from that checkpoint (--auto-resume) and finish with
    every eval equal to an uninterrupted run's (DeepFM's BatchNorm statistics included)."""

    def job(run: Path, *extra: str) -> list[str]:
        return [str(TORCHX), "run", "-s", "local_cwd", "pipelines/components.py:train", "--config", DEBUG,
                "--data", str(debug_data), "--run_dir", str(run), "-j", "1x2", *extra,
                "train.progress=false", "train.max_steps=100"]  # fmt: skip

    full, run = tmp_path / "full", tmp_path / "run"
    run_command(job(full))
    proc = subprocess.Popen(job(run, "--max_restarts", "1"), env=launch_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    first = run / "checkpoints" / "step_00000025" / "trainer_state.json"
    deadline = time.monotonic() + 240
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = _rank_pid(run, 1)
    assert first.exists() and pid is not None, "the job never wrote its first checkpoint"
    os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 100
    assert [r["step"] for r in _evals(run) if "valid_auc" in r] == [25, 50, 75, 100]  # once each
    assert _evals(run) == _evals(full)


@pytest.mark.slow
def test_movielens_fm_reaches_reference_auc(tmp_path):
    raw = SHARED_DATA / "ml-100k"
    if not (raw / "u.data.gz").exists() and not (raw / "u.data").exists():
        pytest.skip(f"{raw} absent (set PEP_SHARED_DATA to the folder holding ml-100k)")
    data, run = tmp_path / "ml100k", tmp_path / "fm"
    assert cli.main(["data", "prepare", "--dataset", "movielens", "--raw", str(raw), "--out", str(data)]) == 0
    assert (
        cli.main(
            [
                "train",
                "--config",
                str(REPO / "configs" / "movielens_fm.yaml"),
                "--data",
                str(data),
                "--run-dir",
                str(run),
                "--set",
                "train.progress=false",
            ]
        )
        == 0
    )
    summary = json.loads((run / "summary.json").read_text())
    # An independent FM with the same features reaches about 0.86, logistic regression about 0.85.
    assert summary["test_auc"] >= 0.85, summary


def test_run_directory_works_from_any_working_directory(tmp_path, debug_data, monkeypatch):
    """Paths given relative to where training ran are stored resolved, so a run is pruned from
    elsewhere (it used to fail: `error: <relative data path>/schema.json: not found`)."""
    monkeypatch.chdir(debug_data.parent)
    assert train_main(["--config", DEBUG, "--data", debug_data.name, "--run-dir", "relative_run",
                       "--set", "train.progress=false", "train.max_steps=25"]) == 0  # fmt: skip
    run = debug_data.parent / "relative_run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["path"] == str(debug_data.resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli.main(["prune", "--run-dir", str(run), "--budgets", "0.1", "--out", "masks"]) == 0
    assert (elsewhere / "masks" / "masks" / "budget_0.1" / "meta.json").is_file()
