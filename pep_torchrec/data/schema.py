"""The prepared-dataset format: the contract between the pipelines, the loader, training and serving.

A prepared dataset is a directory::

    DIR/schema.json            this module's `Schema`, as JSON
    DIR/report.json            what the preparation read, kept and rejected (per reason)
    DIR/vocab.parquet          columns feature (string), value (string), id (int64), count (int64): the
                               raw value → id map of every sparse feature, with each value's frequency
                               (absent for the synthetic dataset, whose raw values *are* ids)
    DIR/join_<i>.parquet       (`data prepare --spec` with joins) side table i's key and the columns
                               the fields read, as joined: what the service joins (schema extra.joins)
    DIR/train/part-00000.parquet, DIR/valid/..., DIR/test/...

Parquet columns of every split file:
    label            int8, 0 or 1
    <sparse name>    int64 id in [0, cardinality) for a single-hot feature,
                     list<int64> for a multi-hot one (an empty list is an empty bag)
    <dense name>     float32, already transformed (e.g. log1p), missing → 0

Id 0 of every sparse feature is its OOV id: values seen fewer than `min_count` times in the input
(all splits, as the paper counts them), values unseen at serving time and missing values that were
not frequent enough all map to it.
Ids 1..cardinality-1 are the kept values, most frequent first (ties broken by the raw value's string).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pep_torchrec.utils.errors import UserError

FORMAT_VERSION = 1
MAX_VALUE_CHARS = 1024
"""The longest raw categorical value: longer ones are rejected by `data prepare` (`value_too_long`)
and by the service (422), so both sides agree on what can be a vocabulary entry."""
SPLITS = ("train", "valid", "test")
OOV_ID = 0


class SchemaError(UserError):
    """A prepared dataset's schema.json is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class SparseFeature:
    """One categorical feature, i.e. one embedding table.

    Attributes:
        name: column name in Parquet and feature/table name in TorchRec.
        cardinality: number of ids including the OOV id 0 (the table's `num_embeddings`).
        multi_hot: True when the column is list<int64> (a bag of ids per example).
        transform: how a raw value becomes the vocabulary key: "none" (the raw string) or
            "criteo_log_bucket" (integers v > 2 become str(int(log(v)**2)), others str(v)).
    """

    name: str
    cardinality: int
    multi_hot: bool = False
    transform: str = "none"


@dataclass(frozen=True)
class SplitInfo:
    """Rows and files of one split; file paths are relative to the dataset directory."""

    rows: int
    files: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Schema:
    """Everything a consumer needs to know about a prepared dataset.

    Attributes:
        dataset: "synthetic", "criteo", "avazu" or "movielens".
        sparse_features: one entry per embedding table, in model order.
        dense_features: float32 column names, in model order (may be empty).
        splits: "train"/"valid"/"test" → SplitInfo.
        label: name of the label column.
        min_count: frequency threshold used to build the vocabulary.
        split_method: "random" (seeded) or "temporal".
        seed: split / generator seed.
        source: provenance: {"files": [{"path", "bytes", "sha256"}], ...} or generator parameters.
        extra: dataset-specific facts (e.g. the synthetic generator's planted signal fields).
    """

    dataset: str
    sparse_features: list[SparseFeature]
    dense_features: list[str]
    splits: dict[str, SplitInfo]
    label: str = "label"
    min_count: int = 1
    split_method: str = "random"
    seed: int = 0
    source: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.sparse_features]

    @property
    def cardinalities(self) -> list[int]:
        return [f.cardinality for f in self.sparse_features]

    def feature(self, name: str) -> SparseFeature:
        for f in self.sparse_features:
            if f.name == name:
                return f
        raise KeyError(f"no sparse feature named {name!r}; have {self.feature_names}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str = "schema") -> Schema:
        try:
            version = obj.get("format_version", FORMAT_VERSION)
            if version != FORMAT_VERSION:
                raise SchemaError(
                    f"{where}: format_version {version} is not supported (want {FORMAT_VERSION})"
                )
            sparse = [SparseFeature(**f) for f in obj["sparse_features"]]
            splits = {k: SplitInfo(**v) for k, v in obj["splits"].items()}
            rest = {k: v for k, v in obj.items() if k not in ("sparse_features", "splits")}
            schema = cls(sparse_features=sparse, splits=splits, **rest)
        except SchemaError:
            raise
        except (KeyError, TypeError) as e:
            raise SchemaError(f"{where}: malformed schema ({type(e).__name__}: {e})") from e
        schema.validate(where)
        return schema

    def validate(self, where: str = "schema") -> None:
        names = self.feature_names + list(self.dense_features) + [self.label]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise SchemaError(f"{where}: duplicate column names {sorted(dup)}")
        for f in self.sparse_features:
            if f.cardinality < 1:
                raise SchemaError(f"{where}: sparse feature {f.name!r} has cardinality {f.cardinality} < 1")
        missing = [s for s in SPLITS if s not in self.splits]
        if missing:
            raise SchemaError(f"{where}: splits {missing} missing")

    def save(self, directory: str | os.PathLike) -> Path:
        """Write DIR/schema.json atomically (temporary name, then rename)."""
        path = Path(directory) / "schema.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Schema:
        path = Path(directory) / "schema.json"
        if not path.is_file():
            raise SchemaError(
                f"{path}: not found (is {directory} a prepared dataset? run `pep-torchrec data prepare`)"
            )
        try:
            obj = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SchemaError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
        return cls.from_json(obj, where=str(path))
