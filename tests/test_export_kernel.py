"""The fused CPU lookup kernel of `CompactEmbeddingBag` against its pure-PyTorch path (the spec):
bit-identical in fp32 (and for fp16 / int8 values, which both paths widen the same way), every
pooling / weighting / column width / layout (slots with rows too long for their slot, records), empty
bags and pruned rows, threads; errors; the fallback."""

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
@pytest.mark.parametrize("layout", ["slots", "records"])
def test_fused_equals_reference(dtype, dim, pooling, layout):
    if layout == "slots" and dim > 256:
        with pytest.raises(ValueError, match="256"):
            _bag(dtype, dim, layout=layout)
        return
    bag = _bag(dtype, dim, pooling=pooling, seed=dim, layout=layout)
    assert bag.layout == layout
    ids, offsets, weights = _batch(bag.num_embeddings, seed=dim + 1)
    for psw in (None, weights):
        want = bag.forward_reference(ids, offsets, psw)
        for threads in (1, 2):
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                got = bag(ids, offsets, psw)
            finally:
                torch.set_num_threads(previous)
            assert torch.equal(got, want), (dtype, dim, pooling, psw is None, threads)
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
def test_both_layouts_pool_the_same_table_alike(dtype):
    """`auto` picks slots for a sparse table (the narrowest slot holding >= 90% of its rows) and
    records for a dense one; the torch path reads every layout back to the same elements."""
    sparse = _bag(dtype, 64, keep=0.05)
    assert sparse.layout == "slots" and sparse.slot_bytes == {"fp32": 32, "fp16": 32, "int8": 16}[dtype]
    assert _bag(dtype, 64, keep=0.6).layout == "records"
    records = _bag(dtype, 64, keep=0.05, layout="records")
    ids, offsets, weights = _batch(300, seed=9)
    for a, b in zip(sparse.elements(), records.elements()):
        assert torch.equal(a, b)
    assert torch.equal(sparse(ids, offsets, weights), records(ids, offsets, weights))
    # Row 8 (all D kept) overflows its slot: its record follows the slots.
    assert sparse.packed_R.numel() == 0 and sparse.nbytes > 300 * sparse.slot_bytes


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
    monkeypatch.setattr("pep_torchrec.native.shutil.which", lambda name: None)
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
