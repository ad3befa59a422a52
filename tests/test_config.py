"""Config tree: precedence, overrides, and errors that name the key and file."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from pep_torchrec.config import (
    ConfigError,
    RunConfig,
    env_values,
    from_dict,
    load_config,
    save_config,
    to_dict,
)
from pep_torchrec.data.synthetic import SyntheticConfig

REPO = Path(__file__).resolve().parents[1]


def test_defaults_file_and_overrides_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\n  seed: 7\nmodel:\n  name: deepfm\n")
    cfg = load_config(
        path, ["train.epochs=5", "sharding.types=[table_wise,row_wise]", "model.options={dropout: 0.2}"]
    )
    assert cfg.train.epochs == 5  # CLI beats file
    assert cfg.train.seed == 7  # file beats default
    assert cfg.model.name == "deepfm"
    assert cfg.data.batch_size == RunConfig().data.batch_size  # untouched default
    assert cfg.sharding.types == ["table_wise", "row_wise"]
    assert cfg.model.options == {"dropout": 0.2}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", "unknown key train.epoch"),
        ("nope.x=1", "unknown key nope"),
        ("train.epochs=abc", "train.epochs: expected an integer"),
        ("train.progress=3", "train.progress: expected true/false"),
        ("data.batch_size=1.5", "data.batch_size: expected an integer"),
        ("sharding.types=row_wise", "sharding.types: expected a list"),
        ("train.epochs", "expected key=value"),
        # Values the types admit but the run cannot use: refused where the config is parsed.
        ("model.name=fmm", "model.name: 'fmm' is not one of"),
        ("data.batch_size=0", "data.batch_size: must be at least 1, got 0"),
        ("model.embedding_dim=-4", "model.embedding_dim: must be at least 1"),
        ("pep.budgets=[0.1,1.5]", r"pep.budgets: 1.5 is not a share of the embedding in \(0, 1\)"),
        ("pep.budgets=[0]", r"pep.budgets: 0.0 is not a share"),
        ("pep.granularity=row_dim", r"pep.granularity: unknown PEP granularity 'row_dim'; choose one of \("),
        # data.synthetic is the generator's typed config: refused at parse time, not in prepare.
        ("data.synthetic.rows=abc", "data.synthetic.rows: expected an integer, got 'abc'"),
        ("data.synthetic.rowz=5", r"unknown key data.synthetic.rowz \(known keys of data.synthetic: "),
        ("data.synthetic.cardinalities=[5]", "unknown key data.synthetic.cardinalities"),  # derived
        ("data.synthetic.rows=-1", "data.synthetic: rows must be >= 0, got -1"),
        ("data.synthetic.cardinality=[10,x]", r"data.synthetic.cardinality\[1\]: expected an integer"),
        ("data.synthetic.cardinality=[10,20]", "data.synthetic: cardinality: 2 values for 26 tables"),
        ("data.synthetic.cardinality=ten", "data.synthetic.cardinality: expected an integer, got 'ten' or"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_granularity_stored_by_its_canonical_name():
    """Masks and artifacts record `cfg.pep.granularity`: one spelling whatever the user typed."""
    assert load_config(None, ["pep.granularity=Feature-Dim"]).pep.granularity == "feature_dim"
    assert load_config(None, ["pep.granularity=field dim"]).pep.granularity == "field_dim"


def test_bad_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochz: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key train\.epochz"):
        load_config(path)
    path.write_text("train: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "synthetic", [None, "data.synthetic={rows: 500, num_sparse: 2, cardinality: [5, 7]}"]
)
def test_saved_config_round_trips(tmp_path, synthetic):
    cfg = load_config(
        None, ["train.max_steps=10", "model.embedding_dim=8", *([synthetic] if synthetic else [])]
    )
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert (again.data.synthetic is None) == (synthetic is None)


def test_synthetic_is_the_generators_typed_config():
    assert RunConfig().data.synthetic is None  # no generation unless asked
    cfg = load_config(REPO / "configs" / "debug_cpu.yaml", ["data.synthetic.rows=6000"])
    assert cfg.data.synthetic == SyntheticConfig(
        rows=6000, num_sparse=8, num_dense=4, cardinality=1000, seed=0
    )
    assert load_config(None, ["data.synthetic.rows=10"]).data.synthetic == SyntheticConfig(rows=10)
    assert load_config(None, ["data.synthetic={}"]).data.synthetic is None  # {}: none, as before
    assert load_config(REPO / "configs" / "debug_cpu.yaml", ["data.synthetic=null"]).data.synthetic is None


@pytest.mark.parametrize(
    ("synthetic", "expected"),
    [
        ({}, None),  # the default then: no generation
        ({"rows": 20000, "num_sparse": 8, "cardinality": [3] * 8, "seed": 0},
         SyntheticConfig(rows=20000, num_sparse=8, cardinality=(3,) * 8, seed=0)),
    ],
)  # fmt: skip
def test_run_dirs_from_before_typed_synthetic_still_load(tmp_path, synthetic, expected):
    """A config.yaml written when data.synthetic was a plain mapping (the whole tree, as
    `save_config` wrote it then) loads; resuming generates what it generated then."""
    from pep_torchrec.training.run_dir import RunDir

    old = dataclasses.asdict(RunConfig())
    old["data"]["synthetic"] = synthetic
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    assert RunDir(tmp_path).config().data.synthetic == expected


def test_ensure_dataset_generates_from_the_typed_config(tmp_path, monkeypatch):
    """Every field reaches the generator (seed and a per-table cardinality included); None makes nothing."""
    import torch

    from pep_torchrec.data.schema import Schema
    from pep_torchrec.distributed.env import DistEnv
    from pep_torchrec.training import trainer

    monkeypatch.setattr(trainer.dist, "barrier", lambda: None)  # one rank: nothing to wait for
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"), "gloo", owns_process_group=False)
    synthetic = SyntheticConfig(
        rows=300, num_sparse=2, num_dense=1, cardinality=(5, 7), seed=3, zipf_exponent=1.3
    )
    trainer.ensure_dataset(str(tmp_path / "data"), synthetic, env)
    assert Schema.load(tmp_path / "data").source["params"] == synthetic.params()
    trainer.ensure_dataset(str(tmp_path / "none"), None, env)
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    load_config(path)
    assert isinstance(yaml.safe_load(path.read_text()), dict)


def test_model_names_are_the_registered_models():
    from pep_torchrec.config import MODEL_NAMES
    from pep_torchrec.models import MODELS

    assert set(MODEL_NAMES) == set(MODELS)


def test_bad_value_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name: fmm\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: model\.name: 'fmm'"):
        load_config(path)


@dataclasses.dataclass
class _Service:
    name: str
    port: int = 8080
    ratio: float | None = None
    verbose: bool = False
    token: str | None = None
    sizes: list[int] = dataclasses.field(default_factory=list)
    shape: tuple[int, ...] = (1,)


def test_env_values_reads_prefixed_variables_by_field_type():
    environ = {"SVC_PORT": "9000", "SVC_RATIO": "null", "SVC_VERBOSE": "1", "SVC_TOKEN": "007",
               "SVC_SIZES": "[1, 2]", "SVC_SHAPE": "[3, 4]", "OTHER_PORT": "x"}  # fmt: skip
    values = env_values(_Service, "SVC_", environ)
    assert values == {
        "port": 9000,
        "ratio": None,
        "verbose": True,
        "token": "007",
        "sizes": [1, 2],
        "shape": (3, 4),
    }
    assert from_dict(_Service, {"name": "n", **values}) == _Service(
        "n", 9000, None, True, "007", [1, 2], (3, 4)
    )
    assert env_values(_Service, "SVC_", {}) == {}


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"SVC_PORT": "abc"}, "SVC_PORT='abc': expected an integer"),
        ({"SVC_PORT": ""}, "SVC_PORT='': null is not allowed"),
        ({"SVC_VERBOSE": "2"}, "SVC_VERBOSE='2': expected true/false"),
        ({"SVC_SIZES": "[1, x]"}, r"SVC_SIZES='\[1, x\]'\[1\]: expected an integer"),
        ({"SVC_SIZES": "[1"}, r"SVC_SIZES='\[1': cannot parse"),
        ({"SVC_PROT": "1"}, "unknown variable SVC_PROT .known: SVC_NAME, SVC_PORT, "),
    ],
)
def test_env_values_errors_name_the_variable(environ, message):
    with pytest.raises(ConfigError, match=message):
        env_values(_Service, "SVC_", environ)


def test_from_dict_names_a_missing_key_and_to_dict_inverts_it():
    with pytest.raises(ConfigError, match="missing key name"):
        from_dict(_Service, {"port": 1})
    svc = _Service("n", shape=(2, 3))
    assert to_dict(svc)["shape"] == [2, 3] and from_dict(_Service, to_dict(svc)) == svc
