"""Prepared Parquet splits → `Batch`es: one contiguous shard per rank, seeded shuffling, background
prefetch, exact mid-epoch resume.

Legend: B = examples per batch (per rank), N = rows in a decoded block, F = dense features,
K = sparse features (KJT keys), nnz = ids in a bag / block, W = world size.

How a rank reads an epoch:

1. **Shard** (at construction, metadata only). The split's files are concatenated in schema order into
   global rows [0, n). Rank r owns the contiguous range starting at r·n//W: [r·n//W, (r+1)·n//W) when
   padding (every row exactly once across ranks), or n//W rows when not padding (up to W−1 rows are
   never read, so every rank holds the same count). The range is cut into *pieces* (the overlap of
   the range with one Parquet row group); only those row groups are ever read.
2. **Order** (per epoch). With shuffling, the pieces are permuted and grouped into windows of
   `shuffle_buffer_row_groups` pieces; each window is read, its rows permuted, and appended to the
   rank's row stream (bounded memory: about one window plus one batch). Every random draw is seeded
   by (seed, epoch, rank[, window]) alone, so an epoch is reproducible and window w can be permuted
   without replaying windows < w: that is what makes `iter_epoch(e, start_batch=k)` exact and cheap
   (windows before batch k's first row are not even read).
3. **Batch**. The stream is cut into batches of B rows: `drop_last` drops the short tail,
   `pad_to_equal` pads the tail with weight-0 rows and appends all-padding batches so that every rank
   yields `num_batches()` batches of exactly B rows (a sharded forward is a collective: a rank that
   stops early hangs the others); otherwise the tail batch is short (same length on every rank).

Padding rows: single-hot ids 0 (length 1), multi-hot empty bags (length 0), dense 0, label 0, weight 0.

KJT dtypes: values int64, lengths int32 (TorchRec's convention, e.g. its Criteo loader; half the bytes
in the input all-to-all). Both the unsharded EmbeddingBagCollection and the fused TBE kernels accept
this mix: fbgemm casts offsets to the index dtype before its kernels (`prepare_inputs`). The KJT also
carries `length_per_key`/`offset_per_key`, so TorchRec never has to sync them out of `lengths`.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pep_torchrec.data.batch import Batch
from pep_torchrec.data.schema import Schema, check_parquet_file, check_table

__all__ = ["BatchIterator", "ParquetBatchLoader"]


# --------------------------------------------------------------------------------------------------
# Plan: which rows of which row groups a rank owns
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Piece:
    """The rows [start, stop) (row-group-relative) of row group `row_group` of file `file_index`."""

    file_index: int
    row_group: int
    start: int
    stop: int

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


# --------------------------------------------------------------------------------------------------
# Decoded rows
# --------------------------------------------------------------------------------------------------


@dataclass
class _Rows:
    """A block of N decoded rows, one numpy array per column, in schema feature order.

    For feature k: single-hot → `ids[k]` is int64 [N] and `offsets[k]` is None; multi-hot →
    `offsets[k]` is int64 [N+1] indexing into `ids[k]` (absolute: offsets[k][0] may be > 0, so slicing
    rows never copies ids).
    """

    num_rows: int
    ids: list[np.ndarray]
    offsets: list[np.ndarray | None]
    dense_NF: np.ndarray  # float32 [N, F], C-contiguous so a batch slice is one memcpy
    labels_N: np.ndarray  # float32 [N]

    def slice(self, start: int, stop: int) -> _Rows:
        """Rows [start, stop) as views (no copy)."""
        ids, offsets = [], []
        for ids_k, offsets_k in zip(self.ids, self.offsets):
            if offsets_k is None:
                ids.append(ids_k[start:stop])
                offsets.append(None)
            else:
                ids.append(ids_k)
                offsets.append(offsets_k[start : stop + 1])
        return _Rows(stop - start, ids, offsets, self.dense_NF[start:stop], self.labels_N[start:stop])

    def nnz(self, k: int) -> int:
        offsets_k = self.offsets[k]
        return self.num_rows if offsets_k is None else int(offsets_k[-1] - offsets_k[0])


def _take_rows(pending: collections.deque[_Rows], n: int) -> list[_Rows]:
    """Pop the first n rows of the `pending` row stream, as a list of views."""
    segments = []
    while n > 0:
        head = pending[0]
        if head.num_rows <= n:
            segments.append(pending.popleft())
            n -= head.num_rows
        else:
            segments.append(head.slice(0, n))
            pending[0] = head.slice(n, head.num_rows)
            n = 0
    return segments


def _chunked_to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    # Zero-copy for a single chunk without nulls (the usual case: one row group read).
    if column.num_chunks == 1:
        return column.chunk(0).to_numpy(zero_copy_only=False)
    return column.to_numpy()


def _permute_bags(
    offsets_N1: np.ndarray, ids: np.ndarray, perm_N: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Reorder the bags of a jagged column by `perm_N`; returns (offsets [N+1] from 0, ids [nnz])."""
    lengths_N = np.diff(offsets_N1)[perm_N]
    new_offsets = np.zeros(len(perm_N) + 1, dtype=np.int64)
    np.cumsum(lengths_N, out=new_offsets[1:])
    # Source index of output id j = start of its source bag + (j − start of its output bag).
    src_starts = offsets_N1[:-1][perm_N]
    gather = np.repeat(src_starts - new_offsets[:-1], lengths_N) + np.arange(new_offsets[-1])
    return new_offsets, ids[gather]


# --------------------------------------------------------------------------------------------------
# The iterator: synchronous or fed by a prefetch thread
# --------------------------------------------------------------------------------------------------


class _End:
    """Queue sentinel: the producer finished normally."""


@dataclass
class _Failure:
    """Queue item: the producer raised `error`; the consumer re-raises it."""

    error: BaseException


def _put(q: queue.Queue, item: object, stop: threading.Event) -> bool:
    # A bounded blocking put that still notices `stop`: an abandoned iterator never drains the queue.
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _produce(make_batches: Callable[[], Iterator[Batch]], q: queue.Queue, stop: threading.Event) -> None:
    # Runs in the prefetch thread. It must not reference the BatchIterator (only the queue and the
    # event), otherwise an abandoned iterator could never be garbage collected and closed.
    batches = None
    try:
        batches = make_batches()
        for batch in batches:
            if not _put(q, batch, stop):
                return
        _put(q, _End(), stop)
    except BaseException as e:  # noqa: BLE001 - everything goes to the consumer, which re-raises
        _put(q, _Failure(e), stop)
    finally:
        if batches is not None:
            batches.close()  # release the Parquet files now, not at garbage collection


class BatchIterator(Iterator[Batch]):
    """The batches of one epoch (from `start_batch` on); see `ParquetBatchLoader.iter_epoch`.

    With `prefetch > 0` a daemon thread decodes up to `prefetch` batches ahead into a bounded queue;
    an exception raised there is re-raised here by `__next__`. `close()` (also called by `with`, on
    exhaustion and on garbage collection) stops the thread and releases the files; breaking out of a
    `for` loop and dropping the iterator is enough.
    """

    def __init__(self, make_batches: Callable[[], Iterator[Batch]], num_batches: int, prefetch: int) -> None:
        self._remaining = num_batches
        self._closed = False
        self._batches: Iterator[Batch] | None = None
        self._thread: threading.Thread | None = None
        if prefetch == 0:
            self._batches = make_batches()
        else:
            self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=_produce,
                args=(make_batches, self._queue, self._stop),
                name="pep-loader-prefetch",
                daemon=True,  # never blocks interpreter exit, even if someone forgets close()
            )
            self._thread.start()

    def __len__(self) -> int:
        """Batches left to yield."""
        return self._remaining

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        if self._closed:
            raise StopIteration
        if self._thread is None:
            assert self._batches is not None
            try:
                batch = next(self._batches)
            except StopIteration:
                self.close()
                raise
        else:
            item = self._get()
            if isinstance(item, _End):
                self.close()
                raise StopIteration
            if isinstance(item, _Failure):
                self.close()
                raise item.error
            batch = item
        self._remaining -= 1
        return batch

    def _get(self) -> object:
        while True:
            try:
                return self._queue.get(timeout=0.1)
            except queue.Empty:
                # The producer always enqueues _End or _Failure before exiting; this guards against
                # a thread killed some other way, which would otherwise hang the consumer forever.
                assert self._thread is not None
                if not self._thread.is_alive() and self._queue.empty():
                    return _Failure(RuntimeError("loader prefetch thread exited without finishing"))

    def close(self) -> None:
        """Stop the prefetch thread (if any) and release the files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._remaining = 0
        if self._thread is None:
            if self._batches is not None:
                self._batches.close()  # type: ignore[attr-defined]  # a generator
            return
        self._stop.set()
        # Unblock a producer waiting on a full queue, then wait for it to finish its current batch.
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10.0)

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # may run during interpreter shutdown
            self.close()


# --------------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------------


class ParquetBatchLoader:
    """Reads one split of a prepared dataset (see `schema.py`) as this rank's `Batch`es.

    Args:
        data_dir: the prepared dataset directory (holds schema.json and the split files).
        split: "train", "valid" or "test" (any split named in schema.json).
        batch_size: B, examples per batch *on this rank* (the global batch is B·W).
        rank, world_size: this process's shard, 0 ≤ rank < world_size.
        shuffle: permute row groups and rows every epoch (default: split == "train").
        seed: shuffle seed (≥ 0); the order of epoch e depends only on (seed, e, rank).
        drop_last: drop the short last batch (default: split == "train").
        pad_to_equal: every row exactly once across ranks; the tail is padded with weight-0 rows so
            that every rank yields `num_batches()` batches of exactly B rows (default: split != "train").
            Exclusive with `drop_last`.
        shuffle_buffer_row_groups: row groups shuffled together (memory ≈ this many row groups).
        prefetch: batches decoded ahead by a background thread; 0 decodes synchronously.
        use_dense: read the dense features; False gives dense_features of shape [B, 0].
        max_rows: use only the first `max_rows` rows of the split (before sharding), e.g. for debugging.

    Raises:
        SchemaError: schema.json is missing or malformed.
        ValueError: bad arguments, a split file missing/unreadable, a column missing or of the wrong
            type, row counts that disagree with schema.json, or (from Parquet statistics) ids out of
            [0, cardinality) or labels outside {0, 1}. Row groups without statistics are checked when
            read: the ValueError then comes from the batch iterator.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool | None = None,
        seed: int = 0,
        drop_last: bool | None = None,
        pad_to_equal: bool | None = None,
        shuffle_buffer_row_groups: int = 8,
        prefetch: int = 4,
        use_dense: bool = True,
        max_rows: int | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.schema: Schema = Schema.load(self.data_dir)
        self.split = split
        is_train = split == "train"
        self.shuffle = is_train if shuffle is None else bool(shuffle)
        self.drop_last = is_train if drop_last is None else bool(drop_last)
        self.pad_to_equal = (not is_train) if pad_to_equal is None else bool(pad_to_equal)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle_buffer_row_groups = shuffle_buffer_row_groups
        self.prefetch = prefetch
        self.use_dense = use_dense
        self._check_args(max_rows)

        self._features = self.schema.sparse_features
        self._dense_names = list(self.schema.dense_features) if use_dense else []
        self._columns = [self.schema.label] + self.schema.feature_names + self._dense_names

        info = self.schema.splits.get(split)
        if info is None:
            raise ValueError(
                f"{self.data_dir}: no split {split!r} in schema.json; have {sorted(self.schema.splits)}"
            )
        self._paths = [self.data_dir / f for f in info.files]
        metadata = [check_parquet_file(self.schema, path) for path in self._paths]
        self._metadata = metadata
        total = sum(md.num_rows for md in metadata)
        if total != info.rows:
            raise ValueError(
                f"{self.data_dir}: split {split!r}: schema.json says {info.rows} rows but its files hold {total}"
            )

        # Sharding (see the module docstring). Every quantity below is identical on every rank or
        # derived from (rank, n, W) alone, so num_batches() agrees without any communication.
        n = total if max_rows is None else min(total, max_rows)
        self.num_rows_split = n
        lo = rank * n // world_size
        if self.pad_to_equal:
            hi = (rank + 1) * n // world_size
            max_rank_rows = -(-n // world_size)
            self._num_batches = -(-max_rank_rows // batch_size)
        else:
            hi = lo + n // world_size
            rank_rows = n // world_size
            self._num_batches = rank_rows // batch_size if self.drop_last else -(-rank_rows // batch_size)
        self.row_range: tuple[int, int] = (lo, hi)
        self._pieces = self._plan_pieces(lo, hi)

    # ---- public API -------------------------------------------------------------------------------

    def num_batches(self) -> int:
        """Batches per epoch; the same on every rank (so every rank takes part in every collective)."""
        return self._num_batches

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> BatchIterator:
        """The batches of `epoch` on this rank, starting at batch index `start_batch`.

        The sequence is a pure function of (dataset, seed, epoch, rank, world_size, batch_size and the
        other constructor arguments): `iter_epoch(e, start_batch=k)` yields exactly batches k, k+1, …
        of `iter_epoch(e)`, without decoding the row groups before batch k. Resume needs the same
        world size and batch size as the interrupted run.

        Returns:
            A `BatchIterator` of `num_batches() - start_batch` `Batch`es: dense_features [B, F] float32,
            sparse_features a KJT (keys = schema.feature_names; values int64 [nnz], lengths int32
            [K·B]), labels [B] float32, weights [B] float32 (1 real, 0 padding). B = batch_size except
            for a short last batch when neither drop_last nor pad_to_equal is set.
        """
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int ≥ 0, got {epoch!r}")
        if not isinstance(start_batch, int) or not 0 <= start_batch <= self._num_batches:
            raise ValueError(f"start_batch must be an int in [0, {self._num_batches}], got {start_batch!r}")
        return BatchIterator(
            lambda: self._generate(epoch, start_batch), self._num_batches - start_batch, self.prefetch
        )

    def __iter__(self) -> BatchIterator:
        return self.iter_epoch(0)

    # ---- validation -------------------------------------------------------------------------------

    def _check_args(self, max_rows: int | None) -> None:
        def positive_int(name: str, value: object, minimum: int) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name} must be an int ≥ {minimum}, got {value!r}")

        positive_int("batch_size", self.batch_size, 1)
        positive_int("world_size", self.world_size, 1)
        positive_int("rank", self.rank, 0)
        positive_int("seed", self.seed, 0)
        positive_int("shuffle_buffer_row_groups", self.shuffle_buffer_row_groups, 1)
        positive_int("prefetch", self.prefetch, 0)
        if max_rows is not None:
            positive_int("max_rows", max_rows, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        if self.drop_last and self.pad_to_equal:
            raise ValueError(
                "drop_last and pad_to_equal are exclusive: padding keeps every row, drop_last drops some"
            )

    # ---- planning ---------------------------------------------------------------------------------

    def _plan_pieces(self, lo: int, hi: int) -> list[_Piece]:
        """The overlap of global rows [lo, hi) with each row group, in file order (metadata only)."""
        pieces = []
        row = 0  # global index of the first row of the current row group
        for file_index, metadata in enumerate(self._metadata):
            for g in range(metadata.num_row_groups):
                rows = metadata.row_group(g).num_rows
                start, stop = max(lo, row), min(hi, row + rows)
                if start < stop:
                    pieces.append(_Piece(file_index, g, start - row, stop - row))
                row += rows
        return pieces

    def _rng(self, epoch: int, stream: int) -> np.random.Generator:
        # Independent streams per (seed, epoch, rank, purpose): stream 0 orders the row groups,
        # stream w+1 permutes window w. No generator state is carried between windows.
        return np.random.default_rng(
            np.random.SeedSequence([self.seed, epoch, self.rank], spawn_key=(stream,))
        )

    def _windows(self, epoch: int) -> list[list[_Piece]]:
        if not self.shuffle:
            return [[piece] for piece in self._pieces]
        order = self._rng(epoch, 0).permutation(len(self._pieces))
        pieces = [self._pieces[i] for i in order]
        size = self.shuffle_buffer_row_groups
        return [pieces[i : i + size] for i in range(0, len(pieces), size)]

    # ---- decoding ---------------------------------------------------------------------------------

    def _generate(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        """The batches [start_batch, num_batches) of an epoch (runs in the prefetch thread)."""
        B = self.batch_size
        total = self._num_batches
        emitted = start_batch
        skip = start_batch * B  # rows of this rank's stream consumed by batches < start_batch
        pending: collections.deque[_Rows] = collections.deque()  # the undelivered stream, in order
        pending_rows = 0
        with contextlib.ExitStack() as files_stack:
            files: dict[int, pq.ParquetFile] = {}
            for w, window in enumerate(self._windows(epoch)):
                if emitted >= total:
                    break
                window_rows = sum(p.num_rows for p in window)
                if skip >= window_rows:  # resuming: this window was consumed before start_batch
                    skip -= window_rows
                    continue
                rows = self._read_window(files, files_stack, window, epoch, w)
                if skip:
                    rows, skip = rows.slice(skip, rows.num_rows), 0
                pending.append(rows)
                pending_rows += rows.num_rows
                while pending_rows >= B and emitted < total:
                    yield self._make_batch(_take_rows(pending, B), 0)
                    pending_rows -= B
                    emitted += 1
            # The tail: a short batch, or (pad_to_equal) a padded batch then all-padding batches.
            while emitted < total:
                real = min(pending_rows, B)
                pad = B - real if self.pad_to_equal else 0
                assert real + pad > 0, "internal: num_batches disagrees with the rows read"
                yield self._make_batch(_take_rows(pending, real), pad)
                pending_rows -= real
                emitted += 1

    def _read_window(
        self,
        files: dict[int, pq.ParquetFile],
        files_stack: contextlib.ExitStack,
        window: list[_Piece],
        epoch: int,
        w: int,
    ) -> _Rows:
        """Read, check and (when shuffling) permute the rows of a window's pieces."""
        tables = []
        for piece in window:
            pf = files.get(piece.file_index)
            if pf is None:  # open lazily, reusing the footer parsed at construction
                pf = pq.ParquetFile(self._paths[piece.file_index], metadata=self._metadata[piece.file_index])
                files[piece.file_index] = files_stack.enter_context(pf)
            table = pf.read_row_group(piece.row_group, columns=self._columns)
            if piece.num_rows != table.num_rows:
                table = table.slice(piece.start, piece.num_rows)
            check_table(self.schema, self._paths[piece.file_index], piece.row_group, table, self._columns)
            tables.append(table)
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
        num_rows = table.num_rows
        perm_N = self._rng(epoch, w + 1).permutation(num_rows) if self.shuffle else None

        def gather(values: np.ndarray) -> np.ndarray:
            # mode="wrap" skips numpy's bounds-checked, buffered path (perm is a valid permutation).
            return values if perm_N is None else np.take(values, perm_N, mode="wrap")

        ids: list[np.ndarray] = []
        offsets: list[np.ndarray | None] = []
        for f in self._features:
            column = table.column(f.name)
            if f.multi_hot:
                bags = column.combine_chunks()
                offsets_N1 = bags.offsets.to_numpy().astype(np.int64, copy=False)
                flat = bags.values.to_numpy().astype(np.int64, copy=False)
                if perm_N is not None:
                    offsets_N1, flat = _permute_bags(offsets_N1, flat, perm_N)
                ids.append(flat)
                offsets.append(offsets_N1)
            else:
                ids.append(gather(_chunked_to_numpy(column).astype(np.int64, copy=False)))
                offsets.append(None)
        dense_NF = np.empty((num_rows, len(self._dense_names)), dtype=np.float32)
        for j, name in enumerate(self._dense_names):
            dense_NF[:, j] = gather(_chunked_to_numpy(table.column(name)))
        labels_N = gather(_chunked_to_numpy(table.column(self.schema.label)).astype(np.float32))
        return _Rows(num_rows, ids, offsets, dense_NF, labels_N)

    def _make_batch(self, segments: list[_Rows], pad: int) -> Batch:
        """Assemble consecutive row segments plus `pad` padding rows into one Batch (one copy)."""
        real = sum(s.num_rows for s in segments)
        B = real + pad
        num_keys = len(self._features)
        length_per_key = [
            sum(s.nnz(k) for s in segments) if f.multi_hot else B for k, f in enumerate(self._features)
        ]
        offset_per_key = [0, *np.cumsum(length_per_key, dtype=np.int64).tolist()] if num_keys else [0]
        values = np.empty(offset_per_key[-1], dtype=np.int64)
        lengths = np.empty(num_keys * B, dtype=np.int32)
        for k, f in enumerate(self._features):
            lengths_B = lengths[k * B : (k + 1) * B]
            position = offset_per_key[k]
            if f.multi_hot:
                row = 0
                for s in segments:
                    offsets_k = s.offsets[k]
                    assert offsets_k is not None
                    lengths_B[row : row + s.num_rows] = np.diff(offsets_k)
                    nnz = int(offsets_k[-1] - offsets_k[0])
                    values[position : position + nnz] = s.ids[k][offsets_k[0] : offsets_k[-1]]
                    position += nnz
                    row += s.num_rows
                lengths_B[real:] = 0  # padding: empty bags
            else:
                lengths_B[:] = 1
                for s in segments:
                    values[position : position + s.num_rows] = s.ids[k]
                    position += s.num_rows
                values[position : position + pad] = 0  # padding: the OOV id
        dense_BF = np.zeros((B, len(self._dense_names)), dtype=np.float32)
        labels_B = np.zeros(B, dtype=np.float32)
        weights_B = np.zeros(B, dtype=np.float32)
        weights_B[:real] = 1.0
        row = 0
        for s in segments:
            dense_BF[row : row + s.num_rows] = s.dense_NF
            labels_B[row : row + s.num_rows] = s.labels_N
            row += s.num_rows
        kjt = KeyedJaggedTensor(
            keys=self.schema.feature_names,
            values=torch.from_numpy(values),
            lengths=torch.from_numpy(lengths),
            stride=B,
            length_per_key=length_per_key,
            offset_per_key=offset_per_key,
        )
        return Batch(
            dense_features=torch.from_numpy(dense_BF),
            sparse_features=kjt,
            labels=torch.from_numpy(labels_B),
            weights=torch.from_numpy(weights_B),
        )
