"""ParquetBatchLoader: content, sharding, shuffling, resume, prefetch, validation, EBC round trip.

The datasets are written here with `Schema.save` + `pyarrow.parquet.write_table` (small row groups, two
files per split). Feature "rowid" is a single-hot feature whose id is the row's global index, so every
example in a batch can be traced back to its Parquet row.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pep_torchrec.data.batch import Batch
from pep_torchrec.data.loader import ParquetBatchLoader
from pep_torchrec.data.schema import Schema, SchemaError, SparseFeature, SplitInfo

ROW_GROUP = 8
SPLIT_ROWS = {"train": 103, "valid": 37, "test": 21}


def write_dataset(
    root: Path,
    *,
    dense: bool = True,
    multi_hot: bool = True,
    split_rows: dict[str, int] = SPLIT_ROWS,
    row_group_size: int = ROW_GROUP,
    write_statistics: bool = True,
) -> dict[str, list[dict]]:
    """Write a prepared dataset under `root`; return each split's rows as dicts, in global order."""
    rng = np.random.default_rng(123)
    total = max(split_rows.values())
    features = [SparseFeature("rowid", total), SparseFeature("user", 11)]
    if multi_hot:
        features.append(SparseFeature("tags", 7, multi_hot=True))
    features.append(SparseFeature("item", 5))
    dense_names = ["d0", "d1"] if dense else []
    splits, expected = {}, {}
    for split, rows in split_rows.items():
        columns: dict[str, pa.Array] = {"label": pa.array(rng.integers(0, 2, rows), pa.int8())}
        for f in features:
            if f.name == "rowid":
                columns[f.name] = pa.array(np.arange(rows), pa.int64())
            elif f.multi_hot:
                # Lengths 0..3, so there are empty bags, including whole runs of them.
                bags = [rng.integers(0, f.cardinality, rng.integers(0, 4)).tolist() for _ in range(rows)]
                columns[f.name] = pa.array(bags, pa.list_(pa.int64()))
            else:
                columns[f.name] = pa.array(rng.integers(0, f.cardinality, rows), pa.int64())
        for name in dense_names:
            columns[name] = pa.array(rng.normal(size=rows).astype(np.float32))
        table = pa.table(columns)
        (root / split).mkdir(parents=True)
        # Two files with a ragged cut, so row groups and rank ranges do not line up.
        cut = rows // 2 + 1
        files = []
        for i, part in enumerate((table.slice(0, cut), table.slice(cut))):
            rel = f"{split}/part-{i:05d}.parquet"
            pq.write_table(part, root / rel, row_group_size=row_group_size, write_statistics=write_statistics)
            files.append(rel)
        splits[split] = SplitInfo(rows, files)
        expected[split] = table.to_pylist()
    Schema("synthetic", features, dense_names, splits).save(root)
    return expected


def unbatch(batch: Batch, keys: list[str]) -> list[dict]:
    """The weight-1 rows of a batch as dicts, decoded with TorchRec's own KJT → per-key lists."""
    per_key = batch.sparse_features.to_dict()
    rows = []
    for i in range(batch.batch_size):
        if batch.weights[i] == 0:
            continue
        row = {"label": int(batch.labels[i])}
        for key in keys:
            bag = per_key[key].to_dense()[i].tolist()
            row[key] = bag
        row["dense"] = batch.dense_features[i].tolist()
        rows.append(row)
    return rows


def as_expected(row: dict, schema: Schema) -> dict:
    """A Parquet row in `unbatch`'s format (single-hot ids become bags of one)."""
    out = {"label": row["label"]}
    for f in schema.sparse_features:
        out[f.name] = row[f.name] if f.multi_hot else [row[f.name]]
    out["dense"] = [row[name] for name in schema.dense_features]
    return out


def rowids(batches: list[Batch]) -> list[int]:
    """Global row indices of the real (weight 1) examples, in order."""
    out = []
    for b in batches:
        ids = b.sparse_features["rowid"].values()
        out += ids[b.weights > 0].tolist()
    return out


def batch_tensors(b: Batch) -> tuple:
    kjt = b.sparse_features
    return (tuple(kjt.keys()), b.dense_features, kjt.values(), kjt.lengths(), b.labels, b.weights)


def assert_same_batches(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for u, v in zip(batch_tensors(x), batch_tensors(y)):
            if isinstance(u, torch.Tensor):
                assert u.dtype == v.dtype and torch.equal(u, v)
            else:
                assert u == v


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, dict[str, list[dict]]]:
    return tmp_path, write_dataset(tmp_path)


# ---- content -------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [5, 16, 64])
def test_batches_equal_parquet_rows(data, batch_size):
    root, expected = data
    loader = ParquetBatchLoader(root, "valid", batch_size=batch_size, prefetch=0)
    schema = loader.schema
    batches = list(loader)
    assert len(batches) == loader.num_batches() == -(-37 // batch_size)
    rows = [r for b in batches for r in unbatch(b, schema.feature_names)]
    assert rows == [as_expected(r, schema) for r in expected["valid"]]
    for b in batches:
        kjt = b.sparse_features
        assert kjt.keys() == schema.feature_names
        assert kjt.values().dtype == torch.int64 and kjt.lengths().dtype == torch.int32
        assert kjt.stride() == b.batch_size == batch_size  # eval pads every batch to full size
        assert b.dense_features.shape == (batch_size, 2) and b.dense_features.dtype == torch.float32
        assert b.labels.dtype == b.weights.dtype == torch.float32
        assert kjt.length_per_key() == [int(kjt[k].lengths().sum()) for k in kjt.keys()]
    # Padding rows: weight 0, label 0, dense 0, single-hot id 0 (one per row), multi-hot empty bags.
    last = batches[-1]
    pad = last.weights == 0
    assert int(pad.sum()) == len(batches) * batch_size - 37
    assert torch.all(last.labels[pad] == 0) and torch.all(last.dense_features[pad] == 0)
    for f in schema.sparse_features:
        jt = last.sparse_features[f.name]
        assert torch.all(jt.lengths()[pad] == (0 if f.multi_hot else 1))
        if not f.multi_hot:
            assert torch.all(jt.values()[pad] == 0)


def test_kjt_flat_layout(data):
    """values = for each key, the ids of every example in order; lengths = per key, per example."""
    root, expected = data
    loader = ParquetBatchLoader(root, "train", batch_size=12, shuffle=False, prefetch=0)
    batch = next(iter(loader))
    rows = expected["train"][:12]
    values, lengths = [], []
    for f in loader.schema.sparse_features:
        for r in rows:
            bag = r[f.name] if f.multi_hot else [r[f.name]]
            values += bag
            lengths.append(len(bag))
    assert batch.sparse_features.values().tolist() == values
    assert batch.sparse_features.lengths().tolist() == lengths
    assert 0 in lengths  # the dataset really has empty bags


def test_no_dense_features_and_use_dense_false(tmp_path):
    expected = write_dataset(tmp_path, dense=False, multi_hot=False)
    loader = ParquetBatchLoader(tmp_path, "test", batch_size=4, prefetch=0)
    batches = list(loader)
    assert all(b.dense_features.shape == (4, 0) for b in batches)
    rows = [r for b in batches for r in unbatch(b, loader.schema.feature_names)]
    assert rows == [as_expected(r, loader.schema) for r in expected["test"]]

    root = tmp_path / "with_dense"
    root.mkdir()
    write_dataset(root)
    batch = next(iter(ParquetBatchLoader(root, "test", batch_size=4, use_dense=False, prefetch=0)))
    assert batch.dense_features.shape == (4, 0) and batch.dense_features.dtype == torch.float32


def test_max_rows(data):
    root, _ = data
    loader = ParquetBatchLoader(root, "valid", batch_size=4, max_rows=10, prefetch=0)
    assert rowids(list(loader)) == list(range(10))


def test_short_last_batch_without_drop_or_pad(data):
    root, _ = data
    counts = []
    for rank in range(2):
        loader = ParquetBatchLoader(
            root, "train", batch_size=10, rank=rank, world_size=2, drop_last=False, pad_to_equal=False
        )
        batches = list(loader.iter_epoch(0))
        assert len(batches) == loader.num_batches() == 6  # 103 // 2 = 51 rows each
        counts.append([b.batch_size for b in batches])
    assert counts[0] == counts[1] == [10] * 5 + [1]


# ---- sharding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 3])
def test_train_shards_disjoint_and_equal(data, world_size):
    root, expected = data
    shards, num_batches = [], set()
    for rank in range(world_size):
        loader = ParquetBatchLoader(
            root, "train", batch_size=4, rank=rank, world_size=world_size, shuffle_buffer_row_groups=2
        )
        batches = list(loader.iter_epoch(0))
        # Shuffled rows (and their multi-hot bags) still carry their own Parquet content.
        rows = [r for b in batches for r in unbatch(b, loader.schema.feature_names)]
        assert rows == [as_expected(expected["train"][r["rowid"][0]], loader.schema) for r in rows]
        num_batches |= {len(batches), loader.num_batches()}
        assert all(b.batch_size == 4 and torch.all(b.weights == 1) for b in batches)
        ids = rowids(batches)
        lo, hi = loader.row_range
        assert hi - lo == 103 // world_size and all(lo <= i < hi for i in ids)
        shards.append(set(ids))
        assert len(ids) == len(shards[-1])  # no row twice within an epoch
    assert num_batches == {(103 // world_size) // 4}
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert not shards[a] & shards[b]


@pytest.mark.parametrize("world_size,batch_size", [(2, 4), (3, 5), (3, 16)])
def test_eval_covers_every_row_once(data, world_size, batch_size):
    root, expected = data
    seen, num_batches = [], set()
    for rank in range(world_size):
        loader = ParquetBatchLoader(root, "valid", batch_size=batch_size, rank=rank, world_size=world_size)
        batches = list(loader.iter_epoch(0))
        num_batches |= {len(batches), loader.num_batches()}
        assert all(b.batch_size == batch_size for b in batches)
        seen += rowids(batches)
        rows = [r for b in batches for r in unbatch(b, loader.schema.feature_names)]
        lo, hi = loader.row_range
        assert rows == [as_expected(r, loader.schema) for r in expected["valid"][lo:hi]]
    assert len(num_batches) == 1
    assert sorted(seen) == list(range(37))


@pytest.mark.parametrize("split,world_size", [("train", 3), ("valid", 2)])
def test_reads_only_overlapping_row_groups(data, monkeypatch, split, world_size):
    root, _ = data
    read: list[tuple[str, int]] = []
    init, read_row_group = pq.ParquetFile.__init__, pq.ParquetFile.read_row_group

    def spy_init(self, source, *args, **kwargs):
        self.spied_name = Path(source).name
        init(self, source, *args, **kwargs)

    def spy_read(self, i, *args, **kwargs):
        read.append((self.spied_name, i))
        return read_row_group(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "__init__", spy_init)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy_read)
    schema = Schema.load(root)
    # Independent reference: global row ranges of every (file, row group).
    groups, row = [], 0
    for rel in schema.splits[split].files:
        md = pq.ParquetFile(root / rel).metadata
        for g in range(md.num_row_groups):
            groups.append((Path(rel).name, g, row, row + md.row_group(g).num_rows))
            row += md.row_group(g).num_rows
    for rank in range(world_size):
        read.clear()
        loader = ParquetBatchLoader(root, split, batch_size=3, rank=rank, world_size=world_size, prefetch=0)
        list(loader.iter_epoch(0))
        lo, hi = loader.row_range
        assert sorted(read) == sorted(
            (name, g) for name, g, start, stop in groups if start < hi and lo < stop
        )
        assert len(read) < len(groups)


# ---- order: shuffling, resume, prefetch ------------------------------------------------------------


def test_shuffle_is_deterministic_per_seed_and_epoch(data):
    root, _ = data

    def order(seed: int, epoch: int, buffer: int = 2) -> list[int]:
        loader = ParquetBatchLoader(root, "train", batch_size=4, seed=seed, shuffle_buffer_row_groups=buffer)
        return rowids(list(loader.iter_epoch(epoch)))

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert order(0, 0) != sorted(order(0, 0))
    assert len(order(0, 0)) == (103 // 4) * 4


def test_shuffle_buffer_bounds_the_mixing(data):
    """With a buffer of one row group, a batch of 4 spans at most the tail of one group and the next."""
    root, _ = data
    loader = ParquetBatchLoader(root, "train", batch_size=4, shuffle_buffer_row_groups=1, prefetch=0)

    def row_group(rowid: int) -> int:  # train: file 0 holds rows 0..51, file 1 rows 52..102
        return rowid // ROW_GROUP if rowid < 52 else 100 + (rowid - 52) // ROW_GROUP

    spans = [len({row_group(i) for i in rowids([b])}) for b in loader.iter_epoch(0)]
    assert max(spans) <= 2 and spans.count(1) > len(spans) // 2


def test_single_row_group_is_a_full_shuffle(tmp_path):
    write_dataset(tmp_path, row_group_size=1000)
    loader = ParquetBatchLoader(tmp_path, "train", batch_size=103, drop_last=False)
    ids = rowids(list(loader.iter_epoch(0)))
    assert sorted(ids) == list(range(103)) and ids != list(range(103))
    # Rows from both halves (two files, so two row groups) land anywhere: first 10 come from both.
    assert min(ids[:10]) < 52 <= max(ids[:10])


@pytest.mark.parametrize(
    "split,kwargs",
    [
        ("train", dict(shuffle_buffer_row_groups=2)),
        ("train", dict(shuffle_buffer_row_groups=1, world_size=2, rank=1)),
        ("valid", dict(world_size=3, rank=2)),  # 12 rows on this rank: batches 3.. are pure padding
        ("valid", dict(shuffle=True, shuffle_buffer_row_groups=3)),
    ],
)
def test_resume_yields_the_tail_of_the_epoch(data, split, kwargs):
    root, _ = data
    loader = ParquetBatchLoader(root, split, batch_size=5, seed=7, prefetch=0, **kwargs)
    full = list(loader.iter_epoch(3))
    assert len(full) == loader.num_batches()
    for k in range(len(full) + 1):
        it = loader.iter_epoch(3, start_batch=k)
        assert len(it) == len(full) - k
        assert_same_batches(list(it), full[k:])


def test_resume_does_not_read_consumed_windows(data, monkeypatch):
    root, _ = data
    calls: list[int] = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(
        pq.ParquetFile,
        "read_row_group",
        lambda self, i, *a, **k: (calls.append(i), original(self, i, *a, **k))[1],
    )
    loader = ParquetBatchLoader(root, "train", batch_size=4, shuffle_buffer_row_groups=1, prefetch=0)
    list(loader.iter_epoch(0))
    full_reads = len(calls)
    calls.clear()
    list(loader.iter_epoch(0, start_batch=loader.num_batches() - 1))
    assert len(calls) <= 2 < full_reads


@pytest.mark.parametrize("split", ["train", "valid"])
def test_prefetch_on_and_off_identical(data, split):
    root, _ = data
    kwargs = dict(batch_size=6, world_size=2, rank=1, shuffle_buffer_row_groups=2)
    sync = list(ParquetBatchLoader(root, split, prefetch=0, **kwargs).iter_epoch(2))
    for prefetch in (1, 3):
        assert_same_batches(
            list(ParquetBatchLoader(root, split, prefetch=prefetch, **kwargs).iter_epoch(2)), sync
        )


def test_invalid_iteration_arguments(data):
    root, _ = data
    loader = ParquetBatchLoader(root, "valid", batch_size=8)
    with pytest.raises(ValueError, match="start_batch"):
        loader.iter_epoch(0, start_batch=loader.num_batches() + 1)
    with pytest.raises(ValueError, match="epoch"):
        loader.iter_epoch(-1)
    assert list(loader.iter_epoch(0, start_batch=loader.num_batches())) == []


# ---- the prefetch thread -------------------------------------------------------------------------


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pep-loader-prefetch"]


def test_exception_in_thread_is_reraised(data, monkeypatch):
    root, _ = data
    loader = ParquetBatchLoader(root, "train", batch_size=4, shuffle_buffer_row_groups=1, prefetch=2)
    original = loader._read_window
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return original(*args, **kwargs)

    monkeypatch.setattr(loader, "_read_window", failing)
    it = loader.iter_epoch(0)
    got = 0
    with pytest.raises(RuntimeError, match="disk on fire"):
        for _ in it:
            got += 1
    assert got == 4  # two row groups of 8 rows = four batches of 4, then the failure
    assert it._thread is not None
    it._thread.join(timeout=5)
    assert not it._thread.is_alive()


def test_abandoned_iterator_stops_its_thread(data):
    root, _ = data
    loader = ParquetBatchLoader(root, "train", batch_size=2, prefetch=2)
    before = len(prefetch_threads())

    it = loader.iter_epoch(0)
    next(it)
    thread = it._thread
    it.close()
    assert thread is not None and not thread.is_alive()
    assert next(it, None) is None  # closed iterators are exhausted

    for _ in loader.iter_epoch(1):
        break  # the for loop drops the iterator: garbage collection closes it
    gc.collect()
    for t in prefetch_threads()[before:]:
        t.join(timeout=5)
    assert len(prefetch_threads()) == before

    with loader.iter_epoch(2) as it:
        next(it)
    assert it._thread is not None and not it._thread.is_alive()


def test_interpreter_exits_with_a_live_prefetch_thread(data):
    """An iterator never closed, its thread blocked on a full queue: the process still exits at once."""
    root, _ = data
    code = (
        "from pep_torchrec.data.loader import ParquetBatchLoader\n"
        f"it = iter(ParquetBatchLoader({str(root)!r}, 'train', batch_size=2, prefetch=1))\n"
        "next(it)\n"
        "print('ok')\n"
    )
    repo = Path(__file__).resolve().parents[2]  # importable without an install
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=repo
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ---- validation ----------------------------------------------------------------------------------


def test_missing_or_malformed_schema(tmp_path):
    with pytest.raises(SchemaError, match="not found"):
        ParquetBatchLoader(tmp_path, "train", batch_size=4)
    (tmp_path / "schema.json").write_text("{not json")
    with pytest.raises(SchemaError, match="invalid JSON"):
        ParquetBatchLoader(tmp_path, "train", batch_size=4)
    (tmp_path / "schema.json").write_text(json.dumps({"dataset": "x"}))
    with pytest.raises(SchemaError, match="malformed"):
        ParquetBatchLoader(tmp_path, "train", batch_size=4)


def rewrite(root: Path, rel: str, edit) -> Path:
    path = root / rel
    pq.write_table(edit(pq.read_table(path)), path, row_group_size=ROW_GROUP)
    return path


def test_bad_split_files(data):
    root, _ = data
    rel = "train/part-00001.parquet"

    (root / rel).rename(root / "moved.parquet")
    with pytest.raises(ValueError, match=f"{rel}: split file listed in schema.json is missing"):
        ParquetBatchLoader(root, "train", batch_size=4)
    (root / "moved.parquet").rename(root / rel)

    original = pq.read_table(root / rel)
    cases = [
        (lambda t: t.drop_columns(["user"]), r"part-00001.parquet: column 'user' missing"),
        (lambda t: t.drop_columns(["d1"]), r"part-00001.parquet: column 'd1' missing"),
        (
            lambda t: t.set_column(
                t.schema.get_field_index("item"), "item", t.column("item").cast(pa.string())
            ),
            r"part-00001.parquet: column 'item' has type string, want int64 ids",
        ),
        (
            lambda t: t.set_column(
                t.schema.get_field_index("tags"), "tags", pa.array([1] * len(t), pa.int64())
            ),
            r"part-00001.parquet: column 'tags' has type int64, want list<int64>",
        ),
        (lambda t: t.slice(1), r"schema.json says 103 rows but its files hold 102"),
    ]
    for edit, message in cases:
        rewrite(root, rel, lambda t, edit=edit: edit(original))
        with pytest.raises(ValueError, match=message):
            ParquetBatchLoader(root, "train", batch_size=4)

    (root / rel).write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="part-00001.parquet: not a readable Parquet file"):
        ParquetBatchLoader(root, "train", batch_size=4)
    with pytest.raises(ValueError, match="no split 'extra'"):
        ParquetBatchLoader(root, "extra", batch_size=4)


def set_value(table: pa.Table, name: str, row: int, value) -> pa.Table:
    column = table.column(name).to_pylist()
    column[row] = value
    index = table.schema.get_field_index(name)
    return table.set_column(
        index, table.schema.field(index), pa.array(column, table.schema.field(index).type)
    )


@pytest.mark.parametrize("statistics", [True, False])
@pytest.mark.parametrize(
    "name,value,message",
    [
        ("item", 5, r"feature 'item' has ids in \[\d+, 5\], outside \[0, 4\] \(cardinality 5\)"),
        ("user", -1, r"feature 'user' has ids in \[-1, \d+\]"),
        ("tags", [1, 7], r"feature 'tags' has ids in \[\d+, 7\]"),
        ("label", 2, r"label 'label' has values in \[\d, 2\]"),
    ],
)
def test_out_of_range_values(tmp_path, statistics, name, value, message):
    """With Parquet statistics the constructor catches it; without, the iterator does (per row group)."""
    write_dataset(tmp_path, write_statistics=statistics)
    rel = "valid/part-00001.parquet"
    path = tmp_path / rel
    table = set_value(pq.read_table(path), name, 13, value)  # in the second row group of the file
    pq.write_table(table, path, row_group_size=ROW_GROUP, write_statistics=statistics)
    message = rf"part-00001.parquet: row group 1: {message}"
    if statistics:
        with pytest.raises(ValueError, match=message):
            ParquetBatchLoader(tmp_path, "valid", batch_size=4)
    else:
        loader = ParquetBatchLoader(tmp_path, "valid", batch_size=4, prefetch=2)
        with pytest.raises(ValueError, match=message):
            list(loader)


def test_nulls_are_rejected(data):
    root, _ = data
    rel = "test/part-00000.parquet"
    rewrite(root, rel, lambda t: set_value(t, "d0", 2, None))
    with pytest.raises(ValueError, match=r"part-00000.parquet: row group 0: column 'd0' has 1 nulls"):
        list(ParquetBatchLoader(root, "test", batch_size=4))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=4, rank=2, world_size=2), "rank 2"),
        (dict(batch_size=4, drop_last=True, pad_to_equal=True), "exclusive"),
        (dict(batch_size=4, prefetch=-1), "prefetch"),
        (dict(batch_size=4, seed=-3), "seed"),
    ],
)
def test_bad_arguments(data, kwargs, message):
    root, _ = data
    with pytest.raises(ValueError, match=message):
        ParquetBatchLoader(root, "train", **kwargs)


# ---- into TorchRec -------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True])
def test_kjt_through_embedding_bag_collection(data, fused):
    """The loader's KJT gives, through a real EBC (dense or fused TBE kernel), the hand-computed sums."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

    root, expected = data
    loader = ParquetBatchLoader(root, "train", batch_size=16, world_size=2, rank=1, prefetch=0)
    schema = loader.schema
    tables = [
        EmbeddingBagConfig(
            name=f"t_{f.name}", embedding_dim=4, num_embeddings=f.cardinality, feature_names=[f.name]
        )
        for f in schema.sparse_features
    ]
    if fused:
        ebc = FusedEmbeddingBagCollection(
            tables=tables,
            optimizer_type=torch.optim.SGD,
            optimizer_kwargs={"lr": 0.1},
            device=torch.device("cpu"),
        )
    else:
        ebc = EmbeddingBagCollection(tables=tables)
    # Distinct, exactly representable weights: row i of table t is (100·t + i) + [0, .25, .5, .75].
    weights = {}
    with torch.no_grad():
        for t, (name, param) in enumerate(sorted(ebc.state_dict().items())):
            rows = torch.arange(param.shape[0], dtype=torch.float32)[:, None] + 100 * t
            param.copy_(rows + torch.tensor([0, 0.25, 0.5, 0.75]))
            weights[name.split(".")[-2].removeprefix("t_")] = param.clone().numpy()
    batch = next(iter(loader.iter_epoch(1)))
    pooled = ebc(batch.sparse_features).to_dict()
    by_rowid = {r["rowid"]: r for r in expected["train"]}
    for i, rowid in enumerate(batch.sparse_features["rowid"].to_dense()):
        row = by_rowid[int(rowid)]
        for f in schema.sparse_features:
            ids = row[f.name] if f.multi_hot else [row[f.name]]
            want = weights[f.name][ids].sum(axis=0) if ids else np.zeros(4, np.float32)
            np.testing.assert_array_equal(pooled[f.name][i].detach().numpy(), want)
