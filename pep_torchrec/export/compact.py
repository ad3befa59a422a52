"""Pooled lookups straight from the compact (CSR) tables: the serving model's embedding module.

Legend: R = table rows, D = embedding dim, N = looked-up ids, B = bags, E = kept elements of the
looked-up rows (Σ over the N ids of their row lengths), K = kept elements of the table.

`CompactEmbeddingBag` never rebuilds a dense [R, D] table. Records: one per kept row, [its `length`
values (fp32 / fp16 / int8) | their columns (uint8; int64 when D > 256)]. Three layouts hold them:

* `masks` (D <= 64): one fixed-width slot (16, 32 or 64 bytes) per original id, `data[id · S : (id + 1) · S]`
  = [exponent + 128 | overflow flag | column bitmask (2 / 4 / 8 bytes) | the kept values in column
  order], mask 0 for a pruned row; a row too long for its slot keeps its mask there and has its values
  after the slots (flag 1, their int64 byte position in the slot). No column bytes at all, so a 16-byte
  slot holds 3 fp32 values at D = 16 (`slots`: 2). The kernel expands each slot's values into the lanes
  its mask names and adds them masked (AVX-512; a loop over the mask's bits elsewhere): per id and 16
  columns a few instructions and no data-dependent branch. `auto` takes the narrowest slot of masks
  or slots (masks on a tie) holding >= 90% of the kept rows.

* `slots` (D <= 256, when a slot of 16, 32 or 64 bytes holds >= 90% of the kept rows: the usual case
  for pruned tables): one fixed-width slot per original id, `data[id · S : (id + 1) · S]` =
  [n (uint8) | exponent + 128 (uint8) | n columns (uint8) | n values, aligned], n = 0 for a pruned row.
  A longer row has n = 255 and, at slot bytes [8, 16), the int64 `start << 24 | (exponent + 128) << 16
  | length` of its record, appended after the slots. A lookup is one random read of one cache-line-
  aligned slot per id (a dense fp32 row at D = 64 is four lines), where `records` needs two.
* `records` (otherwise): `data` = the records back to back, plus one int64 `packed_R[id]` =
  `start << 24 | (exponent + 128) << 16 | length` per original id (0 for a pruned row).

The slot layout trades memory for latency: R · S bytes (S = 16 at 5% of D = 16, 32 at 5% of D = 64:
1/8 of the dense fp32 table) against 8 · R + the records' bytes.

The fused CPU kernel (`csrc/compact_pool_cpu.cpp`, the default) pools in one pass per bag: per id,
read its slot (or packed_R, then the record) and add the values into their columns (OpenMP over
bags; software prefetch of the slot, or of packed_R and the record, ahead). It has no torch headers,
builds with the system C++ compiler in a few seconds on first use into `$PEP_TORCHREC_CACHE` (default
~/.cache/pep_torchrec) and is loaded through ctypes; if it cannot be built: one warning, then the
torch path. `PEP_TORCHREC_DISABLE_CPU_KERNEL=1` (or `use_kernel = False`) forces the torch path.

The torch path (`forward_reference`: the kernel's spec, and its fallback) works on an element-array
view of either layout (unpacked once, on first use; start = the row's first element):

    packed_N = packed_R[ids]                         one random access per id
    owner_E  = repeat_interleave(arange(N), len_N)   which id each element belongs to
    elem_E   = start_N[owner_E] + (E-local rank)     where it lives in values / cols
    out[bag_N[owner_E], cols[elem_E]] += values[elem_E] (· 2^exponent, · per-sample weight)

Both do work ∝ E (≈ kept share × N × D), not N × D as a dense bag, and give bit-identical fp32
results: every output element receives its contributions in id order, each computed alike (the
kernel is built with -ffp-contract=off: no fused multiply-add). Throughput against a dense
`nn.EmbeddingBag`: benchmarks/results/serving.md.

`CompactEmbeddingBagCollection` puts one `CompactEmbeddingBag` (or `DenseEmbeddingBag`, the
artifact's dense layout) per table behind TorchRec's EBC interface (KJT in, KeyedTensor out,
`embedding_bag_configs()`), so the repo's models run on it unchanged. Tables that share D, value
dtype and pooling are stacked into one such module (`group_tables`, a `TableSlice` per table), and
the collection pools all its features in one call with ids shifted to their table's rows: a request
then pays one lookup call where it paid one per table, with the same bits (the demo's FM, 26 tables
for its embeddings and 26 for its first-order weights: 740 -> 230 µs a forward at batch 1). A masks-
layout group goes further (`CompactEmbeddingBag.pool_features`): the kernel takes the KJT as it is,
checks each feature's ids against its own table, reads them at that table's rows and writes the
[B, F · D] KeyedTensor values directly, with no shifted-id copy, range-check ops or transpose (the
demo's embeddings: ~98 -> ~37 µs a call at batch 64, where the dense group pays them).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import Tensor, nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from pep_torchrec.export.format import CompactTable
from pep_torchrec.utils.native import NativeLibrary

_LENGTH_BITS = 16
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
_START_SHIFT = 24
_EXPONENT_BIAS = 128
_POOLINGS = ("sum", "mean")
_LAYOUTS = ("auto", "masks", "slots", "records")
_SLOT_WIDTHS = (16, 32, 64)
_SLOT_COVERAGE = 0.9  # `auto` picks the narrowest slot holding at least this share of the kept rows
_OVERFLOW = 0xFF
_MASKS_PADDING = 64  # zero bytes after the masks layout's data (the kernel's 64-byte value loads)


_KERNEL_SOURCE = Path(__file__).with_name("csrc") / "compact_pool_cpu.cpp"
_KERNEL_ABI = 9
# -ffp-contract=off: no FMA contraction of `x · w` and the add, so fp32 results equal the torch path.
_KERNEL_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
_VALUE_KINDS = {torch.float32: 0, torch.float16: 1, torch.int8: 2}


def _configure(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.pep_compact_pool.argtypes = [p, i64, p, i64, p, i64, i64, p, i32, i32, i32, p, i32, p, i32]
    lib.pep_compact_pool.restype = i64
    lib.pep_compact_pool_slots.argtypes = [p, i64, i64, i64, p, i64, p, i64, i64, i32, i32, p, i32, p, i32]
    lib.pep_compact_pool_slots.restype = i64
    lib.pep_compact_pool_masks.argtypes = [
        p,
        i64,
        i64,
        i64,
        p,
        p,
        i64,
        p,
        i64,
        p,
        i32,
        i64,
        i64,
        i64,
        i32,
        i32,
        p,
        i32,
        p,
        i32,
        i32,
    ]
    lib.pep_compact_pool_masks.restype = i64
    lib.pep_compact_masks_simd.restype = i32


_NATIVE = NativeLibrary(
    _KERNEL_SOURCE,
    _KERNEL_FLAGS,
    abi_symbol="pep_compact_abi_version",
    abi_version=_KERNEL_ABI,
    configure=_configure,
    what="fused compact lookup kernel",
    fallback="the (slower) pure-PyTorch path",
)


def load_kernel() -> ctypes.CDLL | None:
    """The fused CPU kernel (built on first use), or None (after one warning) if it cannot be built."""
    return _NATIVE.load()


def slot_capacity(slot_bytes: int, value_bytes: int) -> tuple[int, int]:
    """(most elements a slot holds inline, byte offset of its values): [n | exponent | cols | values]."""
    best = (0, 2)
    for cap in range(1, slot_bytes):
        value_offset = -(-(2 + cap) // value_bytes) * value_bytes
        if value_offset + cap * value_bytes <= slot_bytes:
            best = (cap, value_offset)
    return best


def masks_header(dim: int, value_bytes: int) -> tuple[int, int, int, int]:
    """The masks layout's slot header for D <= 64: (mask offset, mask bytes, value offset, pointer
    offset): [exponent + 128 | overflow flag | column bitmask | values (aligned)], and an overflowing
    row's int64 record position at the pointer offset."""
    mask_bytes = 2 if dim <= 16 else 4 if dim <= 32 else 8
    mask_offset = max(2, mask_bytes)
    value_offset = -(-(mask_offset + mask_bytes) // value_bytes) * value_bytes
    return mask_offset, mask_bytes, value_offset, max(8, mask_offset + mask_bytes)


def _element_positions(
    lengths_Rk: Tensor, value_start_Rk: Tensor, col_start_Rk: Tensor, value_bytes: int, col_bytes: int
) -> tuple[Tensor, Tensor]:
    """Byte positions of every element's value [K, value bytes] and column [K, col bytes], given each
    kept row's length and the byte positions of its first value and first column."""
    num_elems = int(lengths_Rk.sum())
    owner_K = torch.repeat_interleave(torch.arange(lengths_Rk.numel()), lengths_Rk, output_size=num_elems)
    local_K = torch.arange(num_elems) - (torch.cumsum(lengths_Rk, 0) - lengths_Rk).index_select(0, owner_K)
    value_pos = value_start_Rk.index_select(0, owner_K) + local_K * value_bytes
    col_pos = col_start_Rk.index_select(0, owner_K) + local_K * col_bytes
    return value_pos.unsqueeze(1) + torch.arange(value_bytes), col_pos.unsqueeze(1) + torch.arange(col_bytes)


def _check_offsets(offsets_B1: Tensor, num_ids: int) -> None:
    if offsets_B1.dim() != 1 or offsets_B1.numel() < 1 or int(offsets_B1[-1]) != num_ids:
        raise ValueError(
            f"offsets must be [B + 1] ending at N = {num_ids}, got shape {tuple(offsets_B1.shape)}"
        )


def _bag_lengths(offsets_B1: Tensor, num_ids: int) -> Tensor:
    _check_offsets(offsets_B1, num_ids)
    return offsets_B1[1:] - offsets_B1[:-1]


class CompactEmbeddingBag(nn.Module):
    """Sum/mean-pooled lookups of one pruned table stored as CSR.

    Args:
        table: the decoded compact table (values fp32 / fp16 / int8 with per-row scales).
        pooling: "sum" or "mean" (mean divides by the bag's id count, pruned ids included, as the
            training module does).
        layout: "slots", "records" or "auto" (slots when D <= 256 and a slot of <= 64 bytes holds
            >= 90% of the kept rows; see the module doc).

    Shapes: forward(ids [N] int, offsets [B + 1] int, per_sample_weights [N] | None) → [B, D] float32.
    """

    def __init__(self, table: CompactTable, *, pooling: str = "sum", layout: str = "auto") -> None:
        super().__init__()
        if pooling not in _POOLINGS:
            raise ValueError(f"pooling must be one of {_POOLINGS}, got {pooling!r}")
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
        if table.embedding_dim > _LENGTH_MASK:
            raise ValueError(f"embedding_dim {table.embedding_dim} is too wide (max {_LENGTH_MASK})")
        self.num_embeddings = table.num_embeddings
        self.embedding_dim = table.embedding_dim
        self.pooling = pooling
        self.quantized = table.exponents is not None
        self.value_dtype = table.values.dtype
        self._value_bytes = table.values.element_size()
        self._col_bytes = 1 if table.embedding_dim <= 256 else 8  # uint8 columns: 1/8 of int64's traffic
        self._mask_offset, self._mask_bytes, self._pointer_offset = 0, 0, 0
        if self.embedding_dim <= 64:
            self._mask_offset, self._mask_bytes, _, self._pointer_offset = masks_header(
                self.embedding_dim, self._value_bytes
            )
        self.layout, self.slot_bytes, self._slot_capacity, self._value_offset = self._pick_layout(
            table.lengths, layout
        )
        exponents = (
            table.exponents.long() + _EXPONENT_BIAS if self.quantized else torch.zeros_like(table.lengths)
        )
        if self.layout == "masks":
            data, packed = self._build_masks(table, exponents), torch.zeros(0, dtype=torch.int64)
        elif self.layout == "slots":
            data, packed = self._build_slots(table, exponents), torch.zeros(0, dtype=torch.int64)
        else:
            data, packed = self._build_records(table, exponents)
        self.register_buffer("packed_R", packed, persistent=False)
        self.register_buffer("data", data, persistent=False)
        self._elements: tuple[Tensor, Tensor, Tensor] | None = None  # the torch path's view, built on use
        self.kept_rows = table.kept_rows
        self.kept_params = table.kept_params
        # The fused kernel is used when it loads; False forces the torch path (tests, benchmarks).
        self.use_kernel = True
        self._value_kind = _VALUE_KINDS[self.value_dtype]
        self._col_kind = int(self._col_bytes == 8)
        self._quantized_flag = int(self.quantized)
        self._mean_flag = int(pooling == "mean")
        # One feature of base 0: the plain [B, D] call of the masks kernel (see `pool_features`).
        self._plain_base = torch.zeros(1, dtype=torch.int64)
        self._plain_rows = torch.tensor([self.num_embeddings], dtype=torch.int64)
        self.simd = True  # the masks kernel's AVX-512 path where built; False forces its scalar loop

    @property
    def _col_dtype(self) -> torch.dtype:
        return torch.uint8 if self._col_bytes == 1 else torch.int64

    @property
    def nbytes(self) -> int:
        """Bytes of the lookup structure (slots or packed_R, plus records)."""
        return self.data.nbytes + self.packed_R.nbytes

    def _pick_layout(self, lengths_Rk: Tensor, layout: str) -> tuple[str, int, int, int]:
        """(layout, slot bytes, inline capacity, value offset); zeros for the records layout. `auto`:
        the narrowest slot (masks or slots, masks on a tie) holding >= 90% of the kept rows, else
        records."""
        if layout == "slots" and self._col_bytes != 1:
            raise ValueError(f"layout 'slots' needs embedding_dim <= 256, got {self.embedding_dim}")
        if layout == "masks" and not self._mask_bytes:
            raise ValueError(f"layout 'masks' needs embedding_dim <= 64, got {self.embedding_dim}")
        if layout == "records":
            return "records", 0, 0, 0

        def covers(capacity: int) -> bool:
            return (
                float((lengths_Rk <= capacity).float().mean()) >= _SLOT_COVERAGE
                if lengths_Rk.numel()
                else True
            )

        candidates = []  # (width, masks second, layout, capacity, value offset)
        if self._mask_bytes and layout in ("auto", "masks"):
            value_offset = masks_header(self.embedding_dim, self._value_bytes)[2]
            for width in _SLOT_WIDTHS:
                capacity = (width - value_offset) // self._value_bytes
                if width >= self._pointer_offset + 8 and (covers(capacity) or width == _SLOT_WIDTHS[-1]):
                    if covers(capacity) or layout == "masks":
                        candidates.append((width, 0, "masks", capacity, value_offset))
                    break
        if self._col_bytes == 1 and layout in ("auto", "slots"):
            for width in _SLOT_WIDTHS:
                capacity, value_offset = slot_capacity(width, self._value_bytes)
                if covers(capacity) or (layout == "slots" and width == _SLOT_WIDTHS[-1]):
                    candidates.append((width, 1, "slots", capacity, value_offset))
                    break
        if not candidates:
            return "records", 0, 0, 0
        width, _, name, capacity, value_offset = min(candidates)
        return name, width, capacity, value_offset

    def _write_elements(
        self, data: Tensor, table: CompactTable, lengths: Tensor, value_start: Tensor, col_start: Tensor
    ) -> None:
        if not table.values.numel():
            return
        value_pos, col_pos = _element_positions(
            lengths, value_start, col_start, self._value_bytes, self._col_bytes
        )
        data[value_pos] = table.values.contiguous().view(torch.uint8).view(-1, self._value_bytes)
        data[col_pos] = (
            table.cols.to(self._col_dtype).contiguous().view(torch.uint8).view(-1, self._col_bytes)
        )

    def _build_records(self, table: CompactTable, exponents_Rk: Tensor) -> tuple[Tensor, Tensor]:
        lengths = table.lengths
        record_bytes = lengths * (self._value_bytes + self._col_bytes)
        byte_start = torch.cumsum(record_bytes, 0) - record_bytes
        data = torch.zeros(int(record_bytes.sum()), dtype=torch.uint8)
        self._write_elements(data, table, lengths, byte_start, byte_start + lengths * self._value_bytes)
        packed = torch.zeros(table.num_embeddings, dtype=torch.int64)
        packed[table.row_ids] = (byte_start << _START_SHIFT) | (exponents_Rk << _LENGTH_BITS) | lengths
        return data, packed

    def _build_slots(self, table: CompactTable, exponents_Rk: Tensor) -> Tensor:
        width, lengths = self.slot_bytes, table.lengths
        inline = lengths <= self._slot_capacity
        slot_start = table.row_ids * width
        # Rows too long for their slot: records after the slots; the slot points at theirs.
        record_bytes = torch.where(inline, 0, lengths * (self._value_bytes + self._col_bytes))
        record_start = table.num_embeddings * width + torch.cumsum(record_bytes, 0) - record_bytes
        data = torch.zeros(table.num_embeddings * width + int(record_bytes.sum()), dtype=torch.uint8)
        data[slot_start] = torch.where(inline, lengths, _OVERFLOW).to(torch.uint8)
        data[slot_start + 1] = exponents_Rk.to(torch.uint8)
        value_start = torch.where(inline, slot_start + self._value_offset, record_start)
        col_start = torch.where(inline, slot_start + 2, record_start + lengths * self._value_bytes)
        self._write_elements(data, table, lengths, value_start, col_start)
        long_rows = torch.nonzero(~inline).squeeze(1)
        if long_rows.numel():
            pointer = (
                (record_start[long_rows] << _START_SHIFT)
                | (exponents_Rk[long_rows] << _LENGTH_BITS)
                | lengths[long_rows]
            )
            data[(slot_start[long_rows] + 8).unsqueeze(1) + torch.arange(8)] = pointer.view(torch.uint8).view(
                -1, 8
            )
        return data

    def _build_masks(self, table: CompactTable, exponents_Rk: Tensor) -> Tensor:
        width, lengths, value_bytes = self.slot_bytes, table.lengths, self._value_bytes
        inline = lengths <= self._slot_capacity
        slot_start = table.row_ids * width
        # Rows too long for their slot: their values after the slots; the slot points at them.
        record_bytes = torch.where(inline, 0, lengths * value_bytes)
        record_start = table.num_embeddings * width + torch.cumsum(record_bytes, 0) - record_bytes
        # + _MASKS_PADDING: the kernel loads 16 values' bytes from any value position (see the .cpp).
        data = torch.zeros(
            table.num_embeddings * width + int(record_bytes.sum()) + _MASKS_PADDING, dtype=torch.uint8
        )
        data[slot_start] = exponents_Rk.to(torch.uint8)
        data[slot_start + 1] = (~inline).to(torch.uint8)
        owner_K = torch.repeat_interleave(
            torch.arange(lengths.numel()), lengths, output_size=table.values.numel()
        )
        # Distinct powers of two: their int64 sum is their OR (bit 63 wraps to the sign bit, as it should).
        mask = torch.zeros(lengths.numel(), dtype=torch.int64).index_add_(0, owner_K, 1 << table.cols)
        mask_pos = (slot_start + self._mask_offset).unsqueeze(1) + torch.arange(self._mask_bytes)
        data[mask_pos] = mask.view(torch.uint8).view(-1, 8)[:, : self._mask_bytes]
        value_start = torch.where(inline, slot_start + self._value_offset, record_start)
        if table.values.numel():
            value_pos, _ = _element_positions(lengths, value_start, value_start, value_bytes, 1)
            data[value_pos] = table.values.contiguous().view(torch.uint8).view(-1, value_bytes)
        long_rows = torch.nonzero(~inline).squeeze(1)
        if long_rows.numel():
            pointer_pos = (slot_start[long_rows] + self._pointer_offset).unsqueeze(1) + torch.arange(8)
            data[pointer_pos] = record_start[long_rows].contiguous().view(torch.uint8).view(-1, 8)
        return data

    def _mask_elements(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The masks layout read back: (row ids, lengths, exponent + 128, values [K], cols [K])."""
        width, dim = self.slot_bytes, self.embedding_dim
        slots = self.data[: self.num_embeddings * width].view(self.num_embeddings, width)
        mask_bytes = slots[:, self._mask_offset : self._mask_offset + self._mask_bytes].long()
        mask = (mask_bytes << (8 * torch.arange(self._mask_bytes))).sum(1)
        row_ids = torch.nonzero(mask).squeeze(1)
        kept = slots.index_select(0, row_ids)
        bits_RkD = ((mask.index_select(0, row_ids).unsqueeze(1) >> torch.arange(dim)) & 1).bool()
        lengths = bits_RkD.sum(1)
        cols = torch.nonzero(bits_RkD)[:, 1]
        pointer = (
            kept[:, self._pointer_offset : self._pointer_offset + 8].contiguous().view(torch.int64).view(-1)
        )
        value_start = torch.where(kept[:, 1] != 0, pointer, row_ids * width + self._value_offset)
        value_pos, _ = _element_positions(lengths, value_start, value_start, self._value_bytes, 1)
        values = self.data[value_pos].contiguous().view(self.value_dtype).view(-1)
        return row_ids, lengths, kept[:, 0].long(), values, cols

    def _row_layout(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Per kept row, read back from the layout: (row ids, lengths, exponent + 128, byte position
        of the first value, of the first column)."""
        if self.layout == "records":
            row_ids = torch.nonzero(self.packed_R & _LENGTH_MASK).squeeze(1)
            packed = self.packed_R.index_select(0, row_ids)
            lengths, start = packed & _LENGTH_MASK, packed >> _START_SHIFT
            return (
                row_ids,
                lengths,
                (packed >> _LENGTH_BITS) & 0xFF,
                start,
                start + lengths * self._value_bytes,
            )
        width = self.slot_bytes
        slots = self.data[: self.num_embeddings * width].view(self.num_embeddings, width)
        count = slots[:, 0].long()
        row_ids = torch.nonzero(count).squeeze(1)
        count, slot_start = count.index_select(0, row_ids), row_ids * width
        exponent = slots[:, 1].long().index_select(0, row_ids)
        pointer = slots.index_select(0, row_ids)[:, 8:16].contiguous().view(torch.int64).view(-1)
        long_row = count == _OVERFLOW
        lengths = torch.where(long_row, pointer & _LENGTH_MASK, count)
        record = pointer >> _START_SHIFT
        value_start = torch.where(long_row, record, slot_start + self._value_offset)
        col_start = torch.where(long_row, record + lengths * self._value_bytes, slot_start + 2)
        return row_ids, lengths, exponent, value_start, col_start

    def elements(self) -> tuple[Tensor, Tensor, Tensor]:
        """(packed_R with element (not byte) starts, values [K], cols [K] int64): the torch path's
        element-array view of the layout, unpacked once on first use."""
        if self._elements is None:
            if self.layout == "masks":
                row_ids, lengths, exponent, values, cols = self._mask_elements()
            else:
                row_ids, lengths, exponent, value_start, col_start = self._row_layout()
                value_pos, col_pos = _element_positions(
                    lengths, value_start, col_start, self._value_bytes, self._col_bytes
                )
                values = self.data[value_pos].contiguous().view(self.value_dtype).view(-1)
                cols = self.data[col_pos].contiguous().view(self._col_dtype).view(-1).long()
            elem_start = torch.cumsum(lengths, 0) - lengths
            packed = torch.zeros(self.num_embeddings, dtype=torch.int64)
            packed[row_ids] = (elem_start << _START_SHIFT) | (exponent << _LENGTH_BITS) | lengths
            self._elements = (packed, values, cols)
        return self._elements

    def extra_repr(self) -> str:
        slots = f", slot_bytes={self.slot_bytes}" if self.slot_bytes else ""
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
            f"kept_rows={self.kept_rows}, kept_params={self.kept_params}, values={self.value_dtype}, "
            f"layout={self.layout}{slots}"
        )

    def forward(self, ids_N: Tensor, offsets_B1: Tensor, per_sample_weights: Tensor | None = None) -> Tensor:
        lib = load_kernel() if self.use_kernel else None
        if (
            lib is None
            or ids_N.device.type != "cpu"
            or ids_N.dim() != 1
            or offsets_B1.dim() != 1
            or offsets_B1.numel() < 1
        ):
            return self.forward_reference(ids_N, offsets_B1, per_sample_weights)
        if ids_N.dtype != torch.int64 or not ids_N.is_contiguous():
            ids_N = ids_N.to(torch.int64).contiguous()
        if offsets_B1.dtype != torch.int64 or not offsets_B1.is_contiguous():
            offsets_B1 = offsets_B1.to(torch.int64).contiguous()
        if per_sample_weights is not None:
            if per_sample_weights.shape != ids_N.shape:
                raise ValueError(
                    f"per_sample_weights: shape {tuple(per_sample_weights.shape)}, "
                    f"expected {tuple(ids_N.shape)}"
                )
            per_sample_weights = per_sample_weights.to(torch.float32).contiguous()
        num_bags = offsets_B1.numel() - 1
        out_BD = torch.empty(num_bags, self.embedding_dim)
        psw = per_sample_weights.data_ptr() if per_sample_weights is not None else None
        # The table's pointers are read per call (buffers may be moved / replaced, e.g. `.to()`).
        if self.layout == "masks":
            status = self._pool_masks(
                lib,
                ids_N,
                offsets_B1,
                per_sample_weights,
                self._plain_base,
                self._plain_rows,
                num_bags,
                out_BD,
            )
        elif self.layout == "slots":
            status = lib.pep_compact_pool_slots(
                self.data.data_ptr(), self.slot_bytes, self._value_offset, self.num_embeddings, ids_N.data_ptr(),
                ids_N.numel(), offsets_B1.data_ptr(), num_bags, self.embedding_dim, self._value_kind,
                self._quantized_flag, psw, self._mean_flag, out_BD.data_ptr(), torch.get_num_threads(),
            )  # fmt: skip
        else:
            status = lib.pep_compact_pool(
                self.packed_R.data_ptr(), self.num_embeddings, ids_N.data_ptr(), ids_N.numel(),
                offsets_B1.data_ptr(), num_bags, self.embedding_dim, self.data.data_ptr(), self._value_kind,
                self._col_kind, self._quantized_flag, psw, self._mean_flag, out_BD.data_ptr(),
                torch.get_num_threads(),
            )  # fmt: skip
        if status == -2:
            raise ValueError(
                f"offsets must be [B + 1] non-decreasing from 0 to N = {ids_N.numel()}, "
                f"got shape {tuple(offsets_B1.shape)}"
            )
        if status >= 0:
            raise IndexError(f"ids outside [0, {self.num_embeddings})")
        return out_BD

    def _pool_masks(
        self,
        lib: ctypes.CDLL,
        ids_N: Tensor,
        offsets: Tensor,
        psw: Tensor | None,
        base_F: Tensor,
        rows_F: Tensor,
        stride: int,
        out: Tensor,
    ) -> int:
        """The masks kernel over F = base_F.numel() features of `stride` bags each (ids int64, offsets
        int64 / int32, contiguous); returns its status."""
        return lib.pep_compact_pool_masks(
            self.data.data_ptr(), self.slot_bytes, self._value_offset, self._pointer_offset,
            base_F.data_ptr(), rows_F.data_ptr(), base_F.numel(), ids_N.data_ptr(), ids_N.numel(),
            offsets.data_ptr(), int(offsets.dtype == torch.int32), offsets.numel() - 1, stride,
            self.embedding_dim, self._value_kind, self._quantized_flag,
            psw.data_ptr() if psw is not None else None, self._mean_flag, out.data_ptr(),
            torch.get_num_threads(), int(self.simd),
        )  # fmt: skip

    def pool_features(
        self, ids_N: Tensor, offsets: Tensor, psw: Tensor | None, base_F: Tensor, rows_F: Tensor, stride: int
    ) -> Tensor | None:
        """A KJT's F features (`stride` bags each, feature-major) pooled in one kernel call, feature f's
        ids checked against [0, rows_F[f]) and read at row base_F[f] + id: [stride, F · D], the
        KeyedTensor's values (no shifted-id copy, no transpose). None where the masks kernel does not
        apply (another layout, no kernel, other dtypes): then the caller takes the generic path."""
        num_features = base_F.numel()
        if (
            self.layout != "masks"
            or not self.use_kernel
            or ids_N.dtype != torch.int64
            or offsets.dtype not in (torch.int64, torch.int32)
            or ids_N.dim() != 1
            or offsets.dim() != 1
            or offsets.numel() != num_features * stride + 1
            or not (ids_N.is_contiguous() and offsets.is_contiguous())
            or (
                psw is not None
                and (psw.dtype != torch.float32 or psw.shape != ids_N.shape or not psw.is_contiguous())
            )
            or ids_N.device.type != "cpu"
        ):
            return None
        lib = load_kernel()
        if lib is None:
            return None
        out = torch.empty(stride, num_features * self.embedding_dim)
        status = self._pool_masks(lib, ids_N, offsets, psw, base_F, rows_F, stride, out)
        if status == -2:
            raise ValueError(f"offsets must be [F · B + 1] non-decreasing from 0 to N = {ids_N.numel()}")
        if status >= 0:
            feature = int(torch.searchsorted(offsets.long(), status, right=True)) - 1
            raise IndexError(f"ids outside [0, {int(rows_F[feature // stride])})")
        return out

    def forward_reference(
        self, ids_N: Tensor, offsets_B1: Tensor, per_sample_weights: Tensor | None = None
    ) -> Tensor:
        """The pure-PyTorch path: the spec of the fused kernel, and its fallback."""
        packed_R, values_K, cols_K = self.elements()
        ids_N = ids_N.long()
        num_ids = ids_N.numel()
        lengths_B = _bag_lengths(offsets_B1.long(), num_ids)
        num_bags, dim = lengths_B.numel(), self.embedding_dim
        out_BD = torch.zeros(num_bags, dim)
        if num_ids == 0:
            return out_BD
        if bool(((ids_N < 0) | (ids_N >= self.num_embeddings)).any()):
            raise IndexError(f"ids outside [0, {self.num_embeddings})")
        # index_select, not `x[idx]`: aten::index is ~30x slower on CPU for 1-D gathers.
        packed_N = packed_R.index_select(0, ids_N)
        len_N = packed_N & _LENGTH_MASK
        end_N = torch.cumsum(len_N, 0)
        num_elems = int(end_N[-1])
        if num_elems == 0:
            return out_BD / lengths_B.clamp(min=1).unsqueeze(1) if self.pooling == "mean" else out_BD
        owner_E = torch.repeat_interleave(torch.arange(num_ids), len_N, output_size=num_elems)
        # Element e of id n sits at start_n + (e − first element of n in the batch's element list).
        shift_N = (packed_N >> _START_SHIFT) - (end_N - len_N)
        elem_E = shift_N.index_select(0, owner_E) + torch.arange(num_elems)
        bag_N = torch.repeat_interleave(torch.arange(num_bags), lengths_B, output_size=num_ids)
        target_E = (bag_N * dim).index_select(0, owner_E) + cols_K.index_select(0, elem_E)
        values_E = values_K.index_select(0, elem_E)
        if values_E.dtype != torch.float32:
            values_E = values_E.float()
        if self.quantized:
            exponent_N = ((packed_N >> _LENGTH_BITS) & 0xFF) - _EXPONENT_BIAS
            values_E = torch.ldexp(values_E, exponent_N.float().index_select(0, owner_E))
        if per_sample_weights is not None:
            values_E = values_E * per_sample_weights.float().index_select(0, owner_E)
        out_BD.view(-1).index_add_(0, target_E, values_E)
        if self.pooling == "mean":
            out_BD = out_BD / lengths_B.clamp(min=1).to(out_BD.dtype).unsqueeze(1)
        return out_BD


class DenseEmbeddingBag(nn.Module):
    """The dense layout's lookup: `F.embedding_bag` over a [R, D] table (fp16/int8 widened at load)."""

    def __init__(self, weight_RD: Tensor, *, pooling: str = "sum") -> None:
        super().__init__()
        if pooling not in _POOLINGS:
            raise ValueError(f"pooling must be one of {_POOLINGS}, got {pooling!r}")
        self.num_embeddings, self.embedding_dim = weight_RD.shape
        self.pooling = pooling
        self.register_buffer("weight", weight_RD.float().contiguous(), persistent=False)

    def forward(self, ids_N: Tensor, offsets_B1: Tensor, per_sample_weights: Tensor | None = None) -> Tensor:
        if self.pooling == "mean" and per_sample_weights is not None:
            lengths_B = _bag_lengths(offsets_B1, ids_N.numel())
            pooled = nn.functional.embedding_bag(
                ids_N.long(),
                self.weight,
                offsets_B1.long(),
                mode="sum",
                per_sample_weights=per_sample_weights.float(),
                include_last_offset=True,
            )
            return pooled / lengths_B.clamp(min=1).unsqueeze(1)
        _check_offsets(offsets_B1, ids_N.numel())
        return nn.functional.embedding_bag(
            ids_N.long(),
            self.weight,
            offsets_B1.long(),
            mode=self.pooling,
            per_sample_weights=per_sample_weights,
            include_last_offset=True,
        )


class TableSlice(nn.Module):
    """One table of a grouped lookup: rows [row_base, row_base + R) of `group`, which owns the storage.

    Tables that share D, value dtype and pooling are stacked row-wise into one lookup module (see
    `group_tables`): a collection then pools every feature in one call instead of one call per table
    (~10 µs each, the larger part of a small model's forward), and each table stays addressable here.

    Shapes: forward(ids [N] in [0, R), offsets [B + 1], per_sample_weights [N] | None) → [B, D].
    """

    def __init__(self, group: nn.Module, row_base: int, num_embeddings: int, **info: int) -> None:
        super().__init__()
        self.group = group
        self.row_base, self.num_embeddings, self.embedding_dim = row_base, num_embeddings, group.embedding_dim
        for name, value in info.items():  # kept_rows / kept_params of a compact table
            setattr(self, name, value)

    def forward(self, ids_N: Tensor, offsets_B1: Tensor, per_sample_weights: Tensor | None = None) -> Tensor:
        if ids_N.numel() and bool(((ids_N < 0) | (ids_N >= self.num_embeddings)).any()):
            raise IndexError(f"ids outside [0, {self.num_embeddings})")
        return self.group(ids_N + self.row_base, offsets_B1, per_sample_weights)


def group_tables(
    tables: dict[str, CompactTable | Tensor], poolings: dict[str, str]
) -> dict[str, TableSlice] | None:
    """`tables` (all compact, or all dense [R, D] weights) stacked row-wise into one lookup module, as a
    `TableSlice` per table; None when they cannot share one (D, value dtype, int8 scales or pooling
    differ). Pooled results are bit for bit the per-table modules': every bag reads the same rows in
    the same order, only their ids are shifted."""
    items = list(tables.items())
    if not items or len({poolings[name] for name in tables}) != 1:
        return None
    pooling = poolings[items[0][0]]
    bases, base = [], 0
    for _, table in items:
        bases.append(base)
        base += table.num_embeddings if isinstance(table, CompactTable) else table.shape[0]
    if all(isinstance(t, Tensor) for _, t in items):
        if len({t.shape[1] for _, t in items}) != 1:
            return None
        group: nn.Module = DenseEmbeddingBag(torch.cat([t.float() for _, t in items]), pooling=pooling)
        return {name: TableSlice(group, b, t.shape[0]) for (name, t), b in zip(items, bases)}
    compact = [t for _, t in items if isinstance(t, CompactTable)]
    if (
        len(compact) != len(items)
        or len({(t.embedding_dim, t.values.dtype, t.exponents is None) for t in compact}) != 1
    ):
        return None
    first = compact[0]
    stacked = CompactTable(
        num_embeddings=base,
        embedding_dim=first.embedding_dim,
        row_ids=torch.cat([t.row_ids + b for t, b in zip(compact, bases)]),
        lengths=torch.cat([t.lengths for t in compact]),
        cols=torch.cat([t.cols for t in compact]),
        values=torch.cat([t.values for t in compact]),
        exponents=None if first.exponents is None else torch.cat([t.exponents for t in compact]),
    )
    group = CompactEmbeddingBag(stacked, pooling=pooling)
    return {
        name: TableSlice(group, b, t.num_embeddings, kept_rows=t.kept_rows, kept_params=t.kept_params)
        for (name, t), b in zip(items, bases)
    }


class _Grouped:
    """The one-call path of a collection whose features each read a `TableSlice` of one group."""

    def __init__(self, feature_bags: list[nn.Module]) -> None:
        self.group = feature_bags[0].group
        self.row_base_F = torch.tensor([b.row_base for b in feature_bags], dtype=torch.int64)
        self.rows_F = torch.tensor([b.num_embeddings for b in feature_bags], dtype=torch.int64)

    @staticmethod
    def of(feature_bags: list[nn.Module]) -> _Grouped | None:
        if feature_bags and all(
            isinstance(b, TableSlice) and b.group is feature_bags[0].group for b in feature_bags
        ):
            return _Grouped(feature_bags)
        return None

    def pool(self, features: KeyedJaggedTensor) -> Tensor:
        """[B, F, D] (maybe a transposed view): every feature's bags in one lookup (ids read at their
        table's rows). A compact group of the masks layout does it all in its kernel (range checks,
        row bases, the [B, F, D] order); otherwise ids are shifted here and the [F, B, D] result viewed
        transposed."""
        ids_N = features.values()
        pool_features = getattr(self.group, "pool_features", None)
        if pool_features is not None:
            stride = features.stride()
            pooled = pool_features(
                ids_N, features.offsets(), features.weights_or_none(), self.row_base_F, self.rows_F, stride
            )
            if pooled is not None:
                return pooled.view(stride, self.row_base_F.numel(), -1)
        counts_F = torch.tensor(features.length_per_key(), dtype=torch.int64)
        num_ids = ids_N.numel()
        rows_N = torch.repeat_interleave(self.rows_F, counts_F, output_size=num_ids)
        if num_ids and bool(((ids_N < 0) | (ids_N >= rows_N)).any()):
            bad = int(torch.nonzero((ids_N < 0) | (ids_N >= rows_N))[0, 0])
            raise IndexError(f"ids outside [0, {int(rows_N[bad])})")
        shift_N = torch.repeat_interleave(self.row_base_F, counts_F, output_size=num_ids)
        pooled = self.group(ids_N + shift_N, features.offsets(), features.weights_or_none())
        return pooled.view(self.row_base_F.numel(), features.stride(), -1).transpose(0, 1)


class CompactEmbeddingBagCollection(nn.Module):
    """A drop-in for TorchRec's EmbeddingBagCollection over pruned artifact tables (inference only).

    Args:
        tables: the LOGICAL table configs (name, num_embeddings, embedding_dim D, feature_names,
            pooling), in model order.
        bags: table name → its lookup module (`CompactEmbeddingBag` or `DenseEmbeddingBag`).

    forward(KJT) → KeyedTensor keyed by feature name ([B, D] each), like the training module.
    """

    def __init__(self, tables: list[EmbeddingBagConfig], bags: dict[str, nn.Module]) -> None:
        super().__init__()
        missing = [c.name for c in tables if c.name not in bags]
        if missing:
            raise ValueError(f"no lookup module for tables {missing}")
        self._configs = list(tables)
        self.embedding_bags = nn.ModuleDict({c.name: bags[c.name] for c in tables})
        self._feature_names = [name for c in tables for name in c.feature_names]
        self._dims = [c.embedding_dim for c in tables for _ in c.feature_names]
        self._grouped = _Grouped.of([self.embedding_bags[c.name] for c in tables for _ in c.feature_names])
        # The models build their first-order EBC on `ebc.device`: meta until the artifact's linear
        # weights replace it, so no full-size throwaway table is allocated (see serving_model.py).
        self.device = torch.device("cpu")

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._configs

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if self._grouped is not None and features.keys() == self._feature_names:
            pooled_BFD = self._grouped.pool(features)
            return KeyedTensor(
                keys=self._feature_names,
                length_per_key=self._dims,
                values=pooled_BFD.reshape(features.stride(), -1),
            )
        feature_dict = features.to_dict()
        pooled = []
        for config in self._configs:
            bag = self.embedding_bags[config.name]
            for name in config.feature_names:
                jt = feature_dict[name]
                pooled.append(bag(jt.values(), jt.offsets(), jt.weights_or_none()))
        return KeyedTensor(
            keys=self._feature_names,
            length_per_key=self._dims,
            values=torch.cat(pooled, dim=1) if pooled else torch.zeros(0, 0),
        )


class LinearWeights(nn.Module):
    """The FM family's first-order weights w_f[id], read from [R] vectors: a stand-in for the
    models' `linear_ebc` (whose width-4 tables use only column 0). Output: KeyedTensor of [B, 1]."""

    def __init__(self, tables: list[EmbeddingBagConfig], weights: dict[str, Tensor]) -> None:
        super().__init__()
        self._configs = list(tables)
        for c in tables:
            if tuple(weights[c.name].shape) != (c.num_embeddings,):
                raise ValueError(f"linear weights of {c.name!r}: shape {tuple(weights[c.name].shape)}")
        poolings = {c.name: "mean" if c.pooling == PoolingType.MEAN else "sum" for c in tables}
        columns = {c.name: weights[c.name].float().unsqueeze(1) for c in tables}
        grouped = group_tables(columns, poolings)
        self.bags = nn.ModuleDict(
            grouped
            if grouped is not None
            else {c.name: DenseEmbeddingBag(columns[c.name], pooling=poolings[c.name]) for c in tables}
        )
        self._feature_names = [name for c in tables for name in c.feature_names]
        self._grouped = _Grouped.of([self.bags[c.name] for c in tables for _ in c.feature_names])

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if self._grouped is not None and features.keys() == self._feature_names:
            pooled_BF = self._grouped.pool(features).squeeze(2)
            return KeyedTensor(
                keys=self._feature_names, length_per_key=[1] * pooled_BF.shape[1], values=pooled_BF
            )
        feature_dict = features.to_dict()
        pooled = [
            self.bags[c.name](
                feature_dict[n].values(), feature_dict[n].offsets(), feature_dict[n].weights_or_none()
            )
            for c in self._configs
            for n in c.feature_names
        ]
        return KeyedTensor(
            keys=self._feature_names, length_per_key=[1] * len(pooled), values=torch.cat(pooled, 1)
        )
