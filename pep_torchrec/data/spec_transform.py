"""A spec'd dataset's per-row transform: checked raw rows (`SpecBlock`) → the model's ids and dense values.

One implementation for the two places that compute features from a spec, so they cannot drift:
`data prepare --spec` (pass 2, prepare/from_spec.py) and the service (`SpecInputs` below, behind
`Predictor`). Both first turn raw string columns into a `SpecBlock` with `spec_reader.SpecRows`
(joins, numbers, timestamps, regex, crosses, bags), then call `SpecTransform`:

- vocabulary fields: `Vocabulary.lookup` (unknown → OOV id 0);
- hashed fields: FNV-1a-64(value) mod `hash_buckets`;
- quantile fields: 0 for a missing value, else 1 + the bucket among the train split's edges;
- dense fields: log1p and/or standardisation with the train split's mean and std; missing → 0.

What prepare learns from the train split (vocabularies in vocab.parquet; edges, mean and std in
schema.json `extra.fields`; the side tables' joined columns in `join_<i>.parquet`) is persisted with the
prepared dataset, and `export` copies it into the artifact, so the service computes the same values.

Legend: N = rows of a block, B = instances of a request.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pep_torchrec.data.raw.readers import RawBlock
from pep_torchrec.data.raw.spec_reader import SideTable, SpecBlock, SpecRows, clean_bags, fnv1a64
from pep_torchrec.data.schema import Schema
from pep_torchrec.data.spec import DatasetSpec, FieldSpec, JoinSpec, spec_from_dict, spec_to_dict
from pep_torchrec.data.vocab import Vocabulary

JOIN_FILE = "join_{}.parquet"
"""The side table of `joins[i]` as prepared (key + joined columns, duplicates and bad lines removed)."""


def sparse_kind(f: FieldSpec) -> str:
    """How a sparse field's ids are made: "vocab", "hash" or "quantile"."""
    if f.type == "numeric":
        return "quantile" if f.bucketize == "quantile" else "vocab"
    return "hash" if f.hash_buckets else "vocab"


def sparse_fields(spec: DatasetSpec) -> list[FieldSpec]:
    """The fields that give a sparse feature, in model order."""
    return [f for f in spec.fields if f.type != "numeric" or f.bucketize]


def dense_fields(spec: DatasetSpec) -> list[FieldSpec]:
    """The fields that give a dense feature, in model order."""
    return [f for f in spec.fields if f.type == "numeric" and f.dense]


def dense_base(f: FieldSpec, values: np.ndarray) -> np.ndarray:
    """The value before standardisation: log1p(max(v, 0)) for the log1p transforms, else v."""
    return np.log1p(np.maximum(values, 0)) if f.dense.startswith("log1p") else values


class SpecTransform:
    """`SpecBlock` → ids of every sparse field and values of every dense field.

    Args:
        spec: the checked spec.
        vocabs: field → `Vocabulary` of every vocabulary field.
        stats: field → train statistics (`mean`, `std` of standardised fields, `edges` of quantile ones),
            as schema.json `extra.fields` holds them.
        multi: names of the sparse fields whose feature is a bag (multi-hot).
    """

    def __init__(self, spec: DatasetSpec, vocabs: Mapping[str, Vocabulary], stats: Mapping[str, Mapping],
                 multi: set[str]):  # fmt: skip
        self.spec = spec
        self.sparse = sparse_fields(spec)
        self.dense = dense_fields(spec)
        self.vocabs = vocabs
        self.multi = multi
        self.edges = {
            f.name: np.asarray(stats[f.name]["edges"], dtype=np.float64)
            for f in self.sparse
            if sparse_kind(f) == "quantile"
        }
        self.moments = {
            f.name: (float(stats[f.name]["mean"]), float(stats[f.name]["std"]))
            for f in self.dense
            if "standardize" in f.dense
        }

    def sparse_columns(self, block: SpecBlock) -> list[pa.Array]:
        """[N] int64 ids (single-valued) or [N] list<int64> (bags), one per sparse field in order."""
        out = []
        for f in self.sparse:
            kind = sparse_kind(f)
            if kind == "quantile":
                values, missing = block.numbers[f.name]
                ids = np.where(missing, 0, 1 + np.searchsorted(self.edges[f.name], values, side="right"))
                out.append(pa.array(ids.astype(np.int64), pa.int64()))
                continue
            values = block.keys[f.name]
            if f.name in self.multi:
                if not pa.types.is_list(values.type):  # a single value where other inputs had bags
                    values = pa.ListArray.from_arrays(
                        pa.array(np.arange(len(values) + 1, dtype=np.int32)), values
                    )
                offsets = values.offsets.to_numpy()
                flat = self._ids(f, kind, values.flatten())
                out.append(pa.ListArray.from_arrays(pa.array(offsets - offsets[0], pa.int32()),
                                                    pa.array(flat, pa.int64())))  # fmt: skip
            else:
                out.append(pa.array(self._ids(f, kind, values), pa.int64()))
        return out

    def dense_columns(self, block: SpecBlock) -> list[np.ndarray]:
        """[N] float32 values, one per dense field in order (missing → 0)."""
        out = []
        for f in self.dense:
            values, missing = block.numbers[f.name]
            v = dense_base(f, values)
            if f.name in self.moments:
                mean, std = self.moments[f.name]
                v = (v - mean) / std
            out.append(np.where(missing, 0.0, v).astype(np.float32))
        return out

    def _ids(self, f: FieldSpec, kind: str, values: pa.Array) -> np.ndarray:
        if kind == "vocab":
            return self.vocabs[f.name].lookup(values)
        # Hash each distinct value once (blocks repeat values a lot).
        encoded = pc.dictionary_encode(values)
        ids = (fnv1a64(encoded.dictionary) % np.uint64(f.hash_buckets)).astype(np.int64)
        return ids[encoded.indices.to_numpy(zero_copy_only=False)]


# ---------------------------------------------------------------------------------------------------
# serving: raw instances → the same features


def side_table_bytes(side: SideTable, columns: Sequence[str]) -> bytes:
    """A loaded side table's key and `columns` as Parquet (what prepare persists, export copies)."""
    table = pa.table({side.spec.key: side.keys, **{c: side.columns[c] for c in columns}})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def joined_columns(spec: DatasetSpec, j: JoinSpec, side_columns: Sequence[str]) -> list[str]:
    """The side-table columns of join `j` that the spec's fields read (the only ones serving needs)."""
    need = SpecRows(spec, [], serving=True).required_columns()
    return [c for c in side_columns if j.prefix + c in need]


def raw_columns(spec: DatasetSpec, joined: set[str]) -> list[str]:
    """The input columns a client sends: those the fields and join keys read, less the joined ones."""
    need = SpecRows(spec, [], serving=True).required_columns()
    cols = []
    for f in spec.fields:  # in spec order, so the request's fields read like the spec
        for c in f.columns if f.type == "flags" else [] if f.type == "cross" else [f.column]:
            if c in need and c not in joined and c not in cols:
                cols.append(c)
    for j in spec.joins:
        if j.on not in cols and j.on not in joined:
            cols.append(j.on)
    return cols


class SpecInputError(ValueError):
    """A raw instance that prepare would have rejected: `index` is the instance, `column` the field."""

    def __init__(self, index: int, column: str | None, message: str) -> None:
        super().__init__(message)
        self.index, self.column, self.message = index, column, message


class SpecInputs:
    """Raw instances of a spec'd dataset → (dense [B, N] float32, {sparse field: ids}), as prepare does.

    Args:
        inputs: the artifact's `inputs` (with `spec`, `stats`, `multi`, `joins`, `fields`).
        vocabs: the artifact's vocabularies.
        files: the artifact's file contents (the side tables).
        where: the artifact's path (for errors).
    """

    def __init__(self, inputs: Mapping[str, Any], vocabs: Mapping[str, Vocabulary],
                 files: Mapping[str, bytes], where: str | Path):  # fmt: skip
        self.spec = spec_from_dict(inputs["spec"], f"{where}: inputs.spec")
        self.fields = [f["name"] for f in inputs["fields"]]
        self.list_columns = {f["name"] for f in inputs["fields"] if f["type"] == "raw_list"}
        sides = []
        for j, entry in zip(self.spec.joins, inputs["joins"]):
            table = pq.read_table(io.BytesIO(files[entry["file"]]))
            keys = table.column(j.key).combine_chunks()
            columns = {c: table.column(c).combine_chunks() for c in table.column_names if c != j.key}
            sides.append(SideTable(j, Path(j.path), keys, columns))  # errors name the spec's file
        self.sides = sides
        self.rows = SpecRows(self.spec, sides, serving=True)
        self.transform = SpecTransform(self.spec, vocabs, inputs["stats"], set(inputs["multi"]))
        # A Parquet input's numbers were read as Arrow prints them (3.0 → "3"), a text file's as written.
        self.arrow_numbers = self.spec.format.type == "parquet"
        self.separators = {
            f.column: f.separator for f in self.spec.fields if f.type == "categorical" and f.separator
        }

    def columns(self, instances: Sequence[Mapping[str, Any]]) -> pa.Table:
        """The instances as the string columns a file would have given (null → "", a number → its text)."""
        cols = {}
        for name in self.fields:
            raws = [inst[name] for inst in instances]
            bags = [r if isinstance(r, list) else [r] for r in raws]
            flat = self._texts([v for bag in bags for v in bag])
            ends = np.cumsum([len(bag) for bag in bags]).tolist()
            items = [flat[end - len(bag) : end] for bag, end in zip(bags, ends)]
            if name in self.list_columns:  # a Parquet list column: a bag per row (null → [])
                cols[name] = clean_bags(pa.array(items, pa.list_(pa.string())))  # as InputFile reads one
                continue
            sep = self.separators.get(name)
            texts = []
            for i, (r, its) in enumerate(zip(raws, items)):
                if isinstance(r, list):
                    if sep is None:
                        raise SpecInputError(i, name, "expected one value, got a list")
                    if any(sep in t for t in its):
                        raise SpecInputError(i, name, f"a list item holds the separator {sep!r}")
                    texts.append(sep.join(its))
                else:
                    texts.append(its[0])
            cols[name] = pa.array(texts, pa.string())
        return pa.table(cols) if cols else pa.table({"_": pa.array([""] * len(instances))})

    def _texts(self, values: Sequence[Any]) -> list[str]:
        """Raw JSON values → the texts a file holds (`_text`); a Parquet input's floats as Arrow prints
        them (3.0 → "3"), in one cast per column (a cast per value costs ~15 µs)."""
        texts = [_text(v) for v in values]
        if self.arrow_numbers:
            where = [i for i, v in enumerate(values) if isinstance(v, float)]
            if where:
                cast = pc.cast(pa.array([values[i] for i in where], pa.float64()), pa.string()).to_pylist()
                for i, t in zip(where, cast):
                    texts[i] = t
        return texts

    def features(self, instances: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, list[pa.Array]]:
        """(dense [B, N] float32, one [B] int64 or list<int64> id column per sparse feature).

        Raises:
            SpecInputError: the first instance prepare would have rejected (a value that is not a number
                or a time, a join key absent from the side table), naming the instance and the field.
        """
        n = len(instances)
        table = self.columns(instances)
        block = self.rows.parse(RawBlock(table, np.arange(n, dtype=np.int64), []), "request", 0, None)
        if block.rejects:
            first = min(block.rejects, key=lambda r: int(r.lines[0]))
            i = int(first.lines[0])
            raise SpecInputError(i, self._column_of(first.reason, first.detail), first.detail)
        dense = self.transform.dense_columns(block)
        dense_BN = np.stack(dense, axis=1) if dense else np.zeros((n, 0), np.float32)
        return dense_BN, self.transform.sparse_columns(block)

    def _column_of(self, reason: str, detail: str) -> str | None:
        for j in self.spec.joins:
            if reason == f"unknown_{j.name}":
                return j.on
        for f in self.spec.fields:  # details name the field: "field <name> = ..." / "field <name>: ..."
            if reason in ("bad_number", "bad_timestamp") and detail.startswith(
                (f"field {f.name} =", f"field {f.name}:")
            ):
                return f.column
        return None

    def example_instance(self) -> dict[str, Any]:
        """A valid instance: a known join key, a parseable time, otherwise missing values."""
        out: dict[str, Any] = {name: ([] if name in self.list_columns else None) for name in self.fields}
        for f in self.spec.fields:
            if f.type in ("hour", "weekday") and f.column in out:
                if f.time_format in ("unix", "unix_ms"):
                    out[f.column] = 0
                else:
                    out[f.column] = datetime(2020, 1, 1).strftime(f.time_format)
        for side in self.sides:
            if side.spec.on in out and len(side.keys):
                out[side.spec.on] = side.keys[0].as_py()
        return out


def _text(v: Any) -> str:
    """A raw JSON value as the text a file holds: null → "" (missing), numbers in their shortest form."""
    # str(3.0) is "3.0": an integer field refuses it, as it refuses that text in a file.
    return "" if v is None else str(v)


def serving_inputs(schema: Schema, data_path: str | Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The artifact's `inputs` for a spec'd dataset, and the files it needs (the side tables).

    A client sends the spec's raw input columns (`fields`, each "raw": a string, a number or null;
    "raw_list": a list, for a Parquet list column); `spec`, `stats` (the train statistics), `multi` and
    `joins` are what `SpecInputs` needs to compute the features from them as prepare did.

    Raises:
        ValueError: a dataset prepared before side tables were persisted (prepare it again).
    """
    spec = spec_from_dict(schema.extra["spec"], f"{data_path}/schema.json: extra.spec")
    joins = schema.extra.get("joins")
    if spec.joins and joins is None:
        raise ValueError(
            f"{data_path}: prepared without a copy of its side tables (an older version): "
            "run `data prepare --spec` again to serve it"
        )
    files = {}
    for entry in joins or []:
        path = Path(data_path) / entry["file"]
        if not path.is_file():
            raise ValueError(f"{path}: missing (the dataset's copy of side table {entry['name']!r})")
        files[entry["file"]] = path.read_bytes()
    multi = sorted(f.name for f in schema.sparse_features if f.multi_hot)
    joined = {j.prefix + c for j, entry in zip(spec.joins, joins or []) for c in entry["columns"]}
    list_columns = {
        f.column for f in spec.fields if f.type == "categorical" and not f.separator and f.name in multi
    }
    fields = [
        {"name": c, "type": "raw_list" if c in list_columns else "raw", "nullable": True}
        for c in raw_columns(spec, joined)
    ]
    facts = schema.extra.get("fields", {})
    stats = {
        name: {k: v for k, v in f.items() if k in ("mean", "std", "edges")}
        for name, f in facts.items()
        if any(k in f for k in ("mean", "std", "edges"))
    }
    by_name = {f.name: f for f in sparse_fields(spec)}
    sparse = [
        {"name": sf.name, "source": None, "transform": "spec", "multi_hot": sf.multi_hot,
         "vocab": sparse_kind(by_name[sf.name]) == "vocab"}
        for sf in schema.sparse_features
    ]  # fmt: skip
    dense = [{"name": name, "source": None, "transform": "spec"} for name in schema.dense_features]
    inputs = {
        "fields": fields,
        "sparse": sparse,
        "dense": dense,
        "spec": spec_to_dict(spec),
        "stats": stats,
        "multi": multi,
        "joins": joins or [],
    }
    return inputs, files
