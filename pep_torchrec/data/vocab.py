"""Vocabularies: raw value → id maps built from value frequencies, and the value transforms.

A vocabulary of one sparse feature holds the values seen at least `min_count` times, most frequent
first, ties broken by the raw value (bytewise UTF-8 order, i.e. code-point order, the same as Python's
`sorted`); the value at position i has id i + 1, and id 0 (`schema.OOV_ID`) stands for everything else.

Counting is streaming (`ValueCounter`: per-block `value_counts` merged by an Arrow group-by, so memory
grows with the distinct values, never with the rows); lookup is vectorised (`Vocabulary.lookup`:
dictionary-encode a block, binary-search its distinct values in the sorted vocabulary). Both stay in
Arrow/NumPy: no Python object per row.

`vocab.parquet` has one row per kept value: feature (string), value (string), id (int64), plus
count (int64), the value's frequency in the input. Id 0 has no row.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pep_torchrec.data.schema import OOV_ID

TRANSFORMS = ("none", "criteo_log_bucket", "avazu_hour_of_day", "avazu_weekday")
VOCAB_FILE = "vocab.parquet"

# Merge the pending per-block counts once they hold this many entries: few enough group-bys to be
# cheap, few enough pending rows to bound memory to a small multiple of the distinct values.
_CONSOLIDATE_ENTRIES = 4_000_000


# ---------------------------------------------------------------------------------------------------
# transforms


def _log_bucket_scalar(v: int) -> int:
    """The paper's Criteo bucket of one integer: int(log(v)**2) for v > 2, else v."""
    return int(math.log(v) ** 2) if v > 2 else v


_MAX_INT64 = 2**63 - 1
_thresholds: list[int] = []  # _thresholds[k - 1]: smallest v > 2 with bucket(v) >= k
_thresholds_lock = threading.Lock()


def _log_bucket_thresholds(max_bucket: int) -> np.ndarray:
    """Thresholds of buckets 1..max_bucket: entry k-1 is the smallest v > 2 with int(log(v)**2) >= k.

    Found by bisection with the scalar definition itself, so the vectorised bucketing agrees with
    `math.log` bit for bit (NumPy's SIMD log may differ from libm's by an ulp, which would move values
    that sit on a bucket boundary). The search starts from exp(sqrt(k)) in a narrow window, and the
    table grows only as far as the largest value seen needs.
    """
    with _thresholds_lock:
        while len(_thresholds) < max_bucket:
            k = len(_thresholds) + 1
            guess = math.exp(math.sqrt(k))
            lo = max(_thresholds[-1] if _thresholds else 3, int(guess * (1 - 1e-9)) - 2)
            hi = min(_MAX_INT64, int(guess * (1 + 1e-9)) + 2)
            if _log_bucket_scalar(lo) >= k:  # the window missed (cannot happen with IEEE log): widen it
                lo = _thresholds[-1] if _thresholds else 3
            if _log_bucket_scalar(hi) < k:
                hi = _MAX_INT64
            while lo < hi:  # smallest v in [lo, hi] with bucket(v) >= k
                mid = (lo + hi) // 2
                if _log_bucket_scalar(mid) >= k:
                    hi = mid
                else:
                    lo = mid + 1
            _thresholds.append(lo)
        return np.asarray(_thresholds[:max_bucket], dtype=np.int64)


def criteo_log_bucket(values: np.ndarray) -> np.ndarray:
    """Vectorised Criteo integer bucketing: int(log(v)**2) for v > 2, v itself otherwise.

    Args:
        values: [N] int64 raw integer feature values.

    Returns:
        [N] int64 bucket codes, equal to `int(math.log(v) ** 2) if v > 2 else v` element-wise.
    """
    values = np.asarray(values, dtype=np.int64)
    if len(values) == 0:
        return values.copy()
    thresholds = _log_bucket_thresholds(_log_bucket_scalar(max(int(values.max()), 0)))
    # Monotone in v, so the number of thresholds <= v is the bucket.
    buckets = np.searchsorted(thresholds, values, side="right").astype(np.int64)
    return np.where(values > 2, buckets, values)


def apply_transform(transform: str, raw: str) -> str:
    """Map one raw value to its vocabulary key, exactly as the pipeline did (for serving).

    Args:
        transform: "none", "criteo_log_bucket" (a `SparseFeature.transform`), or the serving-side
            derivations of Avazu's `hour`: "avazu_hour_of_day", "avazu_weekday".
        raw: the raw field as it appears in the input ("" when missing).

    Returns:
        The key to look up in the feature's vocabulary.

    Raises:
        ValueError: unknown transform, a non-integer value for "criteo_log_bucket", an invalid Avazu hour.
    """
    if transform == "none":
        return raw
    if transform == "criteo_log_bucket":
        if raw == "":
            return ""
        try:
            v = int(raw)
        except ValueError:
            raise ValueError(f"criteo_log_bucket: {raw!r} is not an integer") from None
        return str(_log_bucket_scalar(v))
    if transform in ("avazu_hour_of_day", "avazu_weekday"):
        weekday, hour_of_day = _avazu_hour(raw)
        return f"{hour_of_day:02d}" if transform == "avazu_hour_of_day" else str(weekday)
    raise ValueError(f"unknown transform {transform!r}; have {TRANSFORMS}")


@functools.lru_cache(maxsize=4096)
def _avazu_hour(raw: str) -> tuple[int, int]:
    """(weekday, hour of day) of an Avazu `hour` (YYMMDDHH), decoded by the pipeline's own function."""
    from pep_torchrec.data.raw.avazu import decode_hour  # the reader imports this module's neighbours

    ok, weekday, hour_of_day = decode_hour(pa.array([raw], pa.string()))
    if not ok[0]:
        raise ValueError(f"hour {raw!r} is not a valid YYMMDDHH")
    return int(weekday[0]), int(hour_of_day[0])


# ---------------------------------------------------------------------------------------------------
# counting


class ValueCounter:
    """Streaming frequency count of the values of one feature.

    `add` takes a block's values (a string array, or a list<string> array whose elements all count);
    `result` gives every distinct value with its count.
    """

    def __init__(self) -> None:
        self._pending: list[pa.Table] = []
        self._pending_entries = 0
        self._threshold = _CONSOLIDATE_ENTRIES

    def add(self, values: pa.Array | pa.ChunkedArray) -> None:
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
            values = values.flatten()
        if len(values) == 0:
            return
        vc = pc.value_counts(values)
        table = pa.table({"value": vc.field("values").cast(pa.large_string()), "count": vc.field("counts")})
        self._pending.append(table)
        self._pending_entries += table.num_rows
        if self._pending_entries >= self._threshold and len(self._pending) > 1:
            self._consolidate()

    def _consolidate(self) -> None:
        merged = pa.concat_tables(self._pending).group_by("value").aggregate([("count", "sum")])
        merged = merged.rename_columns({"count_sum": "count"}).select(["value", "count"])
        self._pending = [merged]
        self._pending_entries = merged.num_rows
        # Merge again once the pending entries have doubled: amortised linear work, and memory stays
        # within a small multiple of the distinct values.
        self._threshold = max(_CONSOLIDATE_ENTRIES, 2 * merged.num_rows)

    def result(self) -> pa.Table:
        """All distinct values: table (value: large_string, count: int64), unordered."""
        if not self._pending:
            return pa.table({"value": pa.array([], pa.large_string()), "count": pa.array([], pa.int64())})
        if len(self._pending) > 1:
            self._consolidate()
        return self._pending[0]


# ---------------------------------------------------------------------------------------------------
# lookup


def _fixed_width(strings: pa.Array, width: int) -> np.ndarray:
    """Copy UTF-8 strings into a NumPy `S{width}` array (truncating longer ones), without Python objects.

    Args:
        strings: [N] string or large_string array without nulls.
        width: bytes per element (>= 1).

    Returns:
        [N] `S{width}` array; bytewise comparison of its elements is UTF-8 (code-point) order for
        strings of length <= width.
    """
    n = len(strings)
    offset_type = np.int64 if pa.types.is_large_string(strings.type) else np.int32
    buffers = strings.buffers()
    offsets = np.frombuffer(buffers[1], dtype=offset_type)[strings.offset : strings.offset + n + 1]
    offsets = offsets.astype(np.int64)
    data = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None else np.empty(0, np.uint8)
    take = np.minimum(np.diff(offsets), width)
    out = np.zeros((n, width), dtype=np.uint8)
    total = int(take.sum())
    if total:
        row = np.repeat(np.arange(n), take)
        col = np.arange(total) - np.repeat(np.cumsum(take) - take, take)
        out[row, col] = data[np.repeat(offsets[:-1], take) + col]
    return out.view(f"S{width}").reshape(n)


class Vocabulary:
    """The raw value → id map of one sparse feature.

    Attributes:
        name: the feature name.
        values: [V] large_string, the kept values in id order (values[i] has id i + 1).
        counts: [V] int64 frequency of each kept value in the input.
        cardinality: V + 1 (the OOV id 0 included): the table's `num_embeddings`.
    """

    def __init__(self, name: str, values: pa.Array, counts: np.ndarray | None = None):
        self.name = name
        self.values = values.cast(pa.large_string())
        if self.values.null_count:
            raise ValueError(f"vocabulary {name!r}: null values")
        self.counts = np.zeros(len(values), np.int64) if counts is None else np.asarray(counts, np.int64)
        lengths = pc.binary_length(self.values).to_numpy(zero_copy_only=False).astype(np.int64)
        self._width = max(1, int(lengths.max(initial=0)))
        keys = _fixed_width(self.values, self._width)
        order = np.argsort(keys, kind="stable")
        self._sorted_keys = keys[order]
        self._sorted_lengths = lengths[order]
        self._sorted_ids = order.astype(np.int64) + 1
        if len(keys) > 1:
            same = (self._sorted_keys[1:] == self._sorted_keys[:-1]) & (
                self._sorted_lengths[1:] == self._sorted_lengths[:-1]
            )
            if same.any():
                dup = self.values[int(order[1:][same][0])].as_py()
                raise ValueError(f"vocabulary {name!r}: duplicate value {dup!r}")

    @property
    def cardinality(self) -> int:
        return len(self.values) + 1

    @classmethod
    def from_counts(cls, name: str, counts: pa.Table, min_count: int) -> Vocabulary:
        """Keep the values seen >= `min_count` times; most frequent first, ties by value.

        Args:
            name: feature name.
            counts: table (value, count) as `ValueCounter.result()` gives.
            min_count: frequency threshold (>= 1).
        """
        kept = counts.filter(pc.greater_equal(counts["count"], min_count))
        kept = kept.sort_by([("count", "descending"), ("value", "ascending")])
        return cls(name, kept["value"].combine_chunks(), kept["count"].to_numpy())

    def _lookup_distinct(self, strings: pa.Array) -> np.ndarray:
        if len(self._sorted_keys) == 0 or len(strings) == 0:
            return np.full(len(strings), OOV_ID, dtype=np.int64)
        strings = strings.cast(pa.large_string())
        lengths = pc.binary_length(strings).to_numpy(zero_copy_only=False).astype(np.int64)
        keys = _fixed_width(strings, self._width)
        pos = np.searchsorted(self._sorted_keys, keys)
        pos = np.minimum(pos, len(self._sorted_keys) - 1)
        # Truncation to the vocabulary's width could make a longer string look equal: compare lengths too.
        hit = (self._sorted_keys[pos] == keys) & (self._sorted_lengths[pos] == lengths)
        return np.where(hit, self._sorted_ids[pos], OOV_ID).astype(np.int64)

    def lookup(self, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Ids of a block of raw values (unknown → 0).

        Args:
            values: [N] string array without nulls.

        Returns:
            [N] int64 ids in [0, cardinality).
        """
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        # Map each distinct value once: blocks repeat values a lot (Zipf), and the binary search is the
        # expensive part.
        encoded = pc.dictionary_encode(values)
        ids = self._lookup_distinct(encoded.dictionary)
        return ids[encoded.indices.to_numpy(zero_copy_only=False)]

    def lookup_lists(self, values: pa.ListArray) -> pa.ListArray:
        """Ids of a block of multi-hot values: list<string> [N] → list<int64> [N] (same bag sizes)."""
        offsets = values.offsets.to_numpy()
        flat_ids = self.lookup(values.flatten())
        return pa.ListArray.from_arrays(
            pa.array(offsets - offsets[0], pa.int32()), pa.array(flat_ids, pa.int64())
        )

    def id_of(self, value: str) -> int:
        """Id of one raw (already transformed) value; 0 when unknown."""
        return int(self.lookup(pa.array([value], pa.large_string()))[0])

    def to_table(self) -> pa.Table:
        n = len(self.values)
        return pa.table(
            {
                "feature": pa.array([self.name] * n, pa.string()),
                "value": self.values.cast(pa.string()),
                "id": pa.array(np.arange(1, n + 1, dtype=np.int64)),
                "count": pa.array(self.counts, pa.int64()),
            }
        )


def write_vocab(directory: str | os.PathLike, vocabularies: list[Vocabulary]) -> Path:
    """Write DIR/vocab.parquet with the rows of every vocabulary, in the given feature order."""
    path = Path(directory) / VOCAB_FILE
    tables = [v.to_table() for v in vocabularies]
    if tables:
        table = pa.concat_tables(tables)
    else:
        table = pa.table(
            {
                "feature": pa.array([], pa.string()),
                "value": pa.array([], pa.string()),
                "id": pa.array([], pa.int64()),
                "count": pa.array([], pa.int64()),
            }
        )
    pq.write_table(table, path, compression="zstd")
    return path


def load_vocab(directory: str | os.PathLike) -> dict[str, Vocabulary]:
    """Read DIR/vocab.parquet back into one `Vocabulary` per feature (for serving and tests).

    Raises:
        FileNotFoundError: no vocab.parquet (e.g. a synthetic dataset, whose values are ids).
        ValueError: ids that are not 1..V in order for some feature.
    """
    path = Path(directory) / VOCAB_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (synthetic datasets have no vocabulary)")
    table = pq.read_table(path)
    features = table["feature"].to_numpy(zero_copy_only=False)
    return {name: feature_vocabulary(table, name, path) for name in dict.fromkeys(features.tolist())}


def feature_vocabulary(table: pa.Table, name: str, where: str | os.PathLike) -> Vocabulary:
    """Feature `name`'s `Vocabulary` from a vocab table (columns feature, value, id[, count]).

    Raises:
        ValueError (naming `where`): its ids are not 1..V, or its values are not a vocabulary.
    """
    part = table.filter(pc.equal(table["feature"], name))
    ids = part["id"].to_numpy()
    order = np.argsort(ids, kind="stable")
    if not np.array_equal(ids[order], np.arange(1, len(ids) + 1)):
        raise ValueError(f"{where}: feature {name!r}: ids are not 1..{len(ids)}")
    part = part.take(pa.array(order))
    counts = part["count"].to_numpy() if "count" in part.column_names else None
    try:
        return Vocabulary(name, part["value"].combine_chunks(), counts)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
