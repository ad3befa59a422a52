"""Streaming raw input: plain or gzip files → blocks of complete lines → Arrow tables of strings.

Why not `pyarrow.csv.open_csv` directly: its `invalid_row_handler` only knows row numbers when it runs
single-threaded, it parses an empty line as a row of empty fields, and a gzip stream that breaks takes
the whole pending block with it. So this module cuts the (decompressed) byte stream into blocks of
complete lines itself, which gives every line its exact 1-based number, checks field counts and
encoding with NumPy on the raw bytes, and hands only well-formed lines to `pyarrow.csv.read_csv`, which
does the parsing proper. Memory is bounded by the block size (plus one gzip piece), never by the file.

Gzip is detected by its magic bytes, not by the file name; concatenated gzip members are read in
turn. A truncated or corrupt stream keeps every complete line decompressed before the break and
reports `broken_gzip` at the line after them.

The dataset readers (`criteo`, `avazu`, `movielens`) build on `DelimitedFile` and yield
`ParsedBlock`s through the `DatasetReader` interface that `prepare` drives.

Legend: N = rows (lines) in a block.
"""

from __future__ import annotations

import abc
import hashlib
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from pep_torchrec.data.raw.rejections import PrepareError, Reject
from pep_torchrec.data.schema import MAX_VALUE_CHARS

GZIP_MAGIC = b"\x1f\x8b"
DEFAULT_BLOCK_SIZE = 16 << 20
# Compressed bytes fed to zlib per call: bounds the decompressed output held at once (ratio × this).
_GZIP_PIECE = 256 << 10
# Replay step (compressed bytes) when salvaging the output before a corrupt spot.
_GZIP_SALVAGE_STEP = 512
# A line longer than this is rejected (`line_too_long`) and skipped without being held: no CTR row
# comes near it, and every accepted line then fits in one block of Arrow's CSV parser.
MAX_LINE_BYTES = 1 << 20


class _BrokenGzip(Exception):
    pass


# ---------------------------------------------------------------------------------------------------
# provenance


@dataclass
class SourceFile:
    """Provenance of one raw file (schema.source["files"]).

    Attributes:
        path: absolute path.
        role: what the file is to the dataset ("data", "ratings", "users", "items", "genres").
        bytes: size on disk.
        sha256: hex digest of the bytes as stored on disk (the compressed bytes of a gzip file).
        compressed: whether the content is gzip.
    """

    path: str
    role: str
    bytes: int = 0
    sha256: str = ""
    compressed: bool = False
    mtime_ns: int = 0

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "role": self.role,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "compressed": self.compressed,
        }


def is_gzip(path: str | os.PathLike) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


# ---------------------------------------------------------------------------------------------------
# lines


@dataclass(frozen=True)
class LineChunk:
    """Complete lines of a file, or the report of a broken gzip stream.

    Attributes:
        data: bytes of whole lines, each ending in b"\\n" (a final unterminated line gets one).
        first_line: 1-based number of the first line in `data` (or of the line where the stream broke).
        num_lines: lines in `data`.
        broken: None, or why the gzip stream broke (then `data` is empty; at most one chunk, of the
            lines salvaged before the break, follows).
        long_lines: numbers of lines before `data` that were longer than `MAX_LINE_BYTES` and skipped
            unread (they are not in `data` and not in `num_lines`).
    """

    data: bytes
    first_line: int
    num_lines: int
    broken: str | None = None
    long_lines: tuple[int, ...] = ()


# Stored bytes read so far from each file in its current pass, by resolved path: for progress meters
# (`pep_torchrec.data.prepare.progress`), which know the files and their sizes but not the readers' positions.
_BYTES_READ: dict[str, int] = {}


def bytes_read(path: str | os.PathLike) -> int:
    """Stored (compressed, for gzip) bytes read from `path` since it was last opened by a reader."""
    return _BYTES_READ.get(os.path.realpath(path), 0)


def reset_bytes_read(paths: Iterable[str | os.PathLike]) -> None:
    """Start a new pass over `paths` (files a pass has not opened yet count 0)."""
    for path in paths:
        _BYTES_READ[os.path.realpath(path)] = 0


def _raw_pieces(f, piece_size: int, hasher) -> Iterator[bytes]:
    key = os.path.realpath(f.name)
    while True:
        piece = f.read(piece_size)
        if not piece:
            return
        if hasher is not None:
            hasher.update(piece)
        _BYTES_READ[key] = _BYTES_READ.get(key, 0) + len(piece)
        yield piece


def _inflate(d, data: bytes) -> bytes:
    """`d.decompress(data)`; on corrupt data, raise `_BrokenGzip(message, output before the fault)`.

    A failing call returns nothing, so the piece is replayed from a copy of the decompressor state in
    small steps: the lines before the fault survive to within `_GZIP_SALVAGE_STEP` compressed bytes.
    """
    snapshot = d.copy()
    try:
        return d.decompress(data)
    except zlib.error as e:
        salvaged = []
        for start in range(0, len(data), _GZIP_SALVAGE_STEP):
            try:
                salvaged.append(snapshot.decompress(data[start : start + _GZIP_SALVAGE_STEP]))
            except zlib.error:
                break
        raise _BrokenGzip(f"corrupt gzip stream ({e})", b"".join(salvaged)) from None


def _gunzip(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """Decompress a gzip stream of one or more members; raise _BrokenGzip when it is cut or corrupt."""
    d = None
    for piece in pieces:
        data = piece
        while data:
            if d is None:
                if not data.strip(b"\0"):  # zero padding after the last member, as gzip(1) allows
                    break
                d = zlib.decompressobj(wbits=31)
            out = _inflate(d, data)
            if out:
                yield out
            if d.eof:
                data, d = d.unused_data, None
            else:
                data = b""
    if d is not None:
        try:
            out = d.flush()
        except zlib.error as e:
            raise _BrokenGzip(f"corrupt gzip stream ({e})") from None
        if out:
            yield out
        if not d.eof:
            raise _BrokenGzip("truncated gzip stream (ends before its end-of-stream marker)")


def iter_line_chunks(
    path: str | os.PathLike, block_size: int = DEFAULT_BLOCK_SIZE, source: SourceFile | None = None
) -> Iterator[LineChunk]:
    """Read a plain or gzip file as blocks of about `block_size` bytes of complete lines.

    Args:
        path: the file.
        block_size: target decompressed bytes per chunk (a longer line makes a longer chunk).
        source: if given, filled with size, gzip flag and the sha256 of the stored bytes (the whole file
            is hashed even when its gzip stream breaks early); complete once the last chunk is out.

    Yields:
        `LineChunk`s in file order; after a gzip break, one last chunk with `broken` set.
    """
    hasher = hashlib.sha256() if source is not None else None
    with open(path, "rb") as f:
        compressed = f.read(2) == GZIP_MAGIC
        f.seek(0)
        _BYTES_READ[os.path.realpath(path)] = 0
        if source is not None:
            st = os.fstat(f.fileno())
            source.bytes, source.mtime_ns, source.compressed = st.st_size, st.st_mtime_ns, compressed
        pieces = _raw_pieces(f, _GZIP_PIECE if compressed else block_size, hasher)
        stream = _gunzip(pieces) if compressed else pieces
        pending: list[bytes] = []
        pending_bytes = 0
        wanted = block_size  # bytes to gather before cutting a chunk
        line = 1
        broken = None
        long_lines: list[int] = []  # skipped since the last chunk
        skipping = False  # inside a line past MAX_LINE_BYTES: drop bytes up to its newline
        try:
            for piece in stream:
                if skipping:
                    end = piece.find(b"\n")
                    if end < 0:
                        continue
                    skipping, piece = False, piece[end + 1 :]
                    line += 1
                pending.append(piece)
                pending_bytes += len(piece)
                if pending_bytes < wanted:
                    continue
                data = b"".join(pending)
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # a line longer than a block: read on, doubling to stay linear
                    if pending_bytes > MAX_LINE_BYTES:
                        long_lines.append(line)
                        pending, pending_bytes, wanted, skipping = [], 0, block_size, True
                    else:
                        pending, wanted = [data], 2 * pending_bytes
                    continue
                chunk, rest = data[:cut], data[cut:]
                pending, pending_bytes, wanted = [rest], len(rest), block_size
                num = chunk.count(b"\n")
                yield LineChunk(chunk, line, num, long_lines=tuple(long_lines))
                long_lines = []
                line += num
        except _BrokenGzip as e:
            broken = e.args[0]
            pending.append(e.args[1] if len(e.args) > 1 else b"")
            for _ in _raw_pieces(f, 1 << 20, hasher):  # hash the rest: provenance is of the whole file
                pass
    if source is not None:
        # Everything is read and hashed: set it before the last yields, which a consumer may not resume.
        source.sha256 = hasher.hexdigest()
    yield from _last_chunks(pending, line, skipping, broken, long_lines)


def _last_chunks(
    pending: list[bytes], line: int, skipping: bool, broken: str | None, long_lines: list[int]
) -> Iterator[LineChunk]:
    """The end of `iter_line_chunks`: the bytes after its last cut (a final line may lack its newline).

    Yields the break's chunk if the gzip stream broke, then one chunk of the remaining lines and the
    long lines skipped since the last cut, if there are any.
    """
    data = b"".join(pending)
    if skipping and broken is None:  # the file ended inside the overlong line
        line += 1
    if broken is not None:
        # The text after the last newline is a line cut by the break: part of the broken stream.
        data = data[: data.rfind(b"\n") + 1]
    elif data and not data.endswith(b"\n"):
        data += b"\n"
    num = data.count(b"\n")
    if broken is not None:
        # Named before the lines salvaged from the failing piece: the bytes zlib put out before it
        # noticed the fault parse as garbage lines, and under --strict the break, not the first of
        # them, is the error to report (at the line after the salvaged ones, as before).
        yield LineChunk(b"", line + num, 0, broken=broken)
    if data or long_lines:
        yield LineChunk(data, line, num, long_lines=tuple(long_lines))


# ---------------------------------------------------------------------------------------------------
# delimited files


@dataclass
class RawBlock:
    """Well-formed lines of one block, parsed to strings, plus the block's rejected lines.

    Attributes:
        table: [N] one string column per field (missing field = "").
        lines: [N] int64 1-based line number of each row in its file.
        rejects: rejected lines of this block (wrong field count, bad encoding, broken gzip, empty file).
    """

    table: pa.Table
    lines: np.ndarray
    rejects: list[Reject] = field(default_factory=list)


class DelimitedFile:
    """One delimited text file read block by block, with exact line numbers.

    Args:
        path: the file (plain or gzip).
        column_names: names of the fields; None → taken from the header line (`header` must be True).
        delimiter: a one-byte field separator, e.g. b"\\t".
        header: whether the first line is a header (it is not a data line).
        multi_byte_delimiter: e.g. b"::" (MovieLens 1M): replaced by `delimiter` before parsing, so
            `delimiter` must be a byte that never occurs in the data (b"\\x1f" is a good choice).
        block_size: decompressed bytes per block.
        source: provenance record to fill (see `iter_line_chunks`).

    After a complete pass, `data_lines` holds the number of data lines (good or bad) of the file.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        column_names: list[str] | None,
        *,
        delimiter: bytes = b"\t",
        header: bool = False,
        multi_byte_delimiter: bytes | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        source: SourceFile | None = None,
    ):
        if len(delimiter) != 1:
            raise ValueError(f"delimiter must be one byte, got {delimiter!r}")
        if column_names is None and not header:
            raise ValueError("column_names are required for a file without header")
        self.path = Path(path)
        self.column_names = list(column_names) if column_names is not None else None
        self.delimiter = delimiter
        self.header = header
        self.multi_byte_delimiter = multi_byte_delimiter
        self.block_size = block_size
        self.source = source
        self.header_fields: list[str] | None = None
        self.data_lines = 0

    def blocks(self) -> Iterator[RawBlock]:
        """Yield the file's blocks in order; a file without any data line (and no gzip break) yields one
        `empty_file` reject."""
        where = str(self.path)
        first_data_line = 2 if self.header else 1
        self.data_lines = 0
        last_line = 0
        broken = False
        for chunk in iter_line_chunks(self.path, self.block_size, self.source):
            if chunk.broken is not None:  # the salvaged lines before the break follow
                broken = True
                rej = Reject("broken_gzip", np.array([chunk.first_line]), chunk.broken)
                yield RawBlock(self._empty_table(), np.empty(0, np.int64), [rej])
                continue
            if chunk.long_lines:
                rej = Reject("line_too_long", np.array(chunk.long_lines, np.int64),
                             f"line longer than {MAX_LINE_BYTES:,} bytes (skipped unread)")  # fmt: skip
                yield RawBlock(self._empty_table(), np.empty(0, np.int64), [rej])
                last_line = max(last_line, max(chunk.long_lines))
                self.data_lines = max(0, last_line - first_data_line + 1)
            data, first_line = chunk.data, chunk.first_line
            if not data:
                continue
            if self.multi_byte_delimiter:
                data = data.replace(self.multi_byte_delimiter, self.delimiter)
            if first_line == 1 and self.header:
                end = data.index(b"\n") + 1
                self._set_header(data[:end])
                data, first_line = data[end:], 2
            last_line = first_line + data.count(b"\n") - 1
            self.data_lines = max(0, last_line - first_data_line + 1)
            if data:
                yield self._parse(data, first_line, where)
        if self.data_lines == 0 and not broken:
            rej = Reject("empty_file", np.array([max(last_line, 1)]), "no data line")
            yield RawBlock(self._empty_table(), np.empty(0, np.int64), [rej])

    def _set_header(self, line: bytes) -> None:
        fields = line.rstrip(b"\r\n").decode("utf-8", errors="replace").split(self.delimiter.decode())
        self.header_fields = fields
        if self.column_names is None:
            self.column_names = fields
        elif fields != self.column_names:
            raise PrepareError(
                f"{self.path}:1: header {fields} differs from the expected columns {self.column_names}"
            )

    def _empty_table(self) -> pa.Table:
        names = self.column_names or []
        return pa.table({n: pa.array([], pa.string()) for n in names})

    def _parse(self, data: bytes, first_line: int, where: str) -> RawBlock:
        num_fields = len(self.column_names)
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        arr = np.frombuffer(data, dtype=np.uint8)
        ends = np.flatnonzero(arr == 10)  # [N] position of each line's b"\n"
        n = len(ends)
        lines = np.arange(first_line, first_line + n, dtype=np.int64)
        delims_before_end = np.searchsorted(np.flatnonzero(arr == self.delimiter[0]), ends)
        num_found = np.diff(delims_before_end, prepend=0) + 1  # [N] fields per line
        ok = num_found == num_fields
        rejects: list[Reject] = []
        starts = np.concatenate([[0], ends[:-1] + 1])
        too_long = (ends - starts) > MAX_LINE_BYTES  # whole in this chunk, but over the line limit
        if too_long.any():
            rejects.append(
                Reject("line_too_long", lines[too_long], f"line longer than {MAX_LINE_BYTES:,} bytes")
            )
            ok &= ~too_long
        if not ok.all() and (~ok & ~too_long).any():
            i = int(np.flatnonzero(~ok & ~too_long)[0])
            detail = f"expected {num_fields} fields, found {int(num_found[i])}"
            rejects.append(Reject("wrong_field_count", lines[~ok & ~too_long], detail))
        return self._finish(data, arr, starts, ends, lines, ok, rejects, f"{where}:{first_line}")

    def _finish(self, data: bytes, arr: np.ndarray, starts: np.ndarray, ends: np.ndarray, lines: np.ndarray,
                ok: np.ndarray, rejects: list[Reject], where: str) -> RawBlock:  # fmt: skip
        """The lines still `ok` after the format's own checks: rejected for bad values and bad
        encoding, then parsed into a table of one row per line that passed."""
        for reason, bad, detail in self._bad_values(data, arr, starts, ends, ok):
            rejects.append(Reject(reason, lines[bad], detail))
            ok &= ~bad
        bad_enc = self._bad_encoding(data, arr, ends) & ok
        if bad_enc.any():
            rejects.append(
                Reject("bad_encoding", lines[bad_enc], "not valid UTF-8 text, or a stray carriage return")
            )
            ok &= ~bad_enc
        if not ok.all():
            data = arr[np.repeat(ok, ends - starts + 1)].tobytes()
            lines = lines[ok]
        table = self._read_csv(data) if len(lines) else self._empty_table()
        if table.num_rows != len(lines):  # internal invariant: one table row per line that passed
            raise AssertionError(f"{where}: parsed {table.num_rows} rows from {len(lines)} lines")
        return RawBlock(table, lines, rejects)

    def _bad_values(self, data: bytes, arr: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                    ok: np.ndarray) -> list[tuple[str, np.ndarray, str]]:  # fmt: skip
        """(reason, [N] bool, detail) for lines (among `ok`) holding a NUL byte, or a value longer
        than the service accepts (`MAX_VALUE_CHARS`: such a value could never be scored)."""
        out = []
        nul = np.zeros(len(ends), dtype=bool)
        if b"\0" in data:
            nul[np.searchsorted(ends, np.flatnonzero(arr == 0))] = True
            nul &= ok
            if nul.any():
                out.append(("nul_byte", nul, "a NUL byte in the line"))
        # Only a line longer than the limit can hold a longer value: check those few in Python.
        long_value = np.zeros(len(ends), dtype=bool)
        delimiter = self.delimiter
        for i in np.flatnonzero(((ends - starts) > MAX_VALUE_CHARS) & ok & ~nul):
            fields = data[starts[i] : ends[i]].split(delimiter)
            long_value[i] = any(len(f.decode("utf-8", errors="replace")) > MAX_VALUE_CHARS for f in fields)
        if long_value.any():
            out.append(("value_too_long", long_value, f"a value longer than {MAX_VALUE_CHARS} characters"))
        return out

    @staticmethod
    def _bad_encoding(data: bytes, arr: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """[N] bool: lines that are not UTF-8 or hold a lone b"\\r" (Arrow would split the line there)."""
        bad = np.zeros(len(ends), dtype=bool)
        if b"\r" in data:
            bad[np.searchsorted(ends, np.flatnonzero(arr == 13))] = True
        if data.isascii():
            return bad
        pos = 0
        while pos < len(data):
            try:
                data[pos:].decode("utf-8")
                break
            except UnicodeDecodeError as e:
                i = int(np.searchsorted(ends, pos + e.start))
                bad[i] = True
                pos = int(ends[i]) + 1
        return bad

    def _read_csv(self, data: bytes) -> pa.Table:
        names = self.column_names
        return pacsv.read_csv(
            pa.py_buffer(data),
            read_options=pacsv.ReadOptions(column_names=names, use_threads=True, block_size=4 << 20),
            parse_options=pacsv.ParseOptions(
                delimiter=self.delimiter.decode(),
                quote_char=False,
                double_quote=False,
                escape_char=False,
                newlines_in_values=False,
                ignore_empty_lines=False,
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )


# ---------------------------------------------------------------------------------------------------
# vectorised row checks


class RowChecks:
    """Assigns each row of a block at most one reject reason: the first failing check, in call order.

    Args:
        lines: [N] 1-based line numbers of the rows.
    """

    def __init__(self, lines: np.ndarray):
        self.lines = lines
        self.alive = np.ones(len(lines), dtype=bool)
        self.rejects: list[Reject] = []

    def check(self, reason: str, ok: np.ndarray, detail: Callable[[int], str]) -> None:
        """Reject the alive rows where `ok` is False.

        Args:
            reason: reject reason.
            ok: [N] bool.
            detail: row index → description of the problem (called for the first bad row only).
        """
        bad = self.alive & ~ok
        if bad.any():
            self.rejects.append(Reject(reason, self.lines[bad], detail(int(np.flatnonzero(bad)[0]))))
            self.alive &= ~bad


def matches(values: pa.Array | pa.ChunkedArray, pattern: str) -> np.ndarray:
    """[N] bool: which strings match the regex `pattern` (RE2 syntax, anchor it yourself)."""
    return np.asarray(pc.match_substring_regex(values, pattern).to_numpy(zero_copy_only=False), dtype=bool)


def to_int64(values: pa.Array | pa.ChunkedArray, ok: np.ndarray | None = None) -> np.ndarray:
    """[N] int64 of decimal strings; rows where `ok` is False (or empty strings) give 0."""
    if ok is not None:
        values = pc.if_else(pa.array(ok), values, "0")
    values = pc.if_else(pc.equal(values, ""), "0", values)
    return pc.cast(values, pa.int64()).to_numpy(zero_copy_only=False)


INT_PATTERN = r"^-?[0-9]{1,18}$"  # 18 digits always fit in int64
UINT_PATTERN = r"^[0-9]{1,18}$"


# ---------------------------------------------------------------------------------------------------
# dataset reader interface


@dataclass(frozen=True)
class FeatureSpec:
    """A sparse feature as a reader produces it (cardinality comes from the vocabulary)."""

    name: str
    multi_hot: bool = False
    transform: str = "none"


@dataclass
class ParsedBlock:
    """The kept rows of one block, ready for counting (pass 1) or id mapping (pass 2).

    Attributes:
        labels: [N] int8 in {0, 1}.
        sparse: feature name → [N] string array (vocabulary keys, transform applied) or, for a multi-hot
            feature, [N] list<string>.
        dense: feature name → [N] float32.
        records: [N] int64 global record number: the 0-based index of the row's data line over all
            input files in order, rejected lines included (so fixing one line moves no other row).
        order_keys: [N] int64 key of the temporal split (a timestamp), or None for file order.
        path: the file the rows and rejects come from.
        rejects: rejected rows (and file-level problems) of this block.
        filtered: reason → rows left out by definition (e.g. MovieLens rating 3).
    """

    labels: np.ndarray
    sparse: dict[str, pa.Array]
    dense: dict[str, np.ndarray]
    records: np.ndarray
    path: str
    order_keys: np.ndarray | None = None
    rejects: list[Reject] = field(default_factory=list)
    filtered: dict[str, int] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return len(self.labels)


class DatasetReader(abc.ABC):
    """One raw dataset: its features, its files, and its rows as a stream of `ParsedBlock`s.

    `blocks()` can be called several times (one call per pass) and yields the same rows each time.
    """

    name: str
    default_min_count: int
    #: "file_order" (temporal split by position) or "timestamp" (by `ParsedBlock.order_keys`).
    temporal_key: str = "file_order"

    def __init__(self, block_size: int = DEFAULT_BLOCK_SIZE):
        self.block_size = block_size
        self.sources: list[SourceFile] = []
        self.rows_read = 0

    @property
    @abc.abstractmethod
    def sparse_features(self) -> list[FeatureSpec]: ...

    @property
    @abc.abstractmethod
    def dense_features(self) -> list[str]: ...

    @abc.abstractmethod
    def blocks(self, *, hash_files: bool = False) -> Iterator[ParsedBlock]:
        """Yield every block; with `hash_files`, fill `self.sources` (sizes, sha256) on the way."""

    def extra(self) -> dict:
        """Dataset-specific facts for schema.extra."""
        return {}

    def check_unchanged(self) -> None:
        """Raise if an input file changed since the pass that hashed it."""
        for s in self.sources:
            st = os.stat(s.path)
            if (st.st_size, st.st_mtime_ns) != (s.bytes, s.mtime_ns):
                raise PrepareError(f"{s.path}: changed while the dataset was being prepared; run again")


_NATURAL = re.compile(r"(\d+)")


def natural_key(path: Path) -> list:
    """Sort key that puts day_2 before day_10."""
    return [int(t) if t.isdigit() else t for t in _NATURAL.split(path.name)]


def list_input_files(raw: str | os.PathLike, pattern_groups: tuple[tuple[str, ...], ...]) -> list[Path]:
    """The input files of `--raw`: the file itself, or the matching files of a directory.

    Args:
        raw: a file or a directory.
        pattern_groups: groups of glob patterns tried in order on a directory; the files matching any
            pattern of the first group that matches something are the input (hidden files never).

    Returns:
        Files in natural order (day_0, day_1, ..., day_10).

    Raises:
        PrepareError: `raw` does not exist, or a directory holds no matching file.
    """
    raw = Path(raw)
    if raw.is_file():
        return [raw]
    if not raw.exists():
        raise PrepareError(f"{raw}: no such file or directory")
    for group in pattern_groups:
        files = {
            p for pattern in group for p in raw.glob(pattern) if p.is_file() and not p.name.startswith(".")
        }
        if files:
            return sorted(files, key=natural_key)
    patterns = [p for group in pattern_groups for p in group]
    raise PrepareError(f"{raw}: no input file matching {patterns}")


def find_one(directory: Path, name: str, *, required: bool = True) -> Path | None:
    """`directory/name` or `directory/name.gz` (content is sniffed anyway); error if both or neither."""
    found = [p for p in (directory / name, directory / f"{name}.gz") if p.is_file()]
    if len(found) > 1:
        raise PrepareError(f"{directory}: both {name} and {name}.gz exist; keep one")
    if not found:
        if required:
            raise PrepareError(f"{directory}: {name} (or {name}.gz) not found")
        return None
    return found[0]
