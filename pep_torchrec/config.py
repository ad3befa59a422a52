"""One typed config tree for every run, and the machinery every config of the project is built with.

Precedence: command line (`--set a.b=value`, `--data`, `--run-dir`) > YAML file > dataclass defaults.
Unknown keys and values of the wrong type are errors that name the key (and the file).
YAML in `configs/` only serialises these dataclasses; the resolved config is saved in the run directory.

The machinery (`from_dict`, `env_values`, `to_dict`) is generic over dataclasses: training's
`RunConfig`, dataset specs (`pep_torchrec/data/spec.py`) and the service's `Settings`
(`pep_torchrec/serving/app.py`, from PEP_SERVE_<FIELD> variables and flags) are built with it.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pep_torchrec.data.synthetic import SyntheticConfig
from pep_torchrec.utils.errors import UserError


class ConfigError(UserError):
    """A config file or override is invalid; the message names the key (and file)."""


MODEL_NAMES = ("fm", "deepfm", "autoint", "dlrm")
"""`model.name` choices: the keys of `pep_torchrec.models.MODELS` (tests/test_config.py keeps them
equal; the config, at the bottom of the package, does not import the models)."""


GRANULARITIES = ("global", "dimension", "field", "field_dim", "feature", "feature_dim")
"""`pep.granularity` choices: where the thresholds s live (one, per column, per table, per table and
column, per row, per element)."""


def canonical_granularity(name: str) -> str:
    """`name` as one of `GRANULARITIES`. One concept, one name each: no aliases. Case and '-' / ' '
    for '_' are forgiven, a spelling rule that never maps one word onto another (`Feature-Dim` is
    `feature_dim`).

    Raises:
        ConfigError (a ValueError): naming the bad value and the choices.
    """
    if not isinstance(name, str):
        raise ConfigError(f"PEP granularity must be a string, got {name!r}; choose one of {GRANULARITIES}")
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    if key not in GRANULARITIES:
        raise ConfigError(f"unknown PEP granularity {name!r}; choose one of {GRANULARITIES}")
    return key


@dataclass
class DataConfig:
    path: str = ""
    """Prepared dataset directory (`pep-torchrec data prepare --out`); `--data` sets it."""
    batch_size: int = 1024
    """Global training batch size (split evenly across ranks; must be divisible by the world size)."""
    eval_batch_size: int = 8192
    """Global evaluation batch size."""
    shuffle_buffer_row_groups: int = 8
    """Parquet row groups shuffled together per rank (bounded-memory shuffle)."""
    prefetch: int = 4
    """Batches decoded ahead by the loader's background thread (0 = synchronous)."""
    max_train_rows: int | None = None
    """Use only the first N training rows (smoke tests)."""
    synthetic: SyntheticConfig | None = None
    """If set and `path` holds no prepared dataset yet, rank 0 first generates the synthetic dataset
    there with these generator options (the fields of `pep_torchrec.data.synthetic.SyntheticConfig`,
    e.g. {rows: 20000, cardinality: 1000}; `seed` is also the split seed); other ranks wait. null
    (or {}, as config.yaml files written before this was typed hold) generates nothing."""


@dataclass
class ModelConfig:
    name: str = "fm"
    """One of fm, deepfm, autoint, dlrm."""
    embedding_dim: int = 16
    """Width of every field's embedding (the paper: 32 MovieLens, 24 Criteo/Avazu)."""
    init_std: float | None = None
    """Embedding init N(0, init_std²); null keeps TorchRec's uniform ±sqrt(1/num_embeddings)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Model-specific hyper-parameters passed to `models.build_model` (e.g. mlp_dims, dropout)."""


@dataclass
class EmbeddingOptimizerConfig:
    name: str = "adagrad"
    """Fused TBE optimizer: sgd, adagrad (element-wise), rowwise_adagrad, adam (GPU only), lamb (GPU only)."""
    lr: float = 0.05
    """Learning rate of the embedding tables."""
    eps: float = 1e-8
    """Epsilon of adaptive optimizers."""
    weight_decay: float = 0.0
    """L2 weight decay applied by the fused optimizer to looked-up rows."""


@dataclass
class DenseOptimizerConfig:
    name: str = "adam"
    """torch.optim class for the non-embedding parameters: adam, adamw, sgd, adagrad."""
    lr: float = 1e-3
    """Learning rate of the dense parameters."""
    weight_decay: float = 0.0
    """Weight decay of the dense parameters."""


@dataclass
class OptimConfig:
    embedding: EmbeddingOptimizerConfig = field(default_factory=EmbeddingOptimizerConfig)
    """Fused optimizer of the sharded embedding tables."""
    dense: DenseOptimizerConfig = field(default_factory=DenseOptimizerConfig)
    """Optimizer of everything else (MLPs, attention, linear terms, bias)."""


@dataclass
class ShardingConfig:
    types: list[str] = field(default_factory=list)
    """Sharding types the planner may use for every table (table_wise, row_wise, column_wise,
    table_row_wise, data_parallel); empty = TorchRec's default choice."""
    compute_kernel: str = "fused"
    """Embedding compute kernel: fused (optimizer fused into backward) or dense."""
    min_partition: int | None = None
    """Smallest column-wise shard width (TorchRec's default when unset)."""
    dry_run_world_size: int = 16
    """World size `--dry-run` plans for."""
    dry_run_local_world_size: int = 8
    """Ranks per node `--dry-run` assumes."""
    hbm_gb: float = 80.0
    """Per-rank accelerator memory the planner assumes for `--dry-run` on cuda topologies."""


@dataclass
class PEPConfig:
    granularity: str = "feature_dim"
    """Threshold granularity: global, dimension, field, field_dim, feature, feature_dim."""
    s0: float = -15.0
    """Initial threshold logit s (the paper: -15 MovieLens, -150 Criteo/Avazu)."""
    gk: float = 1.0
    """Threshold scale: g(s) = gk * sigmoid(s)."""
    s_decay: float = 0.0
    """L2 pull of s towards 0 added to its gradient where rows are looked up (the authors' weight decay)."""
    s_push: float = 0.0
    """Constant upward force on s added (negated) to its gradient per looked-up row."""
    s_optimizer: str = "fused"
    """Who updates s (granularity feature / feature_dim): `fused`, the table's TBE optimizer with v
    (element-wise Adagrad normalises s's gradient away: |v| decides what is pruned), or `sgd`, its
    own step on the looked-up rows, normalised per table, so the learned s decide the order
    (pep_torchrec/distributed/s_optimizer.py; benchmarks/research/issue10)."""
    s_lr: float = 0.01
    """s_optimizer=sgd: learning rate of s (unit-free with s_norm=table)."""
    s_norm: str = "table"
    """s_optimizer=sgd: `table` divides the step by the RMS (EMA) of the table's s-gradients,
    `none` is plain SGD."""
    gk_growth: float = 0.0
    """Open-loop pressure instead of the controller (target_epochs = 0): gk is multiplied by
    gk_growth per step, applied at each eval (no whole-table work to set it)."""
    target_epochs: float = 0.0
    """Controller: bring the kept share down to `target_floor` over this many epochs along a
    geometric schedule, setting gk at every eval (or every `control_every` steps) so the kept count
    is exactly on it (0 = no controller: fixed gk, or gk_growth)."""
    target_floor: float = 0.0
    """Kept share the schedule ends at (0 = 0.8 x the smallest budget)."""
    control_every: int = 0
    """Steps between controller updates: 0 = at every eval, else a multiple of train.eval_every
    (each update ranks the whole table: never more often than evals)."""
    budgets: list[float] = field(default_factory=lambda: [0.2, 0.1, 0.05, 0.02])
    """Search: save a mask keeping exactly this many elements when the kept count first reaches it
    (<= 1: share of embedding_params_total; > 1: absolute count)."""
    mask_layout: str = "elementwise"
    """Search masks: `elementwise` keeps the top elements where they are; `aligned` keeps each row's
    kept count (its learned embedding size) but in one column order shared by all rows, so two
    features' kept dimensions overlap in dot-product interactions (see pep_torchrec/pep/masks.py)."""
    min_row_dims: int = 0
    """Search masks: every row keeps at least this many elements (its best ones), or
    ⌊budget / rows⌋ where a budget cannot afford more."""
    max_row_dims: int = 0
    """Search masks: no row keeps more than this many elements (0 = embedding_dim)."""
    stop_after_budgets: bool = True
    """Search: stop once every budget has its snapshot."""
    mask: str = ""
    """Retrain: the mask directory (a search's masks/budget_*; `--mask` sets it)."""
    reinit: bool = False
    """Retrain: start from a fresh initialisation instead of the mask's init (lottery-ticket rewind)."""


@dataclass
class TrainConfig:
    stage: str = "baseline"
    """baseline (plain model), search (PEP thresholds learn, masks saved at budgets) or retrain
    (embedding rewound to the mask's init x mask, thresholds off)."""
    seed: int = 0
    """Seeds model init and data order."""
    epochs: int = 1
    """Maximum epochs."""
    max_steps: int | None = None
    """Stop after this many steps (overrides epochs when smaller)."""
    eval_every: int = 0
    """Evaluate on valid every N steps (0 = once per epoch)."""
    patience: int = 0
    """Early stopping: stop after this many evals without a better valid AUC (0 = off)."""
    checkpoint_every: int = 0
    """Save a DCP checkpoint every N steps (0 = only at evals)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (the best-on-valid one is always kept)."""
    log_every: int = 50
    """Steps between training-loss log lines in metrics.jsonl."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu or cuda."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    num_threads: int = 0
    """Intra-op threads per process; 0 = OMP_NUM_THREADS if set, else (cores per rank) - 1, leaving a
    core to the data loader (on a 2-core machine 2 OpenMP threads next to the loader ran 4x slower
    than 1, because OpenMP threads spin while they wait)."""


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    pep: PEPConfig = field(default_factory=PEPConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------------------------------
# Building a config from plain data, with errors that name the key.


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """`X | None` → (X, True); `X | Y | None` → (X | Y, True); anything else → (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return (args[0] if len(args) == 1 else functools.reduce(operator.or_, args)), True
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: null is not allowed (expected {getattr(tp, '__name__', tp)})")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # built already (`env_values` hands out typed values)
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, key)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, list(typing.get_args(tp)), key)
    if origin in (list, tuple):
        return _coerce_sequence(value, tp, key)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _coerce_sequence(value: Any, tp: Any, key: str) -> list | tuple:
    """`list[X]` from a list; `tuple[X, ...]` from a list (YAML has no tuples) or a tuple."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = args or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if len(args) != 2 or args[1] is not Ellipsis:
        raise ConfigError(f"{key}: unsupported field type {tp} (only tuple[X, ...])")
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))


def _coerce_union(value: Any, arms: list[Any], key: str) -> Any:
    """The first arm of `X | Y` that takes `value`. If none does: the error of an arm that took the
    value's shape but not one of its items (`key[1]: ...`), else every arm's expectation."""
    errors = []
    for arm in arms:
        try:
            return _coerce(value, arm, key)
        except ConfigError as e:
            errors.append(str(e))
    deeper = [e for e in errors if not e.startswith(f"{key}: ")]
    if deeper:
        raise ConfigError(deeper[0])
    raise ConfigError(f"{key}: " + " or ".join(e.removeprefix(f"{key}: ") for e in errors))


def _init_fields(cls: type) -> list[dataclasses.Field]:
    """The fields a config sets (a field with init=False is derived by the class itself)."""
    return [f for f in dataclasses.fields(cls) if f.init]


def from_dict(cls: type, obj: dict[str, Any], prefix: str = "") -> Any:
    """The dataclass `cls` built from plain data, every value checked against its field's type.

    The one typed machinery of the project: training's `RunConfig`, dataset specs and the service's
    `Settings` are built with it. Raises ConfigError naming the dotted key (`prefix` first) and the
    known keys; a ValueError of the class's own checks (`__post_init__`) becomes a ConfigError
    naming `prefix`.
    """
    hints = typing.get_type_hints(cls)
    fields = _init_fields(cls)
    names = {f.name for f in fields}
    where = f"{prefix}." if prefix else ""
    unknown = sorted(set(obj) - names)
    if unknown:
        raise ConfigError(
            f"unknown key {where}{unknown[0]} (known keys of {prefix or 'the config'}: {sorted(names)})"
        )
    for f in fields:
        if (
            f.name not in obj
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            raise ConfigError(f"missing key {where}{f.name}")
    kwargs = {}
    for name, value in obj.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    # Nested dataclasses not mentioned keep their defaults; given ones are merged field by field.
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        if not prefix:
            raise ConfigError(str(e)) from None
        # A class that labels its own errors (`synthetic: rows must be ...`) gets the dotted key instead.
        message = str(e).removeprefix(f"{prefix.rsplit('.', 1)[-1]}: ")
        raise ConfigError(f"{prefix}: {message}") from None


def env_values(cls: type, prefix: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The fields of the dataclass `cls` that environment variables `<prefix><FIELD>` set, typed.

    A value is YAML (`8080`, `true`, `[1, 2]`), checked against its field's type; a string field
    takes the text verbatim (a token stays the text it is), a bool field also 1 and 0 (the shell's
    idiom). Build the config with `from_dict(cls, values)` after laying other layers (flags) over it.

    Args:
        cls: a config dataclass.
        prefix: the variables' common start, e.g. "PEP_SERVE_" (field `port` → PEP_SERVE_PORT).
        environ: the environment to read (default `os.environ`).
    Raises:
        ConfigError naming the variable and its value (`PEP_SERVE_PORT='abc': expected an
        integer, ...`), or a variable with the prefix that names no field.
    """
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    known = {f"{prefix}{f.name.upper()}": f.name for f in _init_fields(cls)}
    unknown = sorted(var for var in environ if var.startswith(prefix) and var not in known)
    if unknown:
        raise ConfigError(f"unknown variable {unknown[0]} (known: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for var, name in known.items():
        raw = environ.get(var)
        if raw is not None:
            values[name] = _env_value(raw, hints[name], f"{var}={raw!r}")
    return values


def _env_value(raw: str, tp: Any, key: str) -> Any:
    inner, _ = _strip_optional(tp)
    if inner is str:
        return raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse ({getattr(e, 'problem', None) or e})") from None
    if inner is bool and type(value) is int and value in (0, 1):
        return bool(value)
    return _coerce(value, tp, key)


def to_dict(cfg: Any) -> Any:
    """Plain data of a config (the fields `from_dict` takes; tuples as lists): what YAML stores and
    `from_dict` reads back."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in _init_fields(type(cfg))}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` → (["a", "b", "c"], YAML-parsed value). Lists are written `[x,y]`."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r} ({e})") from e
    return key.split("."), value


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def _run_config(data: dict[str, Any]) -> RunConfig:
    """`from_dict(RunConfig, data)`, reading config.yaml files of runs from before `data.synthetic`
    was typed: there `synthetic: {}` (its default then) meant no synthetic dataset, as null does now."""
    section = data.get("data")
    if isinstance(section, dict) and section.get("synthetic") == {}:
        data = {**data, "data": {**section, "synthetic": None}}
    return from_dict(RunConfig, data)


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> RunConfig:
    """Build a RunConfig from defaults, an optional YAML file and dotted overrides.

    Args:
        path: YAML file whose mapping mirrors RunConfig.
        overrides: `key=value` strings applied after the file.
        base: plain-data settings applied between defaults and the file (used by resume).
    Raises:
        ConfigError naming the file and the key.
    """
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}{line}: invalid YAML ({getattr(e, 'problem', e)})") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        # Validate the file on its own first so errors name the file.
        try:
            check_values(_run_config(loaded))
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from e
        data = _merge(data, loaded)
    for text in overrides or []:
        keys, value = parse_override(text)
        data = _merge(data, _nest(keys, value))
        try:
            check_values(_run_config(data))
        except ConfigError as e:
            raise ConfigError(f"--set {text}: {e}") from e
    cfg = _run_config(data)
    check_values(cfg)
    return cfg


def check_values(cfg: RunConfig) -> None:
    """The checks types cannot express (names, sizes, shares), where the config is parsed: a bad
    value fails at start-up with its key, not as a traceback from inside a rank. Stores
    `pep.granularity` by its canonical name, the one masks and artifacts record."""
    try:
        cfg.pep.granularity = canonical_granularity(cfg.pep.granularity)
    except ConfigError as e:
        raise ConfigError(f"pep.granularity: {e}") from None
    if cfg.model.name not in MODEL_NAMES:
        raise ConfigError(f"model.name: {cfg.model.name!r} is not one of {list(MODEL_NAMES)}")
    for key, value in (("model.embedding_dim", cfg.model.embedding_dim), ("data.batch_size", cfg.data.batch_size),
                       ("data.eval_batch_size", cfg.data.eval_batch_size), ("train.epochs", cfg.train.epochs)):  # fmt: skip
        if value < 1:
            raise ConfigError(f"{key}: must be at least 1, got {value}")
    pep = cfg.pep
    if pep.s_optimizer not in ("fused", "sgd"):
        raise ConfigError(f"pep.s_optimizer: {pep.s_optimizer!r} is not one of ['fused', 'sgd']")
    if pep.s_norm not in ("table", "none"):
        raise ConfigError(f"pep.s_norm: {pep.s_norm!r} is not one of ['table', 'none']")
    if pep.s_optimizer == "sgd" and (pep.s_decay or pep.s_push):
        raise ConfigError(
            "pep.s_decay / pep.s_push act through the fused optimizer: with pep.s_optimizer=sgd "
            "the pressure comes from gk (pep.target_epochs or pep.gk_growth)"
        )
    if not pep.s_lr >= 0:
        raise ConfigError(f"pep.s_lr: must be >= 0, got {pep.s_lr}")
    if pep.gk_growth and not pep.gk_growth >= 1.0:
        raise ConfigError(f"pep.gk_growth: a per-step factor >= 1 (0 = off), got {pep.gk_growth}")
    if pep.gk_growth and pep.target_epochs > 0:
        raise ConfigError("pep.gk_growth and pep.target_epochs both set gk: choose one")
    every = cfg.train.eval_every
    if pep.control_every < 0 or (pep.control_every and every > 0 and pep.control_every % every):
        raise ConfigError(
            f"pep.control_every: {pep.control_every} would rank the whole table between evals "
            f"(train.eval_every={every}); use 0 (at every eval) or a multiple of train.eval_every"
        )
    for budget in cfg.pep.budgets:
        if not 0.0 < budget < 1.0:
            raise ConfigError(
                f"pep.budgets: {budget} is not a share of the embedding in (0, 1) (0.1 keeps 10 %)"
            )


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, p)
