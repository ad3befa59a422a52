"""The fused CPU lookup kernel of `CompactEmbeddingBag` against its pure-PyTorch path (the spec):
bit-identical in fp32 (and for fp16 / int8 values, which both paths widen the same way), every
pooling / weighting / column width / layout (masks and slots with rows too long for their slot,
records), the masks kernel's AVX-512 and scalar paths, its several-features call, empty bags and pruned
rows, threads; errors; the fallback."""

from __future__ import annotations

import pytest
import torch

from pep_torchrec.export import compact
from pep_torchrec.export.compact import CompactEmbeddingBag
from pep_torchrec.export.format import compress_table

needs_kernel = pytest.mark.skipif(compact.load_kernel() is None, reason="fused kernel could not be built")


def _table(dtype: str, dim: int, *, rows: int = 300, keep: float = 0.1, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(rows, dim, generator=gen) * (torch.rand(rows, dim, generator=gen) < keep)
    table[7] = 0  # a pruned row
    table[8] = torch.randn(dim, generator=gen)  # a full row
    return compress_table(table, dtype)


def _bag(
    dtype: str,
    dim: int,
    *,
    rows: int = 300,
    keep: float = 0.1,
    pooling: str = "sum",
    seed: int = 0,
    layout: str = "auto",
):
    return CompactEmbeddingBag(
        _table(dtype, dim, rows=rows, keep=keep, seed=seed), pooling=pooling, layout=layout
    )


def _batch(rows: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 12, (200,), generator=gen)
    lengths[3] = 0  # empty bags
    lengths[-1] = 0
    ids = torch.randint(0, rows, (int(lengths.sum()),), generator=gen)
    ids[:5] = 7
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    weights = torch.rand(ids.numel(), generator=gen) * 2 - 0.5
    return ids, offsets, weights


@needs_kernel
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("dim", [1, 13, 64, 300])  # 300 > 256: int64 columns
@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("layout", ["masks", "slots", "records"])
def test_fused_equals_reference(dtype, dim, pooling, layout):
    if (layout, dim) in (("slots", 300), ("masks", 300)):
        with pytest.raises(ValueError, match="256" if layout == "slots" else "64"):
            _bag(dtype, dim, layout=layout)
        return
    bag = _bag(dtype, dim, pooling=pooling, seed=dim, layout=layout)
    assert bag.layout == layout
    ids, offsets, weights = _batch(bag.num_embeddings, seed=dim + 1)
    for psw in (None, weights):
        want = bag.forward_reference(ids, offsets, psw)
        for threads, simd in ((1, True), (2, True), (1, False), (2, False)):
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            bag.simd = simd
            try:
                got = bag(ids, offsets, psw)
            finally:
                torch.set_num_threads(previous)
                bag.simd = True
            assert torch.equal(got, want), (dtype, dim, pooling, psw is None, threads, simd)
    # int32 ids / offsets are accepted (converted once).
    assert torch.equal(bag(ids.int(), offsets.int()), bag.forward_reference(ids, offsets))


@needs_kernel
def test_fused_errors_and_edge_cases():
    bag = _bag("fp32", 16)
    with pytest.raises(IndexError):
        bag(torch.tensor([0, 300]), torch.tensor([0, 2]))
    with pytest.raises(IndexError):
        bag(torch.tensor([-1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        bag(torch.tensor([0, 1]), torch.tensor([0, 1]))  # does not end at N
    with pytest.raises(ValueError):
        bag(torch.tensor([0, 1]), torch.tensor([0, 2, 1, 2]))  # decreasing
    with pytest.raises(ValueError):
        bag(torch.tensor([0, 1]), torch.tensor([0, 2]), torch.ones(3))  # weights of another length
    assert bag(torch.tensor([], dtype=torch.int64), torch.tensor([0])).shape == (0, 16)
    assert torch.equal(bag(torch.tensor([], dtype=torch.int64), torch.tensor([0, 0, 0])), torch.zeros(2, 16))
    empty = CompactEmbeddingBag(compress_table(torch.zeros(10, 4), "fp32"))  # nothing kept
    assert torch.equal(empty(torch.tensor([1, 2]), torch.tensor([0, 1, 2])), torch.zeros(2, 4))


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
def test_all_layouts_pool_the_same_table_alike(dtype):
    """`auto` picks the narrowest slot (masks or slots, masks on a tie) holding >= 90% of a sparse
    table's rows, and records for a dense one; the torch path reads every layout back to the same
    elements."""
    sparse = _bag(dtype, 64, keep=0.05)
    # D = 64: a masks slot has a 16-byte header (8-byte column mask), a slots slot 1 byte per column.
    want = {"fp32": ("slots", 32), "fp16": ("masks", 32), "int8": ("slots", 16)}[dtype]
    assert (sparse.layout, sparse.slot_bytes) == want
    narrow = _bag(dtype, 16, keep=0.1)  # D = 16: a 4-byte header, so masks is narrowest
    assert narrow.layout == "masks" and narrow.slot_bytes == 16
    # 60% kept: ~38 values a row; only int8's fit a 64-byte slot (48 of them after the header).
    assert _bag(dtype, 64, keep=0.6).layout == ("masks" if dtype == "int8" else "records")
    ids, offsets, weights = _batch(300, seed=9)
    records = _bag(dtype, 64, keep=0.05, layout="records")
    for layout in ("masks", "slots"):
        other = _bag(dtype, 64, keep=0.05, layout=layout)
        for a, b in zip(other.elements(), records.elements()):
            assert torch.equal(a, b), layout
        assert torch.equal(other(ids, offsets, weights), records(ids, offsets, weights)), layout
        # Row 8 (all D kept) overflows its slot: its values follow the slots.
        assert other.packed_R.numel() == 0 and other.nbytes > 300 * other.slot_bytes


@needs_kernel
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("dim", [5, 16, 33])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_pool_features_is_one_lookup_per_feature(dtype, dim, pooling):
    """The masks kernel's several-features call (a grouped collection's one call per request): each
    feature's bags read their own table's rows (base_F) and come back in [B, F · D] order, bit for
    bit the per-feature lookups; int32 offsets, weights, both paths, threads; an id past its own
    table is refused (not read from the next table), naming that table's size."""
    tables = [_table(dtype, dim, rows=rows, keep=0.2, seed=rows) for rows in (40, 300, 12)]
    stacked = torch.cat([t.to_dense() for t in tables])
    bag = CompactEmbeddingBag(compress_table(stacked, dtype), pooling=pooling, layout="masks")
    base_F, rows_F = torch.tensor([0, 40, 340]), torch.tensor([40, 300, 12])
    stride, gen = 9, torch.Generator().manual_seed(dim)
    lengths = torch.randint(0, 4, (3 * stride,), generator=gen)
    lengths[stride + 2] = 0
    ids = torch.cat(
        [
            torch.randint(0, int(rows), (int(lengths[f * stride : (f + 1) * stride].sum()),), generator=gen)
            for f, rows in enumerate(rows_F)
        ]
    )
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    weights = torch.rand(ids.numel(), generator=gen)
    for psw in (None, weights):
        want = torch.stack(
            [
                bag.forward_reference(
                    ids[offsets[f * stride] : offsets[(f + 1) * stride]] + base_F[f],
                    offsets[f * stride : (f + 1) * stride + 1] - offsets[f * stride],
                    None if psw is None else psw[offsets[f * stride] : offsets[(f + 1) * stride]],
                )
                for f in range(3)
            ],
            dim=1,
        ).reshape(stride, -1)
        for threads, simd, offs in ((1, True, offsets), (2, True, offsets.int()), (1, False, offsets.int())):
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            bag.simd = simd
            try:
                got = bag.pool_features(ids, offs, psw, base_F, rows_F, stride)
            finally:
                torch.set_num_threads(previous)
                bag.simd = True
            assert torch.equal(got, want), (threads, simd, offs.dtype)
    past = ids.clone()
    past[int(offsets[2 * stride])] = 12  # the third table has 12 rows
    with pytest.raises(IndexError, match=r"outside \[0, 12\)"):
        bag.pool_features(past, offsets, None, base_F, rows_F, stride)
    with pytest.raises(ValueError, match="offsets"):
        bag.pool_features(ids, offsets.flip(0).contiguous(), None, base_F, rows_F, stride)
    empty = bag.pool_features(ids[:0], torch.zeros(1, dtype=torch.int64), None, base_F, rows_F, 0)
    assert empty.shape == (0, 3 * dim)
    # Not the masks layout: None (the caller takes the generic path).
    other = CompactEmbeddingBag(compress_table(stacked, dtype), pooling=pooling, layout="records")
    assert other.pool_features(ids, offsets, None, base_F, rows_F, stride) is None


def test_fallback_when_the_kernel_cannot_be_built(monkeypatch):
    fresh = compact._NATIVE
    monkeypatch.setattr(
        compact,
        "_NATIVE",
        type(fresh)(
            fresh.source,
            fresh.flags,
            abi_symbol=fresh.abi_symbol,
            abi_version=fresh.abi_version,
            configure=fresh.configure,
            what=fresh.what,
            fallback=fresh.fallback,
        ),
    )
    monkeypatch.setattr("pep_torchrec.utils.native.shutil.which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.delenv("PEP_TORCHREC_DISABLE_CPU_KERNEL", raising=False)
    with pytest.warns(RuntimeWarning, match="falling back"):
        assert compact.load_kernel() is None
    bag = _bag("int8", 8)
    ids, offsets, weights = _batch(bag.num_embeddings, seed=3)
    # Without the kernel the bag runs its pure-PyTorch path: compare it with an independent lookup
    # (F.embedding_bag over the decoded dense table), not with itself.
    dense = _table("int8", 8).to_dense().float()
    want = torch.nn.functional.embedding_bag(
        ids, dense, offsets, mode="sum", per_sample_weights=weights, include_last_offset=True
    )
    torch.testing.assert_close(bag(ids, offsets, weights), want, rtol=1e-5, atol=1e-5)
