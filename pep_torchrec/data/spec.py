"""A declarative dataset spec: how `pep-torchrec data prepare --spec SPEC.yaml` reads any tabular CTR data.

The spec is a YAML mapping parsed into the dataclasses below with the training config's machinery
(`pep_torchrec.config`): unknown keys and values of the wrong type are one-line `PrepareError`s that
name the spec file and the key; the checks types cannot express (choices, references between keys)
follow in `check_spec`. Every key, with its meaning, is the docstring under its field; the README's
"Your own data" section lists them with a worked example.

A minimal spec::

    name: ratings
    format: {type: delimited, delimiter: ",", header: true}
    label: {column: rating, threshold: "> 3", drop: [3]}
    fields:
      - {name: user_id}
      - {name: item_id}
"""

from __future__ import annotations

import codecs
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pep_torchrec.config import ConfigError, from_dict
from pep_torchrec.data.raw.rejections import PrepareError

FORMAT_TYPES = ("delimited", "libsvm", "libffm", "parquet")
FIELD_TYPES = ("categorical", "flags", "numeric", "hour", "weekday", "regex", "cross")
DENSE_TRANSFORMS = ("", "none", "log1p", "standardize", "log1p_standardize")
BUCKETIZERS = ("", "log2", "quantile")
SPLIT_METHODS = ("random", "temporal", "files")
SPECS_DIR = Path(__file__).resolve().parent / "specs"
_THRESHOLD = re.compile(r"^\s*(>=|<=|>|<|==|!=)\s*(-?[0-9.eE+-]+)\s*$")


@dataclass
class FormatSpec:
    type: str = "delimited"
    """delimited (text with a delimiter), libsvm (`label idx:val ...`, fields by position), libffm
    (`label field:idx:val ...`) or parquet (every column read as text; a list column is a bag; null is
    missing; a row's "line" in reports is its 1-based row number). Text files may be plain or gzip
    (detected from the content, whatever the file name)."""
    delimiter: str = ","
    """delimited: the field separator ("\\t" or "tab" for a tab); several characters (e.g. "::") are
    allowed without quoting."""
    quote: str = ""
    """delimited: the quote character (e.g. '"'; a doubled quote inside quotes is one quote), or ""
    for none. A quoted value may hold the delimiter, never a line break."""
    header: bool = False
    """delimited: the first line of every file names the columns (checked against `columns` if given)."""
    columns: list[str] = field(default_factory=list)
    """delimited: the column names, in file order; required without `header`."""
    encoding: str = "utf-8"
    """delimited: the text encoding (an ASCII-compatible one: utf-8, latin-1, cp1252, ...)."""
    files: list[str] = field(default_factory=list)
    """Glob patterns of the input files inside a `--raw` directory (default: every non-hidden file);
    files are read in natural order (day_2 before day_10)."""
    fields: list[str] = field(default_factory=list)
    """libsvm/libffm: names of the fields. libsvm: the i-th `idx:val` pair of a line is field i;
    libffm: field number i is `fields[i]` (a field given several times in a line is a space-separated
    bag). Each field gives two columns: `<name>` (the index, a string) and `<name>_value` (the value)."""
    field_map: str = ""
    """libsvm: a file of lines `index field` (whitespace-separated, plain or gzip; relative to the first
    `--raw` directory) giving each feature index's field, instead of fields by position; an index
    absent from it is a `bad_pair` row."""


@dataclass
class LabelSpec:
    column: str = "label"
    """The column holding the label."""
    threshold: str = ""
    """A rule `> 3`, `>= 4`, `< 0.5`, `== 1`, `!= 0`: rows whose numeric value satisfies it are 1, others 0."""
    positive: list[Any] = field(default_factory=list)
    """The values that make a positive row (all others are 0); numbers compare numerically."""
    map: dict[Any, Any] = field(default_factory=dict)
    """Value → label (0 or 1), e.g. {-1: 0, 1: 1}; a value not in the map is a `bad_label` row."""
    drop: list[Any] = field(default_factory=list)
    """Values whose rows are left out (counted as filtered `label_dropped`, not rejected), e.g. [3]."""


@dataclass
class FieldSpec:
    name: str = ""
    """The feature's name in the prepared dataset (a Parquet column, an embedding table)."""
    type: str = "categorical"
    """categorical (a column's values), flags (a bag of the names of the `columns` equal to
    `flag_value`), numeric (dense and/or bucketized), hour / weekday (of a timestamp column), regex
    (a capture of a column), cross (two earlier fields' values combined)."""
    column: str = ""
    """The input (or joined) column it reads (default: `name`)."""
    columns: list[str] = field(default_factory=list)
    """flags: the 0/1 columns whose names make the bag."""
    flag_value: str = "1"
    """flags: the value that puts a column's name into the bag."""
    separator: str = ""
    """categorical: split the value into a multi-valued bag (pooled), e.g. "|"; empty items are dropped."""
    min_count: int | None = None
    """Values seen fewer times (all splits) map to the OOV id 0 (default: the spec's `min_count`)."""
    hash_buckets: int = 0
    """> 0: id = FNV-1a-64(value) mod hash_buckets instead of a vocabulary (no vocab, no OOV id)."""
    integer: bool = False
    """numeric: values must be integers (else floats); log2 bucketizing needs integers."""
    dense: str = ""
    """numeric: a dense float32 feature: none (raw), log1p (log1p(max(v, 0))), standardize ((v - mean) /
    std over the train split), log1p_standardize; "" for no dense feature. Missing values give 0."""
    dense_name: str = ""
    """numeric: the dense feature's name (default: `name`, or `<name>_dense` when also bucketized)."""
    bucketize: str = ""
    """numeric: a categorical feature `name` from the value: log2 (int(log(v)**2) for v > 2, else v,
    Criteo's), quantile (`num_buckets` buckets with edges from the train split); "" for none.
    A missing value is its own category ("")."""
    num_buckets: int = 10
    """numeric, bucketize quantile: the number of buckets."""
    time_format: str = "unix"
    """hour/weekday: unix (seconds), unix_ms, or a strptime format of the local time (e.g. %y%m%d%H)."""
    timezone: str = ""
    """hour/weekday with unix times: the IANA time zone whose local hour/weekday is wanted (required;
    e.g. UTC, Europe/Paris). A strptime time is already local: give "local"."""
    pattern: str = ""
    """regex: a Python regular expression; the value is its first group (or the whole match)."""
    default: str = ""
    """regex: the value when the pattern does not match."""
    fields: list[str] = field(default_factory=list)
    """cross: the two earlier single-valued sparse fields combined (their values joined by a U+001F)."""


@dataclass
class JoinSpec:
    name: str = ""
    """The side table's name (unknown keys are counted as `unknown_<name>` rows)."""
    path: str = ""
    """The side table's file, relative to the first `--raw` directory (or absolute); `<path>.gz` is
    tried too."""
    format: FormatSpec = field(default_factory=FormatSpec)
    """How the side table is read (as the main input's `format`)."""
    key: str = ""
    """The side table's key column (unique; a repeated key is a `bad_side_row`)."""
    on: str = ""
    """The main input's column matched against `key` (default: `key`)."""
    columns: list[str] = field(default_factory=list)
    """The side table's columns joined to each row (default: all but the key)."""
    prefix: str = ""
    """Prefix of the joined column names (to avoid clashes)."""


@dataclass
class SplitSpec:
    method: str = "random"
    """random (seeded hash of the record number), temporal (ordered by `column`, or by input order
    without one) or files (given train/valid/test files)."""
    fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    """random/temporal: the train, valid, test fractions (summing to 1)."""
    seed: int = 0
    """random: the split seed."""
    column: str = ""
    """temporal: the numeric column that orders rows (ties by record number); "" = input order. Allowed
    with random too, for `--split temporal` on the command line."""
    train: list[str] = field(default_factory=list)
    """files: glob patterns of the train files' names."""
    valid: list[str] = field(default_factory=list)
    """files: glob patterns of the valid files' names."""
    test: list[str] = field(default_factory=list)
    """files: glob patterns of the test files' names."""


@dataclass
class DatasetSpec:
    name: str = "custom"
    """The dataset's name (schema.json `dataset`)."""
    format: FormatSpec = field(default_factory=FormatSpec)
    """How the main input is read."""
    label: LabelSpec = field(default_factory=LabelSpec)
    """Which column is the label and how it becomes 0/1."""
    fields: list[FieldSpec] = field(default_factory=list)
    """The features, in model order (sparse ones in this order, dense ones in this order)."""
    joins: list[JoinSpec] = field(default_factory=list)
    """Side tables joined on a key column, before the fields are computed."""
    split: SplitSpec = field(default_factory=SplitSpec)
    """How rows are assigned to train/valid/test."""
    min_count: int = 1
    """Default vocabulary threshold of every sparse field."""


# ---------------------------------------------------------------------------------------------------
# loading and checking


def resolve_spec_path(text: str) -> Path:
    """A spec file, or the name of a shipped spec (`criteo` → pep_torchrec/data/specs/criteo.yaml)."""
    path = Path(text)
    if path.is_file():
        return path
    shipped = SPECS_DIR / f"{text}.yaml"
    if "/" not in text and shipped.is_file():
        return shipped
    have = sorted(p.stem for p in SPECS_DIR.glob("*.yaml"))
    raise PrepareError(f"{text}: spec file not found (shipped specs: {have})")


def load_spec(path: str | Path) -> DatasetSpec:
    """Read and check a spec file.

    Raises:
        PrepareError: `path: key: what is wrong` for a missing file, bad YAML, an unknown key, a wrong
            type or an inconsistent value.
    """
    p = resolve_spec_path(str(path))
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise PrepareError(f"{p}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    return spec_from_dict(data, str(p))


def spec_from_dict(data: Any, where: str = "spec") -> DatasetSpec:
    """Build and check a `DatasetSpec` from plain data; errors name `where` and the key."""
    if not isinstance(data, dict):
        raise PrepareError(f"{where}: top level must be a mapping")
    try:
        spec = from_dict(DatasetSpec, data)
    except ConfigError as e:
        raise PrepareError(f"{where}: {str(e).replace('the config', 'the spec')}") from None
    try:
        check_spec(spec)
    except ValueError as e:
        raise PrepareError(f"{where}: {e}") from None
    return spec


def unescape(text: str) -> str:
    """'\\\\t' → tab (a delimiter written with single quotes in YAML), 'tab' → tab."""
    if text == "tab":
        return "\t"
    if text.startswith("\\") and len(text) > 1:
        return codecs.decode(text, "unicode_escape")
    return text


def check_format(fmt: FormatSpec, key: str) -> None:
    if fmt.type not in FORMAT_TYPES:
        raise ValueError(f"{key}.type: {fmt.type!r} is not one of {list(FORMAT_TYPES)}")
    fmt.delimiter = unescape(fmt.delimiter)
    fmt.quote = unescape(fmt.quote)
    if fmt.type == "delimited":
        if (
            not fmt.delimiter
            or not fmt.delimiter.isascii()
            or "\n" in fmt.delimiter
            or "\x1f" in fmt.delimiter
        ):
            raise ValueError(f"{key}.delimiter: {fmt.delimiter!r} is not one or more ASCII characters")
        if fmt.quote and len(fmt.delimiter) > 1:
            raise ValueError(f"{key}.quote: quoting needs a one-character delimiter, not {fmt.delimiter!r}")
        if fmt.quote and (len(fmt.quote) != 1 or fmt.quote == fmt.delimiter or len(fmt.quote.encode()) != 1):
            raise ValueError(
                f"{key}.quote: {fmt.quote!r} is not one ASCII character other than the delimiter"
            )
        if not fmt.header and not fmt.columns:
            raise ValueError(f"{key}.columns: required when {key}.header is false")
        if len(set(fmt.columns)) != len(fmt.columns):
            raise ValueError(f"{key}.columns: duplicate names")
        try:
            ascii_compatible = "\n\t,;|ab09".encode(fmt.encoding) == b"\n\t,;|ab09"
        except LookupError:
            raise ValueError(f"{key}.encoding: unknown encoding {fmt.encoding!r}") from None
        if not ascii_compatible:
            raise ValueError(f"{key}.encoding: {fmt.encoding!r} is not ASCII-compatible")
    if fmt.type in ("libsvm", "libffm"):
        if not fmt.fields:
            raise ValueError(f"{key}.fields: required for {fmt.type} (the names of the fields)")
        if len(set(fmt.fields)) != len(fmt.fields):
            raise ValueError(f"{key}.fields: duplicate names")
    elif fmt.fields:
        raise ValueError(f"{key}.fields: applies to libsvm/libffm only")
    if fmt.field_map and fmt.type != "libsvm":
        raise ValueError(f"{key}.field_map: applies to libsvm only")
    if fmt.type != "delimited":
        for k in ("columns", "header", "quote"):
            if getattr(fmt, k):
                raise ValueError(f"{key}.{k}: applies to delimited text only")


def input_columns(fmt: FormatSpec) -> list[str] | None:
    """Column names a format gives (None: from the header / the Parquet schema)."""
    if fmt.type == "delimited":
        return list(fmt.columns) or None
    if fmt.type in ("libsvm", "libffm"):
        return ["label"] + [c for f in fmt.fields for c in (f, f"{f}_value")]
    return None


def parse_threshold(text: str) -> tuple[str, float]:
    m = _THRESHOLD.match(text)
    if not m:
        raise ValueError(f"label.threshold: {text!r} is not like '> 3' or '>= 0.5'")
    try:
        return m.group(1), float(m.group(2))
    except ValueError:
        raise ValueError(f"label.threshold: {m.group(2)!r} is not a number") from None


def check_spec(spec: DatasetSpec) -> None:
    """The checks types cannot express; raise ValueError naming the key."""
    check_format(spec.format, "format")
    _check_label(spec.label)
    if spec.min_count < 1:
        raise ValueError(f"min_count: must be >= 1, got {spec.min_count}")
    names: set[str] = set()
    sparse_single: set[str] = set()
    for i, f in enumerate(spec.fields):
        key = f"fields[{i}]"
        if not f.name:
            raise ValueError(f"{key}.name: required")
        key = f"fields[{i}] ({f.name})"
        for out in _check_field(f, key, sparse_single):
            if out in names or out == "label":
                raise ValueError(f"{key}: output name {out!r} is used twice (or is 'label')")
            names.add(out)
    if not spec.fields:
        raise ValueError("fields: at least one field is required")
    if not any(f.type != "numeric" or f.bucketize for f in spec.fields):
        raise ValueError("fields: at least one sparse (categorical) feature is required")
    for i, j in enumerate(spec.joins):
        key = f"joins[{i}]"
        for k in ("name", "path", "key"):
            if not getattr(j, k):
                raise ValueError(f"{key}.{k}: required")
        check_format(j.format, f"{key}.format")
        j.on = j.on or j.key
    _check_split(spec.split)


def _check_label(label: LabelSpec) -> None:
    rules = [k for k in ("threshold", "positive", "map") if getattr(label, k)]
    if len(rules) != 1:
        raise ValueError(f"label: give exactly one of threshold, positive, map (got {rules or 'none'})")
    if label.threshold:
        parse_threshold(label.threshold)
    for k, v in label.map.items():
        if v not in (0, 1) or isinstance(v, bool):
            raise ValueError(f"label.map: {k!r} maps to {v!r}, not 0 or 1")


def _check_field(f: FieldSpec, key: str, sparse_single: set[str]) -> list[str]:
    """Check one field (`key` names it) and fill in its defaults; returns the names of its outputs.

    Adds the field to `sparse_single` when it makes one single-valued sparse feature (what a later
    cross may name).
    """
    if f.type not in FIELD_TYPES:
        raise ValueError(f"{key}.type: {f.type!r} is not one of {list(FIELD_TYPES)}")
    f.column = f.column or f.name
    f.separator = unescape(f.separator)
    if f.min_count is not None and f.min_count < 1:
        raise ValueError(f"{key}.min_count: must be >= 1, got {f.min_count}")
    if f.hash_buckets < 0:
        raise ValueError(f"{key}.hash_buckets: must be >= 0, got {f.hash_buckets}")
    if f.min_count is not None and (f.hash_buckets or f.bucketize == "quantile"):
        raise ValueError(f"{key}.min_count: a hashed or quantile field has no vocabulary")
    if f.type == "numeric":
        outputs = _check_numeric(f, key, sparse_single)
    else:
        outputs = [f.name]
        for k in ("dense", "dense_name", "bucketize"):
            if getattr(f, k):
                raise ValueError(f"{key}.{k}: applies to numeric fields only")
    if f.type == "flags" and not f.columns:
        raise ValueError(f"{key}.columns: required for a flags field")
    if f.type != "flags" and f.columns:
        raise ValueError(f"{key}.columns: applies to flags fields only")
    if f.separator and f.type != "categorical":
        raise ValueError(f"{key}.separator: applies to categorical fields only")
    if f.type in ("categorical", "regex", "hour", "weekday", "cross") and not f.separator:
        sparse_single.add(f.name)
    if f.type in ("hour", "weekday"):
        _check_time(f, key)
    if f.type == "regex":
        try:
            compiled = re.compile(f.pattern)
        except re.error as e:
            raise ValueError(f"{key}.pattern: {e}") from None
        if not f.pattern or compiled.groups > 1:
            raise ValueError(f"{key}.pattern: need a pattern with at most one group")
    if f.type == "cross":
        if len(f.fields) != 2:
            raise ValueError(f"{key}.fields: a cross needs two fields")
        for other in f.fields:
            if other not in sparse_single or other == f.name:
                raise ValueError(f"{key}.fields: {other!r} is not an earlier single-valued sparse field")
    elif f.fields:
        raise ValueError(f"{key}.fields: applies to cross fields only")
    return outputs


def _check_numeric(f: FieldSpec, key: str, sparse_single: set[str]) -> list[str]:
    """A numeric field's checks; names its dense output; returns its outputs (dense, then sparse)."""
    if f.dense not in DENSE_TRANSFORMS:
        raise ValueError(f"{key}.dense: {f.dense!r} is not one of {list(DENSE_TRANSFORMS)}")
    if f.bucketize not in BUCKETIZERS:
        raise ValueError(f"{key}.bucketize: {f.bucketize!r} is not one of {list(BUCKETIZERS)}")
    if not f.dense and not f.bucketize:
        raise ValueError(f"{key}: a numeric field needs dense and/or bucketize")
    if f.bucketize == "log2" and not f.integer:
        raise ValueError(f"{key}.bucketize: log2 needs integer: true")
    if f.bucketize == "quantile" and f.num_buckets < 2:
        raise ValueError(f"{key}.num_buckets: must be >= 2, got {f.num_buckets}")
    if f.hash_buckets:
        raise ValueError(f"{key}.hash_buckets: does not apply to a numeric field")
    outputs = []
    if f.dense:
        f.dense_name = f.dense_name or (f"{f.name}_dense" if f.bucketize else f.name)
        outputs.append(f.dense_name)
    if f.bucketize:
        outputs.append(f.name)
        sparse_single.add(f.name)
    return outputs


def _check_time(f: FieldSpec, key: str) -> None:
    """An hour or weekday field's time format and zone."""
    if f.time_format in ("unix", "unix_ms"):
        if not f.timezone or f.timezone == "local":
            raise ValueError(f"{key}.timezone: required with unix times (an IANA name, e.g. UTC)")
        _check_zone(f.timezone, key)
    elif "%" not in f.time_format:
        raise ValueError(
            f"{key}.time_format: {f.time_format!r} is neither unix, unix_ms nor a strptime format"
        )
    elif f.timezone not in ("", "local"):
        raise ValueError(f"{key}.timezone: a strptime time is local already; give 'local' or nothing")


def _check_split(split: SplitSpec) -> None:
    if split.method not in SPLIT_METHODS:
        raise ValueError(f"split.method: {split.method!r} is not one of {list(SPLIT_METHODS)}")
    if len(split.fractions) != 3 or min(split.fractions) < 0 or abs(sum(split.fractions) - 1) > 1e-6:
        raise ValueError(
            f"split.fractions: {split.fractions} are not three non-negative numbers summing to 1"
        )
    if split.seed < 0:
        raise ValueError(f"split.seed: must be >= 0, got {split.seed}")
    if split.method == "files":
        if not split.train:
            raise ValueError("split.train: required with method files (glob patterns of file names)")
    elif split.train or split.valid or split.test:
        raise ValueError("split.train/valid/test: apply to method files only")
    if split.column and split.method == "files":
        raise ValueError("split.column: applies to methods random/temporal only (used when temporal)")


def _check_zone(name: str, key: str) -> None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{key}.timezone: unknown time zone {name!r}") from None


def spec_to_dict(spec: DatasetSpec) -> dict[str, Any]:
    """Plain data of a spec (as stored in schema.json `extra.spec`)."""
    return dataclasses.asdict(spec)
