"""Reading raw input as a `DatasetSpec` (pep_torchrec/data/spec.py) says: files → blocks of checked rows.

The text path builds on `readers.DelimitedFile` (exact line numbers, gzip sniffing and salvage, the
per-line checks: field count, encoding, NUL bytes, long lines and values) and adds what a spec may ask
for: another ASCII-compatible encoding (each block is transcoded to UTF-8 before the checks), quoting
(the field count ignores delimiters between quotes), libSVM / libFFM lines (parsed with Arrow's string
kernels), and Parquet files (read in record batches). Every block is then joined with the side tables
and turned into a `SpecBlock`: labels, each sparse field's vocabulary keys, each numeric field's
values, record numbers and (temporal / given-files split) what places the row in a split.

Row reject reasons added to `rejections.py`'s: bad_number (a numeric field that is not a number),
bad_timestamp (an hour/weekday source that is not a time), bad_order_key (the temporal split's column
is not a number), bad_pair (a libSVM/libFFM item that is not `idx:val` / `field:idx:val`, or names an
unknown field), unbalanced_quote, unknown_<join> (a key absent from that side table); side-table lines
that cannot be used are `bad_side_row` (counted apart from the main input's rows).

Legend: N = rows in a block, C = columns of a flags field.
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import gzip
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pep_torchrec.data.raw.readers import (
    DEFAULT_BLOCK_SIZE,
    INT_PATTERN,
    MAX_LINE_BYTES,
    DelimitedFile,
    RawBlock,
    RowChecks,
    SourceFile,
    is_gzip,
    matches,
    natural_key,
    to_int64,
)
from pep_torchrec.data.raw.rejections import FILE_REASONS, PrepareError, Reject
from pep_torchrec.data.spec import (
    DatasetSpec,
    FieldSpec,
    FormatSpec,
    JoinSpec,
    input_columns,
    parse_threshold,
)
from pep_torchrec.data.vocab import criteo_log_bucket

FLOAT_PATTERN = r"^[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$"
CROSS_SEPARATOR = "\x1f"
_PARQUET_BATCH_ROWS = 65_536


# ---------------------------------------------------------------------------------------------------
# input files


def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def resolve_inputs(raws: list[str | os.PathLike], patterns: list[str]) -> list[Path]:
    """The main input files: each `--raw` is a file, a glob, or a directory (its files matching
    `patterns`, every non-hidden file without). Each raw's files in natural order, raws in the order given.

    Raises:
        PrepareError: a raw that does not exist or matches no file; a file named twice.
    """
    files: list[Path] = []
    for raw in raws:
        text = str(raw)
        path = Path(text)
        if path.is_file():
            found = [path]
        elif path.is_dir():
            candidates = {p for pat in (patterns or ["*"]) for p in path.glob(pat)}
            found = sorted(
                (p for p in candidates if p.is_file() and not p.name.startswith(".")), key=natural_key
            )
            if not found:
                raise PrepareError(f"{path}: no input file matching {patterns or ['*']}")
        elif _has_magic(text):
            found = sorted((Path(p) for p in glob.glob(text) if Path(p).is_file()), key=natural_key)
            if not found:
                raise PrepareError(f"{text}: no file matches")
        else:
            raise PrepareError(f"{text}: no such file or directory")
        files += found
    seen = set()
    for f in files:
        if f.resolve() in seen:
            raise PrepareError(f"{f}: given twice in --raw")
        seen.add(f.resolve())
    return files


def side_table_path(raws: list[str | os.PathLike], path: str, where: str) -> Path:
    """A side table's file: absolute, or relative to the first `--raw` directory (its parent if it is a
    file); `<path>.gz` is tried too (one of the two must exist)."""
    p = Path(path)
    if not p.is_absolute():
        first = Path(str(raws[0])) if raws else Path(".")
        base = first if first.is_dir() else first.parent
        p = base / p
    found = [q for q in (p, Path(f"{p}.gz")) if q.is_file()]
    if len(found) != 1:
        what = "both" if found else "neither"
        raise PrepareError(f"{where}: {what} of {p} and {p}.gz found")
    return found[0]


# ---------------------------------------------------------------------------------------------------
# text files


class SpecTextFile(DelimitedFile):
    """`DelimitedFile` plus an encoding and a quote character.

    Args:
        path, column_names, delimiter, header, block_size, source: as `DelimitedFile`.
        quote: b"" for no quoting, else the one-byte quote character.
        encoding: the file's (ASCII-compatible) text encoding.
    """

    def __init__(self, path, column_names, *, delimiter: bytes, header: bool, quote: bytes = b"",
                 encoding: str = "utf-8", block_size: int = DEFAULT_BLOCK_SIZE,
                 source: SourceFile | None = None):  # fmt: skip
        multi = delimiter if len(delimiter) > 1 else None  # e.g. b"::": read as b"\x1f" (never in data)
        super().__init__(path, column_names, delimiter=b"\x1f" if multi else delimiter, header=header,
                         multi_byte_delimiter=multi, block_size=block_size, source=source)  # fmt: skip
        self.quote = quote
        self.encoding = encoding.lower().replace("_", "-")
        self._utf8 = self.encoding in ("utf-8", "utf8", "ascii")

    def _to_utf8(self, data: bytes) -> bytes:
        if self._utf8 or data.isascii():
            return data
        try:
            return data.decode(self.encoding).encode("utf-8")
        except UnicodeDecodeError:  # line by line: the bad ones become invalid UTF-8 (bad_encoding)
            out = []
            for line in data.split(b"\n"):
                try:
                    out.append(line.decode(self.encoding).encode("utf-8"))
                except UnicodeDecodeError:
                    out.append(b"\xff")
            return b"\n".join(out)

    def _set_header(self, line: bytes) -> None:
        if self.quote or not self._utf8:
            text = line.rstrip(b"\r\n").decode(self.encoding, errors="replace")
            fields = next(csv.reader([text], delimiter=self.delimiter.decode(),
                                     quotechar=self.quote.decode() or None, quoting=csv.QUOTE_MINIMAL if self.quote else csv.QUOTE_NONE))  # fmt: skip
            if self.column_names is None:
                self.column_names = fields
            elif fields != self.column_names:
                raise PrepareError(
                    f"{self.path}:1: header {fields} differs from the expected columns {self.column_names}"
                )
            self.header_fields = fields
            return
        super()._set_header(line)

    def _parse(self, data: bytes, first_line: int, where: str) -> RawBlock:
        data = self._to_utf8(data)
        if not self.quote:
            return super()._parse(data, first_line, where)
        return self._parse_quoted(data, first_line, where)

    def _parse_quoted(self, data: bytes, first_line: int, where: str) -> RawBlock:
        """`DelimitedFile._parse` with a field count that skips delimiters between quotes."""
        num_fields = len(self.column_names)
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        arr = np.frombuffer(data, dtype=np.uint8)
        ends = np.flatnonzero(arr == 10)  # [N]
        n = len(ends)
        lines = np.arange(first_line, first_line + n, dtype=np.int64)
        starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
        quotes_upto = np.cumsum(arr == self.quote[0])  # [bytes] quotes at or before each byte
        before_start = np.where(starts > 0, quotes_upto[np.maximum(starts - 1, 0)], 0)
        line_quotes = quotes_upto[ends] - before_start
        delims = np.flatnonzero(arr == self.delimiter[0])
        owner = np.searchsorted(ends, delims)  # line of each delimiter
        inside = (quotes_upto[delims] - before_start[owner]) % 2 == 1
        num_found = np.bincount(owner[~inside], minlength=n) + 1
        rejects: list = []
        ok = np.ones(n, dtype=bool)
        unbalanced = line_quotes % 2 == 1
        too_long = (ends - starts) > MAX_LINE_BYTES
        for reason, bad, detail in (
            ("line_too_long", too_long, f"line longer than {MAX_LINE_BYTES:,} bytes"),
            ("unbalanced_quote", unbalanced & ~too_long, "an odd number of quote characters"),
        ):
            if bad.any():
                rejects.append(Reject(reason, lines[bad], detail))
                ok &= ~bad
        wrong = ok & (num_found != num_fields)
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            rejects.append(Reject("wrong_field_count", lines[wrong],
                                  f"expected {num_fields} fields, found {int(num_found[i])}"))  # fmt: skip
            ok &= ~wrong
        return self._finish(data, arr, starts, ends, lines, ok, rejects, f"{where}:{first_line}")

    def _read_csv(self, data: bytes) -> pa.Table:
        if not self.quote:
            return super()._read_csv(data)
        names = self.column_names
        return pacsv.read_csv(
            pa.py_buffer(data),
            read_options=pacsv.ReadOptions(column_names=names, use_threads=True, block_size=4 << 20),
            parse_options=pacsv.ParseOptions(delimiter=self.delimiter.decode(), quote_char=self.quote.decode(),
                                             double_quote=True, newlines_in_values=False, ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                 strings_can_be_null=False, quoted_strings_can_be_null=False),
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# libSVM / libFFM


@dataclass(frozen=True)
class FieldMap:
    """libSVM feature index → field (`format.field_map`): [M] index strings, [M] field numbers."""

    indices: pa.Array
    fields: np.ndarray
    path: Path

    @classmethod
    def load(cls, path: Path, names: list[str]) -> FieldMap:
        """Read lines `index field` (whitespace-separated; field = a name of `format.fields`)."""
        indices, fields = [], []
        number = {name: i for i, name in enumerate(names)}
        opener = gzip.open if is_gzip(path) else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2 or parts[1] not in number:
                    raise PrepareError(f"{path}:{line_no}: expected 'index field' with field one of {names}, "
                                       f"got {line.strip()!r}")  # fmt: skip
                indices.append(parts[0])
                fields.append(number[parts[1]])
        if len(set(indices)) != len(indices):
            raise PrepareError(f"{path}: an index is mapped twice")
        return cls(pa.array(indices, pa.string()), np.asarray(fields, np.int64), path)


def _libsvm_columns(raw: RawBlock, fmt: FormatSpec, field_map: FieldMap | None = None) -> RawBlock:
    """A block of whole lines (column "line") → label, <field>, <field>_value columns.

    libsvm: the i-th `idx:val` item is field i; libffm: `field:idx:val` with field a 0-based index
    into `fmt.fields`. A field given several times in a line becomes a space-separated bag; a field
    not given is "".
    """
    names = fmt.fields
    n = raw.table.num_rows
    line = pc.utf8_trim_whitespace(raw.table.column("line").combine_chunks())
    tokens = pc.utf8_split_whitespace(line)  # [N] list<string>; an empty line is [""]
    label = pc.list_element(tokens, 0)
    items = pc.list_slice(tokens, 1)
    counts = pc.list_value_length(items).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(items)
    parent = pc.list_parent_indices(items).to_numpy(zero_copy_only=False).astype(np.int64)
    parts = pc.split_pattern(flat, ":")
    num_parts = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
    want = 2 if fmt.type == "libsvm" else 3
    item_ok = num_parts == want
    checks = RowChecks(raw.lines)
    if field_map is not None:  # libsvm with an index → field map: the item's index names its field
        idx_text = pc.list_element(pc.if_else(pa.array(item_ok), parts, pa.scalar(["", ""], parts.type)), 0)
        pos = pc.fill_null(pc.index_in(idx_text, value_set=field_map.indices), -1).to_numpy(
            zero_copy_only=False
        )
        field_of = (
            np.where(pos >= 0, field_map.fields[np.maximum(pos, 0)], -1)
            if len(pos)
            else np.empty(0, np.int64)
        )
        item_ok &= field_of >= 0
    elif fmt.type == "libsvm":
        checks.check("wrong_field_count", counts <= len(names),
                     lambda i: f"{int(counts[i])} items, the spec names {len(names)} fields")  # fmt: skip
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        field_of = np.arange(len(parent)) - first[parent] if len(parent) else np.empty(0, np.int64)
    else:
        field_text = pc.list_element(
            pc.if_else(pa.array(item_ok), parts, pa.scalar(["0", "", ""], parts.type)), 0
        )
        numeric = matches(field_text, r"^[0-9]{1,9}$")
        field_of = np.where(numeric, to_int64(field_text, numeric), -1)
        item_ok &= (field_of >= 0) & (field_of < len(names))
    bad_item = np.zeros(n, dtype=bool)
    bad_item[parent[~item_ok]] = True
    example = {int(parent[j]): flat[int(j)].as_py() for j in np.flatnonzero(~item_ok)[:1]}
    if field_map is not None:
        shape = f"idx:val with idx in {field_map.path.name}"
    else:
        shape = "idx:val" if fmt.type == "libsvm" else f"field:idx:val with field in 0..{len(names) - 1}"
    checks.check("bad_pair", ~bad_item, lambda i: f"item {example.get(i, '?')!r} is not {shape}")
    safe = pc.if_else(pa.array(item_ok), parts, pa.scalar([""] * want, parts.type))
    idx = pc.list_element(safe, want - 2)
    val = pc.list_element(safe, want - 1)
    columns = {"label": label}
    keep = item_ok & (field_of >= 0) & (field_of < len(names))
    for f, name in enumerate(names):
        sel = keep & (field_of == f)
        rows = parent[sel]
        offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]).astype(np.int32)
        for column, values in ((name, idx), (f"{name}_value", val)):
            bags = pa.ListArray.from_arrays(pa.array(offsets), values.filter(pa.array(sel)))
            columns[column] = pc.binary_join(bags, " ")
    table = pa.table(columns)
    if not checks.alive.all():
        table = table.filter(pa.array(checks.alive))
    return RawBlock(table, raw.lines[checks.alive], raw.rejects + checks.rejects)


# ---------------------------------------------------------------------------------------------------
# one file of any format


class InputFile:
    """One input file of a format, read block by block as string columns.

    After a complete pass, `data_lines` is the number of data lines (rows) of the file, good or bad;
    `first_data_line` is the line number of the first of them.
    """

    def __init__(self, path: Path, fmt: FormatSpec, block_size: int, source: SourceFile | None,
                 field_map: FieldMap | None = None):  # fmt: skip
        self.path, self.fmt, self.block_size, self.source = path, fmt, block_size, source
        self.field_map = field_map
        self.data_lines = 0
        self.first_data_line = 2 if (fmt.type == "delimited" and fmt.header) else 1
        self.columns: list[str] | None = input_columns(fmt)

    def blocks(self) -> Iterator[RawBlock]:
        if self.fmt.type == "parquet":
            yield from self._parquet_blocks()
            return
        fmt = self.fmt
        if fmt.type == "delimited":
            text = SpecTextFile(self.path, fmt.columns or None, delimiter=fmt.delimiter.encode(), header=fmt.header,
                                quote=fmt.quote.encode(), encoding=fmt.encoding, block_size=self.block_size,
                                source=self.source)  # fmt: skip
        else:
            text = SpecTextFile(self.path, ["line"], delimiter=b"\x1f", header=False, block_size=self.block_size,
                                source=self.source)  # fmt: skip
        for raw in text.blocks():
            if fmt.type == "delimited":
                self.columns = text.column_names
            elif raw.table.num_rows or "line" in raw.table.column_names:
                raw = (
                    _libsvm_columns(raw, fmt, self.field_map)
                    if raw.table.num_rows
                    else RawBlock(self._empty(), raw.lines, raw.rejects)
                )
            yield raw
        self.data_lines = text.data_lines

    def _empty(self) -> pa.Table:
        return pa.table({c: pa.array([], pa.string()) for c in self.columns or []})

    def _parquet_blocks(self) -> Iterator[RawBlock]:
        try:
            pfile = pq.ParquetFile(self.path)
        except (pa.ArrowInvalid, OSError) as e:
            raise PrepareError(f"{self.path}: not a readable Parquet file ({e})") from None
        if self.source is not None:
            _hash_file(self.path, self.source)
        self.columns = list(pfile.schema_arrow.names)
        row = 1
        for batch in pfile.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            columns = {}
            for name in batch.schema.names:
                col = batch.column(name)
                if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                    columns[name] = clean_bags(
                        pc.cast(col, pa.list_(pa.string()))
                    )  # a multi-valued field's bag
                else:
                    try:
                        columns[name] = pc.fill_null(pc.cast(col, pa.string()), "")
                    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                        raise PrepareError(
                            f"{self.path}: column {name!r} of type {col.type} cannot be read as text"
                        ) from None
            lines = np.arange(row, row + batch.num_rows, dtype=np.int64)
            row += batch.num_rows
            yield RawBlock(pa.table(columns) if columns else self._empty(), lines, [])
        self.data_lines = row - 1
        if self.data_lines == 0:
            yield RawBlock(
                self._empty(), np.empty(0, np.int64), [Reject("empty_file", np.array([1]), "no data row")]
            )


def _hash_file(path: Path, source: SourceFile) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        for piece in iter(lambda: f.read(1 << 20), b""):
            h.update(piece)
    source.bytes, source.mtime_ns, source.sha256, source.compressed = (
        st.st_size,
        st.st_mtime_ns,
        h.hexdigest(),
        False,
    )


# ---------------------------------------------------------------------------------------------------
# side tables


@dataclass
class SideTable:
    """A side table read whole: its keys and the columns it joins, both [M]."""

    spec: JoinSpec
    path: Path
    keys: pa.Array
    columns: dict[str, pa.Array]
    rejects: list[Reject] = field(default_factory=list)
    source: SourceFile | None = None

    @classmethod
    def load(cls, spec: JoinSpec, path: Path, block_size: int, hash_files: bool) -> SideTable:
        source = SourceFile(str(path.resolve()), f"side:{spec.name}") if hash_files else None
        reader = InputFile(path, spec.format, block_size, source)
        tables, rejects = [], []
        for raw in reader.blocks():
            for r in raw.rejects:  # its lines are not rows of the main input: counted apart
                rejects.append(
                    r
                    if r.reason in FILE_REASONS
                    else Reject("bad_side_row", r.lines, f"{r.reason}: {r.detail}")
                )
            if raw.table.num_rows:
                tables.append((raw.table, raw.lines))
        names = reader.columns or []
        where = f"joins {spec.name} ({path})"
        if spec.key not in names:
            raise PrepareError(f"{where}: key column {spec.key!r} not among its columns {names}")
        wanted = spec.columns or [c for c in names if c != spec.key]
        missing = [c for c in wanted if c not in names]
        if missing:
            raise PrepareError(f"{where}: columns {missing} not among its columns {names}")
        if tables:
            table = pa.concat_tables([t for t, _ in tables])
            lines = np.concatenate([ln for _, ln in tables])
        else:
            table, lines = pa.table({c: pa.array([], pa.string()) for c in names}), np.empty(0, np.int64)
        keys = table.column(spec.key).combine_chunks()
        # A repeated key: the first line wins, the others are bad side rows.
        encoded = pc.dictionary_encode(keys).indices.to_numpy(zero_copy_only=False)
        _, first = np.unique(encoded, return_index=True)
        dup = np.ones(len(keys), dtype=bool)
        dup[first] = False
        if dup.any():
            j = int(np.flatnonzero(dup)[0])
            rejects.append(Reject("bad_side_row", np.sort(lines[dup]), f"duplicate key {keys[j].as_py()!r}"))
            keep = pa.array(~dup)
            table, keys = table.filter(keep), keys.filter(keep)
        columns = {c: table.column(c).combine_chunks() for c in wanted}
        return cls(spec, path, keys, columns, sorted(rejects, key=lambda r: r.first_line), source)

    def positions(self, on: pa.Array) -> np.ndarray:
        """[N] row of each key in this table, -1 where absent."""
        pos = pc.index_in(on, value_set=self.keys)
        return pc.fill_null(pos, -1).to_numpy(zero_copy_only=False).astype(np.int64)


# ---------------------------------------------------------------------------------------------------
# blocks of checked rows


@dataclass
class SpecBlock:
    """The kept rows of one block.

    Attributes:
        labels: [N] int8.
        keys: sparse field → [N] string (vocabulary key before hashing) or list<string> (a bag).
        numbers: numeric field → ([N] float64 value, [N] bool missing).
        records: [N] int64 global record number (0-based data line over all files, rejects included).
        path: the file.
        order_keys: [N] float64 temporal key, or None.
        split_code: the file's split index (split method files), or None.
        rejects, filtered: as `readers.ParsedBlock`.
    """

    labels: np.ndarray
    keys: dict[str, pa.Array]
    numbers: dict[str, tuple[np.ndarray, np.ndarray]]
    records: np.ndarray
    path: str
    order_keys: np.ndarray | None = None
    split_code: int | None = None
    rejects: list[Reject] = field(default_factory=list)
    filtered: dict[str, int] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return len(self.labels)


def fnv1a64(strings: pa.Array) -> np.ndarray:
    """[N] uint64 FNV-1a 64-bit hash of each string's UTF-8 bytes (the hashing of `hash_buckets`)."""
    strings = strings.cast(pa.large_string())
    n = len(strings)
    h = np.full(n, 0xCBF29CE484222325, dtype=np.uint64)
    if n == 0:
        return h
    buffers = strings.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int64)[strings.offset : strings.offset + n + 1]
    data = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None else np.empty(0, np.uint8)
    lengths = np.diff(offsets)
    prime = np.uint64(0x100000001B3)
    active = np.arange(n)
    for j in range(int(lengths.max(initial=0))):
        active = active[lengths[active] > j]
        h[active] = (h[active] ^ data[offsets[active] + j].astype(np.uint64)) * prime
    return h


def _float_values(column: pa.Array, integer: bool) -> tuple[np.ndarray, np.ndarray]:
    """[N] bool ok (empty or a number), [N] float64 values (0 where missing or bad)."""
    if integer:
        ok = matches(column, f"^$|{INT_PATTERN}")
        return ok, to_int64(column, ok).astype(np.float64)
    ok = matches(column, f"^$|{FLOAT_PATTERN}")
    clean = pc.if_else(pa.array(ok & ~matches(column, "^$")), column, "0")
    return ok, pc.cast(clean, pa.float64()).to_numpy(zero_copy_only=False)


class _LabelRule:
    """The spec's label rule, vectorised: labels and which rows are bad or dropped."""

    def __init__(self, spec: DatasetSpec):
        label = spec.label
        self.threshold = parse_threshold(label.threshold) if label.threshold else None
        given = list(label.positive) + list(label.map) + list(label.drop)
        # Numbers in the spec compare numerically ("+1" is 1, "4.0" is 4); strings compare as strings.
        self.numeric = self.threshold is not None or all(_is_number(v) for v in given)
        self.positive = self._values(label.positive)
        self.map_keys = self._values(list(label.map))
        self.map_labels = np.array(list(label.map.values()), dtype=np.int8)
        self.drop = self._values(label.drop)

    def _values(self, values: list) -> np.ndarray:
        if self.numeric:
            return np.array([float(v) for v in values], dtype=np.float64)
        return np.array([str(v) for v in values], dtype=object)

    def apply(self, column: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray, Callable[[int], str]]:
        """([N] int8 label, [N] bool ok, [N] bool dropped, row → what is wrong with its label)."""
        if self.numeric:
            number = matches(column, FLOAT_PATTERN)
            values = pc.cast(pc.if_else(pa.array(number), column, "0"), pa.float64()).to_numpy(
                zero_copy_only=False
            )
        else:
            values = np.asarray(column.to_numpy(zero_copy_only=False), dtype=object)
            number = np.ones(len(values), dtype=bool)
        ok = number.copy()
        dropped = np.isin(values, self.drop) & ok if len(self.drop) else np.zeros(len(values), dtype=bool)
        if self.threshold is not None:
            op, t = self.threshold
            ops = {">": np.greater, ">=": np.greater_equal, "<": np.less, "<=": np.less_equal,
                   "==": np.equal, "!=": np.not_equal}  # fmt: skip
            labels = ops[op](values, t)
        elif len(self.map_keys):
            pos = _index(self.map_keys, values)
            ok &= (pos >= 0) | dropped
            labels = np.where(pos >= 0, self.map_labels[np.maximum(pos, 0)], 0)
        else:
            labels = np.isin(values, self.positive)
        keys = self.map_keys.tolist()

        def detail(i: int) -> str:
            what = "a number" if not number[i] else f"one of the label map's keys {keys}"
            return f"label {column[i].as_py()!r} is not {what}"

        return np.asarray(labels, dtype=np.int8), ok, dropped & ok, detail


def _index(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.full(len(values), -1, dtype=np.int64)
    for i, k in enumerate(keys):
        out[values == k] = i
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _split_bags(column: pa.Array, separator: str) -> pa.Array:
    """[N] string → [N] list<string> split on `separator`, empty items dropped."""
    return clean_bags(pc.split_pattern(column, separator))


def clean_bags(bags: pa.Array) -> pa.Array:
    """[N] list<string> without null or empty items (a null bag is empty)."""
    flat = pc.list_flatten(bags)
    parent = pc.list_parent_indices(bags).to_numpy(zero_copy_only=False)
    keep = np.asarray(pc.fill_null(pc.not_equal(flat, ""), False).to_numpy(zero_copy_only=False), dtype=bool)
    counts = np.bincount(parent[keep], minlength=len(bags))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), flat.filter(pa.array(keep)))


def _regex_values(column: pa.Array, pattern: re.Pattern, default: str) -> pa.Array:
    encoded = pc.dictionary_encode(column)
    out = []
    for value in encoded.dictionary.to_pylist():
        m = pattern.search(value)
        out.append(default if m is None else (m.group(1) if pattern.groups else m.group(0)) or default)
    return pa.array(out, pa.string()).take(encoded.indices)


def _time_key(f: FieldSpec) -> tuple[str, str, str]:
    return f.column, f.time_format, f.timezone


def _times(column: pa.Array, f: FieldSpec) -> tuple[np.ndarray, pa.Array]:
    """[N] bool ok, [N] timestamp (local wall time of the field's zone) of an hour/weekday source."""
    if f.time_format in ("unix", "unix_ms"):
        ok = matches(column, INT_PATTERN)
        ints = pa.array(to_int64(column, ok))
        unit = "s" if f.time_format == "unix" else "ms"
        return ok, ints.cast(pa.timestamp(unit, tz=f.timezone))
    parsed = pc.strptime(column, format=f.time_format, unit="s", error_is_null=True)
    return ~np.asarray(pc.is_null(parsed).to_numpy(zero_copy_only=False), dtype=bool), parsed


class SpecRows:
    """Turns blocks of string columns into `SpecBlock`s as the spec says (one instance per pass).

    Args:
        spec: the checked spec.
        side_tables: loaded side tables, in the spec's join order.
        serving: rows of a request: no label column (labels 0, nothing dropped), no split column.
    """

    def __init__(self, spec: DatasetSpec, side_tables: list[SideTable], serving: bool = False):
        self.spec = spec
        self.side_tables = side_tables
        self.serving = serving
        self.label = _LabelRule(spec)
        self.patterns = {f.name: re.compile(f.pattern) for f in spec.fields if f.type == "regex"}
        self.order_column = spec.split.column if spec.split.method == "temporal" and not serving else ""

    def required_columns(self) -> set[str]:
        """Columns of the main input (after joins) the spec reads."""
        need = {*(j.on for j in self.spec.joins)}
        if not self.serving:
            need.add(self.spec.label.column)
        for f in self.spec.fields:
            if f.type == "flags":
                need.update(f.columns)
            elif f.type != "cross":
                need.add(f.column)
        if self.order_column:
            need.add(self.order_column)
        return need

    def parse(self, raw: RawBlock, path: str, record_base: int, split_code: int | None) -> SpecBlock:
        """One block → its kept rows; `record_base + line` is a row's record number."""
        spec = self.spec
        table = raw.table
        n = table.num_rows
        checks = RowChecks(raw.lines)
        cols: dict[str, pa.Array] = {name: table.column(name).combine_chunks() for name in table.column_names}
        if self.serving:
            labels, dropped = np.zeros(n, np.int8), np.zeros(n, dtype=bool)
        else:
            labels, label_ok, dropped, label_detail = self.label.apply(cols[spec.label.column])
            checks.check("bad_label", label_ok, label_detail)
        for side in self.side_tables:
            pos = side.positions(cols[side.spec.on])
            found = pos >= 0
            on = cols[side.spec.on]
            checks.check(f"unknown_{side.spec.name}", found,
                         lambda i, on=on, side=side: f"{side.spec.on} {on[i].as_py()!r} is not in {side.path.name}")  # fmt: skip
            take = pa.array(np.maximum(pos, 0)) if len(side.keys) else None
            for c, values in side.columns.items():
                if take is None:
                    joined = pa.nulls(n, values.type)
                else:
                    joined = values.take(take)
                cols[side.spec.prefix + c] = (
                    joined if pa.types.is_list(joined.type) else pc.fill_null(joined, "")
                )
        numbers: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        times: dict[str, pa.Array] = {}
        for f in spec.fields:
            if f.type == "numeric":
                column = cols[f.column]
                ok, values = _float_values(column, f.integer)
                kind = "an integer" if f.integer else "a number"
                checks.check("bad_number", ok,
                             lambda i, c=column, f=f, k=kind: f"field {f.name} = {c[i].as_py()!r} is not {k}")  # fmt: skip
                missing = np.asarray(pc.equal(column, "").to_numpy(zero_copy_only=False), dtype=bool)
                numbers[f.name] = (values, missing)
            elif f.type in ("hour", "weekday") and _time_key(f) not in times:
                column = cols[f.column]
                ok, stamps = _times(column, f)
                checks.check("bad_timestamp", ok,
                             lambda i, c=column, f=f: f"field {f.name}: {c[i].as_py()!r} is not a {f.time_format} time")  # fmt: skip
                times[_time_key(f)] = stamps
        order_keys = None
        if self.order_column:
            column = cols[self.order_column]
            ok, order_keys = _float_values(column, False)
            ok &= ~np.asarray(pc.equal(column, "").to_numpy(zero_copy_only=False), dtype=bool)
            checks.check("bad_order_key", ok,
                         lambda i: f"split column {self.order_column} = {column[i].as_py()!r} is not a number")  # fmt: skip
        keep = checks.alive & ~dropped
        filtered = {"label_dropped": int((checks.alive & dropped).sum())}
        if not keep.all():
            mask = pa.array(keep)
            cols = {k: v.filter(mask) for k, v in cols.items()}
            numbers = {k: (v[keep], m[keep]) for k, (v, m) in numbers.items()}
            times = {k: v.filter(mask) for k, v in times.items()}
            order_keys = None if order_keys is None else order_keys[keep]
        keys = self._keys(cols, numbers, times)
        return SpecBlock(
            labels=labels[keep],
            keys=keys,
            numbers={f.name: numbers[f.name] for f in spec.fields if f.type == "numeric"},
            records=record_base + raw.lines[keep],
            path=path,
            order_keys=order_keys,
            split_code=split_code,
            rejects=raw.rejects + checks.rejects,
            filtered=filtered,
        )

    def _keys(self, cols, numbers, times) -> dict[str, pa.Array]:
        keys: dict[str, pa.Array] = {}
        for f in self.spec.fields:
            if f.type == "categorical":
                column = cols[f.column]
                if pa.types.is_list(column.type):  # already a bag (a Parquet list column)
                    keys[f.name] = column
                else:
                    keys[f.name] = _split_bags(column, f.separator) if f.separator else column
            elif f.type == "flags":
                flags = np.column_stack([np.asarray(pc.equal(cols[c], f.flag_value).to_numpy(zero_copy_only=False),
                                                    dtype=bool) for c in f.columns])  # [N, C]  # fmt: skip
                rows, which = np.nonzero(flags)  # row-major: each bag in column order
                offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=flags.shape[0]))])
                names = pa.array(np.asarray(f.columns, dtype=object)[which].tolist(), pa.string())
                keys[f.name] = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), names)
            elif f.type == "numeric" and f.bucketize == "log2":
                values, missing = numbers[f.name]
                buckets = pc.cast(pa.array(criteo_log_bucket(values.astype(np.int64))), pa.string())
                keys[f.name] = pc.if_else(pa.array(missing), "", buckets)
            elif f.type in ("hour", "weekday"):
                stamps = times[_time_key(f)]
                if f.type == "hour":
                    keys[f.name] = pc.utf8_lpad(pc.cast(pc.hour(stamps), pa.string()), 2, "0")
                else:
                    keys[f.name] = pc.cast(
                        pc.day_of_week(stamps, count_from_zero=True, week_start=1), pa.string()
                    )
            elif f.type == "regex":
                keys[f.name] = _regex_values(cols[f.column], self.patterns[f.name], f.default)
            elif f.type == "cross":
                a, b = (keys[name] for name in f.fields)
                if pa.types.is_list(a.type) or pa.types.is_list(b.type):
                    raise PrepareError(f"fields {f.name}: a cross needs single-valued fields; {f.fields} holds a "
                                       "list column")  # fmt: skip
                keys[f.name] = pc.binary_join_element_wise(a, b, CROSS_SEPARATOR)
        return keys


def split_of_file(path: Path, spec: DatasetSpec) -> int:
    """The split index (0 train, 1 valid, 2 test) of an input file under split method files."""
    hits = [i for i, patterns in enumerate((spec.split.train, spec.split.valid, spec.split.test))
            if any(fnmatch.fnmatch(path.name, p) for p in patterns)]  # fmt: skip
    if len(hits) != 1:
        what = "none" if not hits else "several"
        raise PrepareError(
            f"{path}: matches {what} of split.train/valid/test; each input file must match one"
        )
    return hits[0]
