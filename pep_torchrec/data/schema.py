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

Parquet columns of every split file (`arrow_schema` writes them, `check_parquet_file` and
`check_table` hold a file to them when it is read):
    label            int8, 0 or 1
    <sparse name>    int64 id in [0, cardinality) for a single-hot feature,
                     list<int64> for a multi-hot one (an empty list is an empty bag)
    <dense name>     float32, already transformed (e.g. log1p), missing → 0
Readers accept any integer type for label and ids and any float type for dense columns, and ignore
extra columns; every schema column must be there, even one a reader skips.

Id 0 of every sparse feature is its OOV id: values seen fewer than `min_count` times in the input
(all splits, as the paper counts them), values unseen at serving time and missing values that were
not frequent enough all map to it.
Ids 1..cardinality-1 are the kept values, most frequent first (ties broken by the raw value's string).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

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

    def arrow_schema(self) -> pa.Schema:
        """The Arrow schema the split files are written with (`arrow_schema`)."""
        return arrow_schema(self.sparse_features, self.dense_features, self.label)

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


# ---------------------------------------------------------------------------------------------------
# The Parquet contract: what `data prepare` writes and what the loader checks


def arrow_schema(
    sparse_features: Sequence[SparseFeature], dense_features: Sequence[str], label: str = "label"
) -> pa.Schema:
    """The columns of a split file: label int8, ids int64 (list<int64> when multi-hot), dense float32.

    A function of the features alone, so the writers can open the split files before the rest of
    the `Schema` (row counts, files) is known.
    """
    fields = [pa.field(label, pa.int8())]
    for f in sparse_features:
        fields.append(pa.field(f.name, pa.list_(pa.int64()) if f.multi_hot else pa.int64()))
    fields += [pa.field(name, pa.float32()) for name in dense_features]
    return pa.schema(fields)


def _is_integer_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type)


def _expected_columns(schema: Schema) -> list[tuple[str, str, Callable[[pa.DataType], bool]]]:
    """(column, what it must hold, type check) of every column the schema names."""
    expected: list[tuple[str, str, Callable[[pa.DataType], bool]]] = [
        (
            schema.label,
            "an integer label (int8 0/1)",
            lambda t: pa.types.is_integer(t) or pa.types.is_boolean(t),
        )
    ]
    for f in schema.sparse_features:
        if f.multi_hot:
            expected.append((f.name, "list<int64> ids (multi-hot)", _is_integer_list))
        else:
            expected.append((f.name, "int64 ids (single-hot)", pa.types.is_integer))
    for name in schema.dense_features:
        expected.append((name, "float32 (dense)", pa.types.is_floating))
    return expected


def check_parquet_file(schema: Schema, path: Path) -> pq.FileMetaData:
    """Check a split file's columns (names, types) and its statistics; return its metadata.

    Raises:
        ValueError: the file is missing or unreadable, a column is missing or of the wrong type, or
            the Parquet statistics show ids out of [0, cardinality) or labels outside {0, 1}.
    """
    if not path.is_file():
        raise ValueError(f"{path}: split file listed in schema.json is missing")
    try:
        with pq.ParquetFile(path) as pf:
            file_schema = pf.schema_arrow
            metadata = pf.metadata
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from e

    # Every schema column must be present, even dense ones a reader is told to skip: the file must
    # match the contract, not just this reader's current needs. Extra columns are ignored.
    for name, want, ok in _expected_columns(schema):
        index = file_schema.get_field_index(name)
        if index < 0:
            raise ValueError(f"{path}: column {name!r} missing (want {want}); columns: {file_schema.names}")
        if not ok(file_schema.field(index).type):
            raise ValueError(f"{path}: column {name!r} has type {file_schema.field(index).type}, want {want}")

    # Parquet statistics give min/max per row group for free: bad ids are reported here, on every
    # rank alike, instead of on one rank mid-epoch (which would leave the others in a collective).
    bounds = {f.name: (0, f.cardinality - 1) for f in schema.sparse_features}
    bounds[schema.label] = (0, 1)
    for g in range(metadata.num_row_groups):
        row_group = metadata.row_group(g)
        for j in range(row_group.num_columns):
            column = row_group.column(j)
            name = column.path_in_schema.split(".")[0]
            stats = column.statistics
            if name in bounds and stats is not None and stats.has_min_max:
                _check_range(path, g, name, int(stats.min), int(stats.max), *bounds[name], schema.label)
    return metadata


def check_table(schema: Schema, path: Path, row_group: int, table: pa.Table, columns: Sequence[str]) -> None:
    """Check rows read from a split file: no nulls in `columns`, ids in [0, cardinality), labels in {0, 1}.

    Raises:
        ValueError: naming the file, the row group and the column.
    """
    for name in columns:
        column = table.column(name)
        if column.null_count:
            raise ValueError(f"{path}: row group {row_group}: column {name!r} has {column.null_count} nulls")
    label_range = pc.min_max(table.column(schema.label))
    _check_range(
        path,
        row_group,
        schema.label,
        label_range["min"].as_py(),
        label_range["max"].as_py(),
        0,
        1,
        schema.label,
    )
    for f in schema.sparse_features:
        column = table.column(f.name)
        if f.multi_hot:
            column = pc.list_flatten(column)
            if column.null_count:
                raise ValueError(
                    f"{path}: row group {row_group}: feature {f.name!r} has null ids in its lists"
                )
        if len(column) == 0:
            continue
        id_range = pc.min_max(column)
        low, high = id_range["min"].as_py(), id_range["max"].as_py()
        _check_range(path, row_group, f.name, low, high, 0, f.cardinality - 1, schema.label)


def _check_range(
    path: Path, row_group: int, name: str, low: int, high: int, min_ok: int, max_ok: int, label: str
) -> None:
    if low < min_ok or high > max_ok:
        what = f"label {name!r} has values" if name == label else f"feature {name!r} has ids"
        raise ValueError(
            f"{path}: row group {row_group}: {what} in [{low}, {high}], outside [{min_ok}, {max_ok}]"
            + ("" if name == label else f" (cardinality {max_ok + 1})")
        )
