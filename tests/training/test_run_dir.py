"""`RunDir`: the paths of a run directory and its readers, each error one line naming the file."""

from __future__ import annotations

import json
import logging
import os

import pytest
import yaml

from pep_torchrec.config import ConfigError, RunConfig, save_config
from pep_torchrec.training.run_dir import (
    RunDir,
    RunDirError,
    RunFileMissing,
    budget_tag,
    init_dir_of,
    list_masks,
    read_meta,
)


def _one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


def _mask(directory, budget, *, kind="mask", init="../../init"):
    directory.mkdir(parents=True)
    meta = {"kind": kind, "budget": budget, "dim": 4, "init": init, "tables": {"t_a": {"rows": 3}}}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


def _checkpoint(run, step):
    path = run.checkpoint(step)
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text("{}")
    return path


@pytest.fixture
def run(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    cfg = RunConfig()
    cfg.train.stage = "search"
    cfg.model.embedding_dim = 4
    save_config(cfg, run.config_path)
    return run


def test_paths(tmp_path):
    run = RunDir(tmp_path)
    assert run.config_path == tmp_path / "config.yaml"
    assert run.summary_path == tmp_path / "summary.json"
    assert run.metrics_path == tmp_path / "metrics.jsonl"
    assert run.checkpoints_dir == tmp_path / "checkpoints"
    assert run.checkpoint(120) == tmp_path / "checkpoints" / "step_00000120"
    assert run.masks_dir == tmp_path / "masks"
    assert run.mask_dir(0.1) == tmp_path / "masks" / "budget_0.1" and budget_tag(0.05) == "budget_0.05"
    assert run.init_dir == tmp_path / "init"
    assert repr(run) == f"RunDir({str(tmp_path)!r})"


def test_require(tmp_path):
    assert RunDir(tmp_path).require().path == tmp_path
    with pytest.raises(RunFileMissing) as e:
        RunDir(tmp_path / "nope").require()
    assert _one_line(e) == f"{tmp_path / 'nope'}: run directory not found"


def test_config_roundtrip_and_stage(run):
    assert run.has_config()
    cfg = run.config()
    assert cfg.train.stage == "search" and cfg.model.embedding_dim == 4
    assert run.config_data()["model"]["embedding_dim"] == 4
    assert run.stage() == "search"  # config.yaml's, until summary.json says otherwise
    run.write_summary({"stage": "retrain"})
    assert run.stage() == "retrain"


def test_config_unknown_keys_dropped_with_a_warning(run, caplog):
    """The one policy (it was: export dropped them, prune refused the run): keys of another version
    are dropped with one warning naming the file and the keys, by every reader."""
    data = yaml.safe_load(run.config_path.read_text())
    data["train"]["renamed_option"] = 3
    data["gone_section"] = {"x": 1}
    data["data"]["synthetic"] = {"rows": 100, "old_knob": 2}  # inside an optional dataclass field
    run.config_path.write_text(yaml.safe_dump(data))
    with caplog.at_level(logging.WARNING):
        cfg = run.config()
    assert cfg.train.stage == "search" and cfg.data.synthetic.rows == 100
    assert (
        f"{run.config_path}: ignoring keys this version does not know: data.synthetic.old_knob, "
        "gone_section, train.renamed_option" in (caplog.text)
    )
    assert "renamed_option" not in run.config_data()["train"]


def test_config_errors(run, tmp_path):
    with pytest.raises(RunFileMissing) as e:
        RunDir(tmp_path).config()
    assert _one_line(e) == f"{tmp_path / 'config.yaml'}: missing (is {tmp_path} a run directory?)"
    assert not RunDir(tmp_path).has_config()

    run.config_path.write_text("train: [1,\n")
    with pytest.raises(RunDirError) as e:
        run.config_data()
    assert _one_line(e).startswith(f"{run.config_path}:") and "invalid YAML" in str(e.value)

    run.config_path.write_text("- 1\n")
    with pytest.raises(RunDirError) as e:
        run.config_data()
    assert _one_line(e) == f"{run.config_path}: top level must be a mapping"

    run.config_path.write_text("train:\n  epochs: many\n")  # a bad value of a known key stays an error
    with pytest.raises(RunDirError) as e:
        run.config()
    assert _one_line(e).startswith(f"{run.config_path}: ") and "train.epochs" in str(e.value)
    assert isinstance(e.value, ConfigError)  # every command prints it as `error: ...`, exit 2


def test_stage_error(run):
    run.write_summary({"stage": "finetune"})
    with pytest.raises(RunDirError) as e:
        run.stage()
    assert _one_line(e) == f"{run.path}: unknown stage 'finetune' (want baseline, search or retrain)"


def test_summary(run):
    assert run.summary() == {} and not run.is_finished()
    with pytest.raises(RunFileMissing) as e:
        run.summary(required=True)
    assert _one_line(e) == f"{run.summary_path}: missing (has the run finished?)"
    run.write_summary({"best_step": 4})
    assert run.is_finished() and run.summary() == {"best_step": 4}
    assert not run.summary_path.with_name("summary.json.tmp").exists()
    run.summary_path.write_text('{"best_step": ')
    with pytest.raises(RunDirError) as e:
        run.summary()
    assert _one_line(e).startswith(f"{run.summary_path}:1: invalid JSON")
    run.summary_path.write_text("[1]")
    with pytest.raises(RunDirError, match="top level must be an object"):
        run.summary()


def test_metrics(run, caplog):
    with pytest.raises(RunFileMissing) as e:
        run.metrics()
    assert _one_line(e).startswith(f"{run.metrics_path}: missing")
    run.start_metrics()
    with pytest.raises(RunDirError) as e:
        run.metrics()
    assert _one_line(e) == f"{run.metrics_path}: no evaluations yet"
    for step in (1, 2, 3):
        run.append_metrics({"step": step, "loss": 0.5})
    assert [m["step"] for m in run.metrics()] == [1, 2, 3]
    run.truncate_metrics(2)  # a resume from step 2's checkpoint
    assert [m["step"] for m in run.metrics()] == [1, 2]
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 3, "lo')  # a run still writing
    with caplog.at_level(logging.WARNING):
        assert [m["step"] for m in run.metrics()] == [1, 2]
    assert "skipping an incomplete last line" in caplog.text
    run.metrics_path.write_text('{"step": 1}\n{oops}\n{"step": 3}\n')
    with pytest.raises(RunDirError) as e:
        run.metrics()
    assert _one_line(e).startswith(f"{run.metrics_path}:2: invalid JSON")
    run.metrics_path.write_text('{"loss": 1}\n')
    with pytest.raises(RunDirError) as e:
        run.metrics()
    assert _one_line(e) == f"{run.metrics_path}:1: an evaluation record needs a 'step'"


def test_best_checkpoint(run):
    """The one rule (the converter used to fall back to the latest checkpoint; prune refused): the
    checkpoint summary.json's best_step names, complete, or an error naming that file."""
    _checkpoint(run, 10)
    with pytest.raises(RunFileMissing) as e:
        run.best_checkpoint()
    assert _one_line(e) == f"{run.summary_path}: missing (has the run finished?)"
    run.write_summary({"stage": "baseline"})
    with pytest.raises(RunDirError) as e:
        run.best_step()
    assert _one_line(e) == f"{run.summary_path}: no best_step"
    run.write_summary({"best_step": 20})
    run.checkpoint(20).mkdir()  # no trainer_state.json: incomplete
    with pytest.raises(RunFileMissing) as e:
        run.best_checkpoint()
    assert _one_line(e) == (
        f"{run.checkpoint(20)}: the best checkpoint (summary.json best_step 20) is missing or incomplete"
    )
    best = _checkpoint(run, 5)
    run.write_summary({"best_step": 5})
    assert run.best_step() == 5 and run.best_checkpoint() == best


def test_checkpoints_manager(run):
    _checkpoint(run, 3)
    _checkpoint(run, 7)
    run.checkpoint(9).mkdir()  # incomplete: not listed
    manager = run.checkpoints()
    assert manager.directory == run.checkpoints_dir and manager.steps() == [3, 7] and manager.latest() == 7


def test_masks_listing(run):
    assert run.mask_dirs() == [] and list_masks(run.path / "nope") == []
    small = _mask(run.mask_dir(0.05), 0.05)
    big = _mask(run.mask_dir(0.2), 0.2)
    (run.masks_dir / "budget_0.1").mkdir()  # incomplete
    tmp = _mask(run.masks_dir / "budget_0.1.tmp", 0.1)  # an interrupted write, meta.json already in
    assert run.mask_dirs() == [big, small]
    assert run.mask_dirs(complete=False) == [big, run.masks_dir / "budget_0.1", small, tmp]
    assert run.mask(0.2) == big
    with pytest.raises(RunFileMissing) as e:
        run.mask(0.1)
    assert _one_line(e) == (
        f"{run.masks_dir / 'budget_0.1'}: no mask for budget 0.1 (have ['budget_0.2', 'budget_0.05'])"
    )


def test_read_meta(tmp_path):
    mask = _mask(tmp_path / "m", 0.1)
    assert read_meta(mask)["budget"] == 0.1 and read_meta(mask, "mask")["kind"] == "mask"
    assert init_dir_of(mask, read_meta(mask)) == (tmp_path / "m" / "../../init").resolve()
    assert init_dir_of(mask, {"init": str(tmp_path)}) == tmp_path
    with pytest.raises(RunDirError) as e:
        read_meta(mask, "init")
    assert _one_line(e) == f"{mask / 'meta.json'}: not an init directory (kind 'mask')"
    with pytest.raises(RunFileMissing) as e:
        read_meta(tmp_path)
    assert _one_line(e) == f"{tmp_path}: not a complete mask/init directory (meta.json missing)"
    assert isinstance(e.value, FileNotFoundError)
    (mask / "meta.json").write_text("{\n  oops")
    with pytest.raises(RunDirError) as e:
        read_meta(mask)
    assert _one_line(e).startswith(f"{mask / 'meta.json'}:2: invalid JSON")
    (mask / "meta.json").write_text("[]")
    with pytest.raises(RunDirError) as e:
        read_meta(mask)
    assert _one_line(e) == f"{mask / 'meta.json'}: top level must be an object"


def test_init(run):
    with pytest.raises(RunFileMissing, match="meta.json missing"):
        run.init()
    _mask(run.init_dir, None, kind="init")
    path, meta = run.init()
    assert path == run.init_dir.resolve() and meta["kind"] == "init"


def test_resolve(run, tmp_path, monkeypatch):
    """Run directories are portable: a path stored resolved is used as is, a relative one is found
    from the working directory or from a parent of the run directory."""
    data = tmp_path / "prepared"
    data.mkdir()
    assert run.resolve(str(data)) == data
    assert run.resolve(str(tmp_path / "gone")) is None
    monkeypatch.chdir(run.path)
    assert run.resolve("prepared") == tmp_path / "prepared"  # from a parent of the run directory
    (run.path / "prepared").mkdir()
    assert run.resolve("prepared") == run.path / "prepared"  # the working directory first
    assert run.resolve("nothing") is None


def test_outputs(run):
    assert run.outputs() == [run.config_path]
    run.start_metrics()
    run.checkpoints_dir.mkdir()
    run.write_summary({})
    assert run.outputs() == [run.checkpoints_dir, run.summary_path, run.metrics_path, run.config_path]
    assert all(os.path.dirname(p) == str(run.path) for p in run.outputs())


def test_previous_run_and_resumable(run, tmp_path):
    run.start_metrics()  # a failed start: config.yaml and an empty metrics.jsonl
    assert run.previous_run() == [] and not run.is_resumable()
    run.append_metrics({"step": 1, "loss": 0.5})
    assert run.previous_run() == ["metrics.jsonl"]
    run.checkpoint(4).mkdir(parents=True)  # incomplete: not resumable, but a previous run's output
    run.write_summary({})
    assert run.previous_run() == ["checkpoints", "summary.json", "metrics.jsonl"]
    assert not run.is_resumable()
    _checkpoint(run, 8)
    assert run.is_resumable()
    assert not RunDir(tmp_path / "missing").is_resumable()  # no config.yaml


def test_discard_failed_start(run, tmp_path):
    run.start_metrics()
    run.checkpoint(4).mkdir(parents=True)  # incomplete
    run.discard_failed_start(created=False)
    assert run.path.is_dir() and run.outputs() == []
    fresh = RunDir(tmp_path / "fresh")
    fresh.path.mkdir()
    save_config(RunConfig(), fresh.config_path)
    fresh.discard_failed_start(created=True)  # the start made the directory: it goes too
    assert not fresh.path.exists()
    kept = RunDir(tmp_path / "kept")
    kept.path.mkdir()
    save_config(RunConfig(), kept.config_path)
    _checkpoint(kept, 2)
    kept.discard_failed_start(created=True)  # resumable: kept whole
    assert kept.outputs() == [kept.checkpoints_dir, kept.config_path]
