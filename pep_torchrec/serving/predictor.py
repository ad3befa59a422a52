"""The framework-free predictor: raw feature values → ids / dense inputs → model → scores.

Legend: B = instances in a request, N = dense features.

An instance is a mapping of the dataset's RAW fields, as its files have them (see the artifact's
`inputs.fields`): Criteo `I1..I13` integers (null = missing) and `C1..C26` hex strings (null or "" =
missing); MovieLens `user_id`, `item_id`, `age` integers, `gender`, `occupation`, `zip` strings and
`genres` a list of strings; synthetic data ids and dense numbers. Values are mapped exactly as the
pipeline did: the feature's transform (`criteo_log_bucket`), then its vocabulary (unknown → OOV id 0);
dense inputs get their transform (Criteo: log1p(max(v, 0)), missing → 0).

Every problem with a request raises `RequestError` naming the instance and the field; nothing here
depends on the web framework, so the service and the tests share it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pep_torchrec.data.schema import MAX_VALUE_CHARS, OOV_ID
from pep_torchrec.data.spec_transform import SpecInputError
from pep_torchrec.data.vocab import apply_transform
from pep_torchrec.export.serving_model import LoadedArtifact, load_artifact

_MAX_STRING = MAX_VALUE_CHARS  # longer raw values are refused (`data prepare` rejected them too)
_MAX_LIST = 1024


_AVAZU_EXAMPLE_HOUR = 14102100  # YYMMDDHH: 2014-10-21, 00h, the first hour of the Avazu data


class RequestError(ValueError):
    """A bad request; `loc` names where (e.g. ["instances", 3, "C7"]), `kind` is a short type tag."""

    def __init__(self, loc: Sequence[Any], message: str, kind: str = "value_error") -> None:
        super().__init__(f"{'.'.join(str(p) for p in loc)}: {message}")
        self.loc, self.message, self.kind = list(loc), message, kind


_DICT_MAX_VALUES = 1_000_000


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_value(ftype: str, nullable: bool, value: Any, loc: list[Any]) -> None:
    if value is None:
        if nullable:
            return
        raise RequestError(loc, "must not be null", "missing")
    if ftype == "int":
        if not _is_int(value):
            raise RequestError(loc, f"expected an integer, got {type(value).__name__}", "int_type")
        if not -(2**63) <= value < 2**63:  # the whole int64 range, both ends
            raise RequestError(loc, "integer outside the int64 range", "int_range")
    elif ftype == "string":
        if not isinstance(value, str):
            raise RequestError(loc, f"expected a string, got {type(value).__name__}", "string_type")
        if len(value) > _MAX_STRING:
            raise RequestError(loc, f"string longer than {_MAX_STRING}", "string_too_long")
    elif ftype in ("string_list", "int_list"):
        if not isinstance(value, list):
            raise RequestError(loc, f"expected a list, got {type(value).__name__}", "list_type")
        if len(value) > _MAX_LIST:
            raise RequestError(loc, f"list longer than {_MAX_LIST}", "too_long")
        for i, item in enumerate(value):
            _check_value("string" if ftype == "string_list" else "int", False, item, [*loc, i])
    elif ftype in ("raw", "raw_list"):  # a spec'd dataset's raw column: text, a number, null or a list
        # of them (a bag; a single-valued field's list is refused by SpecInputs, naming the field)
        items = value if isinstance(value, list) else [value]
        if len(items) > _MAX_LIST:
            raise RequestError(loc, f"list longer than {_MAX_LIST}", "too_long")
        for item in items:
            if isinstance(item, str):
                if len(item) > _MAX_STRING:
                    raise RequestError(loc, f"string longer than {_MAX_STRING}", "string_too_long")
            elif item is not None and not (
                _is_int(item) or (isinstance(item, float) and math.isfinite(item))
            ):
                raise RequestError(
                    loc, f"expected a string, a finite number or null, got {item!r:.40}", "type"
                )
    elif ftype == "number":
        if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(float(value)):
            raise RequestError(loc, f"expected a finite number, got {value!r:.40}", "float_type")
    else:  # an artifact with a type this build does not know: refused at load, never here
        raise AssertionError(ftype)


_INT64_LOW, _INT64_HIGH = -(2**63), 2**63
_ITEM_TYPE = {"string_list": "string", "int_list": "int"}


def _column_valid(ftype: str, nullable: bool, column: list[Any]) -> bool:
    """True only if `_check_value` accepts every value of `column` (checked with builtins over the
    whole column: a few µs for 64 values, where a Python call per value costs ~0.1 µs each). False
    means "look closer", not "invalid": then `_check_value` runs and names the first problem."""
    types = set(map(type, column))
    if type(None) in types:
        if not nullable:
            return False
        column = [v for v in column if v is not None]
        types.discard(type(None))
    if not column:
        return True
    if ftype == "int":  # exact types: bool (an int subclass) is refused, as `_check_value` does
        return types == {int} and min(column) >= _INT64_LOW and max(column) < _INT64_HIGH
    if ftype == "string":
        return types == {str} and max(map(len, column)) <= _MAX_STRING
    if ftype == "number":  # ints (float() of a huge one raises) take the full check
        return types == {float} and math.isfinite(sum(column))  # inf / nan anywhere: not finite
    if ftype in _ITEM_TYPE:
        return (
            types == {list}
            and max(map(len, column)) <= _MAX_LIST
            and _column_valid(_ITEM_TYPE[ftype], False, [v for items in column for v in items])
        )
    return False


class Predictor:
    """Scores raw instances with one loaded artifact. Thread-safe: the model is only read.

    Args:
        artifact: a verified artifact (`load_artifact`).
        max_instances: the most instances one call may score.
    """

    def __init__(self, artifact: LoadedArtifact, *, max_instances: int = 1024) -> None:
        self.artifact = artifact
        self.max_instances = max_instances
        inputs = artifact.manifest["inputs"]
        self.fields = {f["name"]: f for f in inputs["fields"]}
        for f in self.fields.values():
            if f["type"] not in ("int", "string", "string_list", "int_list", "number", "raw", "raw_list"):
                raise ValueError(f"{artifact.path}: field {f['name']!r} has unknown type {f['type']!r}")
        self._fields_by_type: dict[tuple[str, bool], list[str]] = {}
        for name, f in self.fields.items():
            self._fields_by_type.setdefault((f["type"], f["nullable"]), []).append(name)
        self.sparse = inputs["sparse"]
        self.dense = inputs["dense"]

        self.cardinality = dict(
            zip(
                artifact.manifest["dataset"]["sparse_features"], artifact.manifest["dataset"]["cardinalities"]
            )
        )
        # Raw (transformed) value → id as a plain dict per feature: a request maps a handful of values,
        # for which a dict lookup (~0.1 µs) beats building a pyarrow array and searching it (~30 µs a
        # feature). Vocabularies above `_DICT_MAX_VALUES` (memory: ~100 B a value) keep the pyarrow path.
        self._vocab_dicts: dict[str, dict[str, int] | None] = {}
        for spec in self.sparse:
            vocab = artifact.vocab.get(spec["name"]) if spec["vocab"] else None
            if vocab is not None and len(vocab.values) <= _DICT_MAX_VALUES:
                table = vocab.to_table()
                self._vocab_dicts[spec["name"]] = dict(
                    zip(table.column("value").to_pylist(), table.column("id").to_pylist())
                )
            else:
                self._vocab_dicts[spec["name"]] = None

    @classmethod
    def from_path(cls, path: str | Path, **kwargs: Any) -> Predictor:
        return cls(load_artifact(path), **kwargs)

    @property
    def version(self) -> str:
        return self.artifact.version

    # ---- validation and feature mapping --------------------------------------------------------

    def validate(self, instances: Any) -> None:
        """Raise RequestError for the first problem: type, unknown / missing field, size."""
        if not isinstance(instances, list):
            raise RequestError(["instances"], "expected a list of instances", "list_type")
        if not instances:
            raise RequestError(["instances"], "at least one instance is needed", "too_short")
        if len(instances) > self.max_instances:
            raise RequestError(
                ["instances"], f"{len(instances)} instances, at most {self.max_instances} allowed", "too_long"
            )
        if self._columns_valid(instances):
            return
        for i, instance in enumerate(instances):
            if not isinstance(instance, Mapping):
                raise RequestError(
                    ["instances", i], f"expected an object, got {type(instance).__name__}", "dict_type"
                )
            for name in instance:
                if name not in self.fields:
                    raise RequestError(
                        ["instances", i, name],
                        f"unknown feature {str(name)[:64]!r}; expected {sorted(self.fields)}",
                        "extra_forbidden",
                    )
            for name, spec in self.fields.items():
                if name not in instance:
                    raise RequestError(["instances", i, name], "field required", "missing")
                _check_value(spec["type"], spec["nullable"], instance[name], ["instances", i, name])

    def _columns_valid(self, instances: list[Any]) -> bool:
        """The usual request, checked a field type at a time: dicts of exactly the known fields, every
        value plainly valid. False sends `validate` to its instance-by-instance checks."""
        num_fields = len(self.fields)
        if not all(type(inst) is dict and len(inst) == num_fields for inst in instances):
            return False
        try:
            return all(
                _column_valid(ftype, nullable, [inst[name] for inst in instances for name in names])
                for (ftype, nullable), names in self._fields_by_type.items()
            )
        except KeyError:  # a field missing (and so an unknown one present)
            return False

    def features(self, instances: list[Mapping[str, Any]]) -> tuple[torch.Tensor, KeyedJaggedTensor]:
        """(dense [B, N] float32, KJT) of validated instances, exactly as the pipeline prepares them."""
        if self.artifact.spec_inputs is not None:
            return self._spec_features(instances)
        num_instances = len(instances)
        # Ids, bag lengths and per-feature counts as Python lists, then one tensor each: a request
        # holds a few values per feature, where a tensor per feature costs more than its values.
        keys, ids, length_per_key, limits = [], [], [], []
        lengths_FB = np.ones(len(self.sparse) * num_instances, np.int32)  # a bag per single-hot value
        for f, spec in enumerate(self.sparse):
            name, raw_name = spec["name"], spec["source"]
            raws = [inst[raw_name] for inst in instances]
            if spec["multi_hot"]:
                bags = [r if isinstance(r, list) else [r] for r in raws]
                lengths_FB[f * num_instances : (f + 1) * num_instances] = list(map(len, bags))
                flat = [v for bag in bags for v in bag]
            else:
                bags = None
                flat = raws
            if spec["vocab"]:
                # Raw → the pipeline's string key (missing = ""), then the transform, then the vocabulary.
                strings = self._transform(spec, bags if bags is not None else [[r] for r in raws])
                table = self._vocab_dicts[name]
                if table is not None:  # unknown → OOV, as `Vocabulary.lookup`
                    feature_ids = [table.get(v, OOV_ID) for v in strings]
                elif strings:
                    vocab = self.artifact.vocab[name]
                    feature_ids = np.asarray(vocab.lookup(pa.array(strings, pa.large_string()))).tolist()
                else:
                    feature_ids = []
                limits.append(_INT64_HIGH - 1)  # already ids
            else:  # the raw integer is the id (synthetic data); missing or out of range → OOV below
                feature_ids = [-1 if v is None else v for v in flat] if None in flat else flat
                limits.append(self.cardinality[name])
            keys.append(name)
            ids += feature_ids
            length_per_key.append(len(feature_ids))
        ids_N = np.fromiter(ids, np.int64, len(ids))
        limit_N = np.repeat(np.array(limits, dtype=np.int64), length_per_key)
        ids_N = np.where((ids_N >= 0) & (ids_N < limit_N), ids_N, OOV_ID)
        offsets_FB1 = np.zeros(lengths_FB.size + 1, np.int32)
        np.cumsum(lengths_FB, out=offsets_FB1[1:])
        kjt = KeyedJaggedTensor(
            keys=keys,
            values=torch.from_numpy(ids_N),
            lengths=torch.from_numpy(lengths_FB),
            offsets=torch.from_numpy(offsets_FB1),
            stride=num_instances,
            length_per_key=length_per_key,
            offset_per_key=[0, *itertools.accumulate(length_per_key)],
        )
        # Python floats rounded to float32 once, as numpy's assignment did.
        columns = []
        for spec in self.dense:
            source = spec["source"]
            raws = [inst[source] for inst in instances]
            if spec["transform"] == "log1p_relu":
                columns.append([0.0 if v is None else math.log1p(max(float(v), 0.0)) for v in raws])
            else:
                columns.append([0.0 if v is None else float(v) for v in raws])
        dense_NB = np.array(columns, dtype=np.float32).reshape(len(columns), num_instances)
        return torch.from_numpy(np.ascontiguousarray(dense_NB.T)), kjt

    def _spec_features(self, instances: list[Mapping[str, Any]]) -> tuple[torch.Tensor, KeyedJaggedTensor]:
        """A spec'd dataset: raw columns → features by prepare's own code (`spec_transform.SpecInputs`)."""
        try:
            dense_BN, columns = self.artifact.spec_inputs.features(instances)
        except SpecInputError as e:
            raise RequestError(["instances", e.index, *([e.column] if e.column else [])], e.message) from None
        values, lengths = [], []
        for col in columns:
            if pa.types.is_list(col.type):
                offsets = col.offsets.to_numpy()
                values.append(col.flatten().to_numpy(zero_copy_only=False))
                lengths.append(np.diff(offsets))
            else:
                values.append(col.to_numpy(zero_copy_only=False))
                lengths.append(np.ones(len(col), np.int64))
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=[spec["name"] for spec in self.sparse],
            values=torch.from_numpy(np.concatenate(values).astype(np.int64)),
            lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)),
        )
        return torch.from_numpy(dense_BN), kjt

    @staticmethod
    def _transform(spec: Mapping[str, Any], bags: list[list[Any]]) -> list[str]:
        """Vocabulary keys of every value, in order; a value the transform rejects (e.g. an Avazu
        `hour` that is not a date) is the client's error, named by its field."""
        if spec["transform"] == "none":  # the key is the raw value itself
            return ["" if v is None else str(v) for bag in bags for v in bag]
        out = []
        for i, bag in enumerate(bags):
            for v in bag:
                try:
                    out.append(apply_transform(spec["transform"], "" if v is None else str(v)))
                except ValueError as e:
                    raise RequestError(["instances", i, spec["source"]], str(e)) from None
        return out

    # ---- scoring -------------------------------------------------------------------------------

    @torch.inference_mode()
    def predict(self, instances: Any) -> list[float]:
        """Validate, map and score: click probabilities in request order."""
        self.validate(instances)
        dense, kjt = self.features(instances)
        logits = self.artifact.model(dense, kjt)
        return torch.sigmoid(logits).tolist()

    def example_instance(self) -> dict[str, Any]:
        """A valid instance (OpenAPI example, warm-up): the first vocabulary value of each field."""
        if self.artifact.spec_inputs is not None:
            return self.artifact.spec_inputs.example_instance()
        out: dict[str, Any] = {}
        for name, spec in self.fields.items():
            out[name] = {"int": 1, "string": "", "string_list": [], "int_list": [], "number": 0.0}[
                spec["type"]
            ]
        for spec in self.sparse:
            if spec["transform"].startswith("avazu_"):
                out[spec["source"]] = _AVAZU_EXAMPLE_HOUR
                continue
            vocab = self.artifact.vocab.get(spec["name"])
            if vocab is not None and len(vocab.values) and spec["transform"] == "none":
                value = vocab.values[0].as_py()
                ftype = self.fields[spec["source"]]["type"]
                if ftype == "string":
                    out[spec["source"]] = value
                elif ftype == "string_list":
                    out[spec["source"]] = [value]
                elif ftype == "int" and value.lstrip("-").isdigit():
                    out[spec["source"]] = int(value)
        return out
