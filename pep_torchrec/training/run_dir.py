"""The run directory: one class that knows where a run keeps what, and how to read it.

    RUN/config.yaml            the resolved RunConfig (written once, at the start)
    RUN/metrics.jsonl          one JSON record per evaluation / training-loss line, appended
    RUN/summary.json           written last, when the run finished (its presence means "finished")
    RUN/checkpoints/step_N/    DCP checkpoints (`training/checkpoint.py`), complete once
                               trainer_state.json is in
    RUN/init/                  a search's step-0 embedding (the lottery ticket's rewind point)
    RUN/masks/budget_<b>/      a search's (or a pruning control's) masks; meta.json written last

Every reader and writer of these goes through `RunDir`, so there is one rule for each question:

- **config.yaml, unknown keys**: a run's config.yaml was written by this program, so a key this
  version does not know comes from another version (a renamed or removed option). It is dropped
  with one warning naming the file and the keys; a bad value of a known key is still an error.
  User input (configs/*.yaml, CLI overrides) stays strict: `config.load_config` refuses unknown keys.
- **best checkpoint**: summary.json's `best_step` (the checkpoint selected on valid, the one whose
  test metrics summary.json reports), which must be complete. No fallback to another step: a
  caller that wants another checkpoint names its step.
- **mask / init metadata**: `read_meta` is the one parser; its errors are one line naming the file.
- **paths**: a run stores the dataset and mask paths resolved (`train.py`); `resolve` also finds a
  relative one from the working directory or a parent of the run directory, so a moved tree of runs
  still reads. meta.json's `init` may be relative to its mask directory (`../../init`).

Errors are `RunDirError` (a `ConfigError`); a file that is missing is also a `FileNotFoundError`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import typing
from pathlib import Path
from typing import Any

import yaml

from pep_torchrec.config import ConfigError, RunConfig, load_config

logger = logging.getLogger(__name__)

STAGES = ("baseline", "search", "retrain")


class RunDirError(ConfigError):
    """A run directory (or a mask / init directory) cannot be read; the message names the file."""


class RunFileMissing(RunDirError, FileNotFoundError):
    """A file of the run directory is missing."""


def budget_tag(budget: float) -> str:
    """The directory name of a budget's mask: `budget_0.1`."""
    return f"budget_{budget:g}"


def read_json(path: Path) -> Any:
    """A JSON file; invalid JSON is one line naming the file and line."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def read_meta(directory: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """meta.json of a complete mask / init directory (the one parser of mask metadata).

    Args:
        directory: a mask (`masks/budget_*`, a pruning control's) or init directory.
        kind: "mask" or "init" to require that kind; None accepts either.
    Raises:
        RunFileMissing: meta.json missing (the directory is incomplete, or not one).
        RunDirError: invalid JSON, not an object, or another kind.
    """
    path = Path(directory) / "meta.json"
    if not path.is_file():
        raise RunFileMissing(f"{directory}: not a complete mask/init directory (meta.json missing)")
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise RunDirError(f"{path}: top level must be an object")
    if kind is not None and meta.get("kind") != kind:
        article = "an" if kind == "init" else "a"
        raise RunDirError(f"{path}: not {article} {kind} directory (kind {meta.get('kind')!r})")
    return meta


def init_dir_of(mask_dir: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """The init directory a mask's meta.json names (absolute, or relative to the mask directory)."""
    return (Path(mask_dir) / meta["init"]).resolve()


def mask_budget(path: Path) -> float:
    """The budget of a `budget_<b>` directory, from its name."""
    return float(path.name.removeprefix("budget_"))


def list_masks(directory: str | os.PathLike, *, complete: bool = True) -> list[Path]:
    """The `budget_*` mask directories in `directory`, largest budget first (other names last, such
    as an interrupted write's `budget_<b>.tmp`); only the complete masks (meta.json in, not a
    `.tmp`) if `complete`. [] if `directory` does not exist."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob("budget_*") if p.is_dir()]
    if complete:
        found = [p for p in found if (p / "meta.json").is_file() and _budget_key(p) != -math.inf]
    return sorted(found, key=lambda p: (-_budget_key(p), p.name))


def _drop_unknown(data: dict[str, Any], cls: type, prefix: str = "") -> list[str]:
    """Remove keys `cls` (a config dataclass) does not know, recursively; returns their names."""
    hints = typing.get_type_hints(cls)
    dropped = []
    for key in list(data):
        if key not in hints:
            dropped.append(prefix + key)
            del data[key]
        elif isinstance(data[key], dict) and (inner := _dataclass_of(hints[key])) is not None:
            dropped += _drop_unknown(data[key], inner, f"{prefix}{key}.")
    return dropped


def _dataclass_of(hint: Any) -> type | None:
    """The config dataclass a field holds: the field's type, or the dataclass of `X | None`."""
    for tp in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(tp):
            return tp
    return None


class RunDir:
    """One run directory: its paths and its readers (see the module docstring for the rules).

    Args:
        path: the run directory (need not exist yet: a trainer creates it).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ---- paths -------------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def masks_dir(self) -> Path:
        return self.path / "masks"

    @property
    def init_dir(self) -> Path:
        return self.path / "init"

    def checkpoint(self, step: int) -> Path:
        """RUN/checkpoints/step_<8 digits>/ (complete once its trainer_state.json exists)."""
        return self.checkpoints_dir / f"step_{step:08d}"

    def mask_dir(self, budget: float) -> Path:
        return self.masks_dir / budget_tag(budget)

    def require(self) -> RunDir:
        """Self, or an error if the directory does not exist."""
        if not self.path.is_dir():
            raise RunFileMissing(f"{self.path}: run directory not found")
        return self

    # ---- config ------------------------------------------------------------------------------------
    def has_config(self) -> bool:
        return self.config_path.is_file()

    def config_data(self) -> dict[str, Any]:
        """config.yaml as plain data, keys this version does not know dropped with a warning."""
        path = self.config_path
        if not path.is_file():
            raise RunFileMissing(f"{path}: missing (is {self.path} a run directory?)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise RunDirError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
        if not isinstance(data, dict):
            raise RunDirError(f"{path}: top level must be a mapping")
        dropped = _drop_unknown(data, RunConfig)
        if dropped:
            logger.warning(
                "%s: ignoring keys this version does not know: %s", path, ", ".join(sorted(dropped))
            )
        return data

    def config(self) -> RunConfig:
        """The run's resolved config, typed (bad values of known keys are errors naming the file)."""
        data = self.config_data()
        try:
            return load_config(base=data)
        except ConfigError as e:
            raise RunDirError(f"{self.config_path}: {e}") from None

    def stage(self, *, summary: dict[str, Any] | None = None, config: dict[str, Any] | None = None) -> str:
        """baseline / search / retrain: summary.json's, else config.yaml's train.stage (`summary` and
        `config`: those files' contents when the caller has read them already)."""
        summary = self.summary() if summary is None else summary
        config = self.config_data() if config is None else config
        stage = summary.get("stage") or (config.get("train") or {}).get("stage") or "baseline"
        if stage not in STAGES:
            raise RunDirError(f"{self.path}: unknown stage {stage!r} (want baseline, search or retrain)")
        return stage

    # ---- summary and metrics -----------------------------------------------------------------------
    def is_finished(self) -> bool:
        return self.summary_path.is_file()

    def summary(self, *, required: bool = False) -> dict[str, Any]:
        """summary.json; {} while the run is still training, unless `required`."""
        if not self.summary_path.is_file():
            if required:
                raise RunFileMissing(f"{self.summary_path}: missing (has the run finished?)")
            return {}
        summary = read_json(self.summary_path)
        if not isinstance(summary, dict):
            raise RunDirError(f"{self.summary_path}: top level must be an object")
        return summary

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Write summary.json atomically (a reader never sees half of it)."""
        tmp = self.summary_path.with_name(self.summary_path.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, self.summary_path)

    def metrics(self) -> list[dict[str, Any]]:
        """metrics.jsonl, one dict per record in file order; a half-written last line (a run still
        writing) is skipped with a warning."""
        path = self.metrics_path
        if not path.is_file():
            raise RunFileMissing(f"{path}: missing (not a training run, or it has not evaluated yet)")
        lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
        records = []
        for i, (lineno, line) in enumerate(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if i == len(lines) - 1:
                    logger.warning("%s:%d: skipping an incomplete last line (%s)", path, lineno, e.msg)
                    continue
                raise RunDirError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or "step" not in record:
                raise RunDirError(f"{path}:{lineno}: an evaluation record needs a 'step'")
            records.append(record)
        if not records:
            raise RunDirError(f"{path}: no evaluations yet")
        return records

    def start_metrics(self) -> None:
        """An empty metrics.jsonl (a new run)."""
        self.metrics_path.write_text("")

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Drop the records after `step` (a resume continues from that step's checkpoint)."""
        path = self.metrics_path
        lines = path.read_text().splitlines() if path.exists() else []
        kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in kept))

    # ---- checkpoints -------------------------------------------------------------------------------
    def checkpoints(self, *, rank: int = 0, keep: int = 2) -> Any:
        """The run's `CheckpointManager` (imported here: it needs torch, the readers above do not)."""
        from pep_torchrec.training.checkpoint import CheckpointManager

        return CheckpointManager(self.checkpoints_dir, rank=rank, keep=keep)

    def best_step(self) -> int:
        """summary.json's best_step: the step selected on valid."""
        summary = self.summary(required=True)
        if summary.get("best_step") is None:
            raise RunDirError(f"{self.summary_path}: no best_step")
        return int(summary["best_step"])

    def best_checkpoint(self) -> Path:
        """The checkpoint selected on valid; an error naming the file if it is missing or incomplete."""
        step = self.best_step()
        path = self.checkpoint(step)
        if not (path / "trainer_state.json").is_file():
            raise RunFileMissing(
                f"{path}: the best checkpoint (summary.json best_step {step}) is missing or incomplete"
            )
        return path

    # ---- masks and init ----------------------------------------------------------------------------
    def mask_dirs(self, *, complete: bool = True) -> list[Path]:
        """RUN/masks/budget_*, largest budget first; only complete ones (meta.json in) if `complete`."""
        return list_masks(self.masks_dir, complete=complete)

    def mask(self, budget: float) -> Path:
        """RUN/masks/budget_<b>, which must be complete; the error lists the budgets there are."""
        path = self.mask_dir(budget)
        if not (path / "meta.json").is_file():
            have = [p.name for p in self.mask_dirs()]
            raise RunFileMissing(f"{path}: no mask for budget {budget:g} (have {have})")
        return path

    def init(self) -> tuple[Path, dict[str, Any]]:
        """RUN/init (resolved) and its meta.json: a search's step-0 embedding."""
        return self.init_dir.resolve(), read_meta(self.init_dir, "init")

    # ---- paths recorded in the run -----------------------------------------------------------------
    def resolve(self, path: str | os.PathLike) -> Path | None:
        """A path recorded in the run: absolute, else relative to the working directory, else to a
        parent of the run directory (older runs recorded paths relative to where training was
        launched). None if not found."""
        p = Path(path)
        if p.is_absolute():
            return p if p.exists() else None
        for base in (Path.cwd(), *self.path.resolve().parents):
            if (base / p).exists():
                return base / p
        return None

    # ---- starting a run here ------------------------------------------------------------------------
    def outputs(self) -> list[Path]:
        """What a run leaves in its directory, those that exist: what `--overwrite` replaces."""
        paths = (self.checkpoints_dir, self.masks_dir, self.init_dir, self.summary_path, self.metrics_path,
                 self.config_path)  # fmt: skip
        return [p for p in paths if p.exists()]

    def is_resumable(self) -> bool:
        """A run to continue: its config.yaml and a complete checkpoint."""
        return self.has_config() and self.checkpoints().latest() is not None

    def previous_run(self) -> list[str]:
        """The names of what a previous run left that a new run would mix with: checkpoints, masks,
        summary, a non-empty metrics.jsonl. A start that failed before training leaves only
        config.yaml and an empty metrics.jsonl: nothing to lose, so that is not a previous run."""
        found = [p.name for p in (self.checkpoints_dir, self.masks_dir, self.summary_path) if p.exists()]
        if self.metrics_path.is_file() and self.metrics_path.stat().st_size > 0:
            found.append(self.metrics_path.name)
        return found

    def discard_failed_start(self, *, created: bool) -> None:
        """A new run that failed before its first complete checkpoint cannot be resumed: remove what
        it wrote (and the directory, if this start `created` it), so the next start finds nothing
        stale. A resumable run is kept whole."""
        if self.checkpoints().latest() is not None:
            return
        remove_paths(self.outputs())
        if created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()


def remove_paths(paths: list[Path]) -> None:
    """Remove each path, directory or file, that exists."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _budget_key(path: Path) -> float:
    try:
        return mask_budget(path)
    except ValueError:
        return -math.inf
