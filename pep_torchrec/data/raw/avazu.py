"""Avazu click-through data (Kaggle `train`, CSV with a header line).

Raw columns: ``id, click, hour, C1, banner_pos, site_id, site_domain, site_category, app_id,
app_domain, app_category, device_id, device_ip, device_model, device_type, device_conn_type,
C14..C21``. Files may be plain or gzip (detected from the content); `--raw` is a file or a directory
(every `*.csv`, `*.csv.gz`, `train`, `train.gz` file in natural order; all must share the first one's header).

Prepared features (all sparse, no dense features):

- `id` is dropped (unique per row); `click` is the label ("0"/"1").
- `hour` (YYMMDDHH, e.g. 14102100) becomes two categorical features, as the common Avazu
  preprocessing does (e.g. FuxiCTR's avazu pipeline, AutoInt's): `hour_of_day` ("00".."23") and
  `weekday` ("0" = Monday .. "6" = Sunday, years read as 20YY). The raw date itself is dropped: it only
  identifies the day, which a random split spreads everywhere and a temporal split never sees again.
- every other column is kept as a raw string, in header order (`hour_of_day`, `weekday` take `hour`'s
  place).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pep_torchrec.data.raw.readers import (
    DEFAULT_BLOCK_SIZE,
    DatasetReader,
    DelimitedFile,
    FeatureSpec,
    ParsedBlock,
    RawBlock,
    RowChecks,
    SourceFile,
    iter_line_chunks,
    list_input_files,
    matches,
    to_int64,
)
from pep_torchrec.data.raw.rejections import PrepareError

LABEL = "click"
DROPPED = ("id",)
FILE_PATTERNS = (("*.csv", "*.csv.gz", "train", "train.gz"),)


def read_header(path: str | os.PathLike) -> list[str] | None:
    """The first line of a (plain or gzip) CSV file split on commas; None for an empty file."""
    for chunk in iter_line_chunks(path, block_size=1 << 16):
        if chunk.broken is None and chunk.data:
            return (
                chunk.data[: chunk.data.index(b"\n")]
                .decode("utf-8", errors="replace")
                .rstrip("\r")
                .split(",")
            )
    return None


def decode_hour(hour: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate YYMMDDHH strings and derive weekday and hour of day.

    Args:
        hour: [N] strings.

    Returns:
        ok [N] bool (a real date and an hour in 0..23), weekday [N] int64 (0 = Monday), hour_of_day [N]
        int64; rows that are not ok hold 0.
    """
    ok = matches(hour, r"^[0-9]{8}$")
    v = to_int64(hour, ok)
    year, month, day, hh = 2000 + v // 1_000_000, v // 10_000 % 100, v // 100 % 100, v % 100
    ok &= (month >= 1) & (month <= 12) & (hh <= 23) & (day >= 1)
    month = np.where(ok, month, 1)
    months = ((year - 1970) * 12 + month - 1).astype("datetime64[M]")
    start = months.astype("datetime64[D]").astype(np.int64)  # days since 1970-01-01 (a Thursday)
    days_in_month = (months + 1).astype("datetime64[D]").astype(np.int64) - start
    ok &= day <= days_in_month
    days = start + day - 1
    weekday = np.where(ok, (days + 3) % 7, 0)
    return ok, weekday, np.where(ok, hh, 0)


class AvazuReader(DatasetReader):
    """Avazu CSV files → blocks of categorical values and labels.

    Args:
        raw: a file or a directory of files (see the module docstring).
        block_size: decompressed bytes read per block.
    """

    name = "avazu"
    default_min_count = 10

    def __init__(self, raw: str | os.PathLike, block_size: int = DEFAULT_BLOCK_SIZE):
        super().__init__(block_size)
        self.files = list_input_files(raw, FILE_PATTERNS)
        # The first file with a header line sets the columns; empty files are counted when read.
        headers = ((path, read_header(path)) for path in self.files)
        first, columns = next(((p, h) for p, h in headers if h is not None), (None, None))
        if columns is None:
            raise PrepareError(f"{raw}: no input file has a header line (all empty)")
        self.columns: list[str] = columns
        where = f"{first}:1"
        for required in (LABEL, "hour"):
            if required not in self.columns:
                raise PrepareError(f"{where}: header has no {required!r} column (got {self.columns})")
        if len(set(self.columns)) != len(self.columns):
            raise PrepareError(f"{where}: duplicate column names in header {self.columns}")
        self._features: list[str] = []
        for name in self.columns:
            if name == "hour":
                self._features += ["hour_of_day", "weekday"]
            elif name not in (LABEL, *DROPPED):
                self._features.append(name)

    @property
    def sparse_features(self) -> list[FeatureSpec]:
        return [FeatureSpec(n) for n in self._features]

    @property
    def dense_features(self) -> list[str]:
        return []

    def extra(self) -> dict:
        return {"hour": "YYMMDDHH -> hour_of_day ('00'..'23') and weekday ('0'=Monday..'6'); date dropped"}

    def blocks(self, *, hash_files: bool = False) -> Iterator[ParsedBlock]:
        record_offset = 0
        sources = []
        for path in self.files:
            source = SourceFile(str(path.resolve()), "data") if hash_files else None
            reader = DelimitedFile(
                path, self.columns, delimiter=b",", header=True, block_size=self.block_size, source=source
            )
            for raw in reader.blocks():
                # Line 1 is the header: line L is data line L - 2 of this file.
                yield self._parse(raw, str(path), record_offset - 2)
            record_offset += reader.data_lines
            if source is not None:
                sources.append(source)
        self.rows_read = record_offset
        if hash_files:
            self.sources = sources

    def _parse(self, raw: RawBlock, path: str, record_base: int) -> ParsedBlock:
        table = raw.table
        checks = RowChecks(raw.lines)
        label = table.column(LABEL).combine_chunks()
        checks.check(
            "bad_label", matches(label, "^[01]$"), lambda i: f"click {label[i].as_py()!r} is not 0 or 1"
        )
        hour = table.column("hour").combine_chunks()
        hour_ok, weekday, hour_of_day = decode_hour(hour)
        checks.check("bad_hour", hour_ok, lambda i: f"hour {hour[i].as_py()!r} is not a valid YYMMDDHH")
        keep = checks.alive
        if not keep.all():
            table = table.filter(pa.array(keep))
        sparse: dict[str, pa.Array] = {}
        for name in self._features:
            if name == "hour_of_day":
                sparse[name] = pc.utf8_lpad(pc.cast(pa.array(hour_of_day[keep]), pa.string()), 2, "0")
            elif name == "weekday":
                sparse[name] = pc.cast(pa.array(weekday[keep]), pa.string())
            else:
                sparse[name] = table.column(name).combine_chunks()
        labels = pc.equal(table.column(LABEL), "1").to_numpy(zero_copy_only=False).astype(np.int8)
        return ParsedBlock(
            labels=labels,
            sparse=sparse,
            dense={},
            records=record_base + raw.lines[keep],
            path=path,
            rejects=raw.rejects + checks.rejects,
        )
