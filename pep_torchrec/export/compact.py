"""Pooled lookups straight from the compact (CSR) tables: the serving model's embedding module.

Legend: R = table rows, D = embedding dim, N = looked-up ids, B = bags, E = kept elements of the
looked-up rows (Σ over the N ids of their row lengths), K = kept elements of the table.

`CompactEmbeddingBag` never rebuilds a dense [R, D] table. It keeps, per original id, one int64
`packed_R = start << 24 | (exponent + 128) << 16 | length` (start = byte offset of the row's record,
length = its kept count, 0 for a pruned row; exponent = the int8 row scale's power of two), and one
byte buffer `blob` with a record per kept row, rows back to back: [its `length` values (fp32 / fp16 /
int8) | their columns (uint8; int64 when D > 256)]. A looked-up row is one contiguous read (~16 B for
a 5%-kept fp32 row at D = 64, against a dense row's 256 B); the buffer has exactly the bytes of
separate value and column arrays.

The fused CPU kernel (`csrc/compact_pool_cpu.cpp`, the default) pools in one pass per bag: per id,
read packed_R, then add the record's values into their columns (OpenMP over bags; software
prefetch of packed_R two stages and of the record one stage ahead). It has no torch headers,
builds with the system C++ compiler in ~1 s on first use into `$PEP_TORCHREC_CACHE` (default
~/.cache/pep_torchrec) and is loaded through ctypes; if it cannot be built: one warning, then the
torch path. `PEP_TORCHREC_DISABLE_CPU_KERNEL=1` (or `use_kernel = False`) forces the torch path.

The torch path (`forward_reference`: the kernel's spec, and its fallback) works on an element-array
view of `blob` (unpacked once, on first use):

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
`embedding_bag_configs()`), so the repo's models run on it unchanged.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import Tensor, nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from pep_torchrec.export.format import CompactTable
from pep_torchrec.native import NativeLibrary

_LENGTH_BITS = 16
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
_START_SHIFT = 24
_EXPONENT_BIAS = 128
_POOLINGS = ("sum", "mean")


_KERNEL_SOURCE = Path(__file__).with_name("csrc") / "compact_pool_cpu.cpp"
_KERNEL_ABI = 7
# -ffp-contract=off: no FMA contraction of `x · w` and the add, so fp32 results equal the torch path.
_KERNEL_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
_VALUE_KINDS = {torch.float32: 0, torch.float16: 1, torch.int8: 2}


def _configure(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.pep_compact_pool.argtypes = [p, i64, p, i64, p, i64, i64, p, i32, i32, i32, p, i32, p, i32]
    lib.pep_compact_pool.restype = i64


_NATIVE = NativeLibrary(_KERNEL_SOURCE, _KERNEL_FLAGS, abi_symbol="pep_compact_abi_version", abi_version=_KERNEL_ABI,
                        configure=_configure, what="fused compact lookup kernel",
                        fallback="the (slower) pure-PyTorch path")


def load_kernel() -> ctypes.CDLL | None:
    """The fused CPU kernel (built on first use), or None (after one warning) if it cannot be built."""
    return _NATIVE.load()


def _bag_lengths(offsets_B1: Tensor, num_ids: int) -> Tensor:
    if offsets_B1.dim() != 1 or offsets_B1.numel() < 1 or int(offsets_B1[-1]) != num_ids:
        raise ValueError(f"offsets must be [B + 1] ending at N = {num_ids}, got shape {tuple(offsets_B1.shape)}")
    return offsets_B1[1:] - offsets_B1[:-1]


class CompactEmbeddingBag(nn.Module):
    """Sum/mean-pooled lookups of one pruned table stored as CSR.

    Args:
        table: the decoded compact table (values fp32 / fp16 / int8 with per-row scales).
        pooling: "sum" or "mean" (mean divides by the bag's id count, pruned ids included, as the
            training module does).

    Shapes: forward(ids [N] int, offsets [B + 1] int, per_sample_weights [N] | None) → [B, D] float32.
    """

    def __init__(self, table: CompactTable, *, pooling: str = "sum") -> None:
        super().__init__()
        if pooling not in _POOLINGS:
            raise ValueError(f"pooling must be one of {_POOLINGS}, got {pooling!r}")
        if table.embedding_dim > _LENGTH_MASK:
            raise ValueError(f"embedding_dim {table.embedding_dim} is too wide (max {_LENGTH_MASK})")
        self.num_embeddings = table.num_embeddings
        self.embedding_dim = table.embedding_dim
        self.pooling = pooling
        self.quantized = table.exponents is not None
        self.value_dtype = table.values.dtype
        self._value_bytes = table.values.element_size()
        self._col_bytes = 1 if table.embedding_dim <= 256 else 8  # uint8 columns: 1/8 of int64's traffic
        # One record per kept row, rows back to back: [values (L · value bytes) | their columns
        # (L · column bytes)]. A looked-up row is one contiguous read (~16 B for a 5%-kept fp32 row at
        # D = 64); the same bytes as separate value and column arrays.
        lengths = table.lengths
        record_bytes = lengths * (self._value_bytes + self._col_bytes)
        byte_start = torch.cumsum(record_bytes, 0) - record_bytes
        blob = torch.zeros(int(record_bytes.sum()), dtype=torch.uint8)
        value_pos, col_pos = self._positions(lengths, byte_start)
        if table.values.numel():
            blob[value_pos] = table.values.contiguous().view(torch.uint8).view(-1, self._value_bytes)
            blob[col_pos] = table.cols.to(self._col_dtype).contiguous().view(torch.uint8).view(-1, self._col_bytes)
        exponents = table.exponents.long() if table.exponents is not None else torch.zeros_like(byte_start)
        packed = torch.zeros(table.num_embeddings, dtype=torch.int64)
        packed[table.row_ids] = (byte_start << _START_SHIFT) | ((exponents + _EXPONENT_BIAS) << _LENGTH_BITS) | lengths
        self.register_buffer("packed_R", packed, persistent=False)
        self.register_buffer("blob", blob, persistent=False)
        self._elements: tuple[Tensor, Tensor, Tensor] | None = None  # the torch path's view, built on use
        self.kept_rows = table.kept_rows
        self.kept_params = table.kept_params
        # The fused kernel is used when it loads; False forces the torch path (tests, benchmarks).
        self.use_kernel = True
        self._value_kind = _VALUE_KINDS[self.value_dtype]
        self._col_kind = int(self._col_bytes == 8)
        self._quantized_flag = int(self.quantized)
        self._mean_flag = int(pooling == "mean")

    @property
    def _col_dtype(self) -> torch.dtype:
        return torch.uint8 if self._col_bytes == 1 else torch.int64

    def _positions(self, lengths_Rk: Tensor, byte_start_Rk: Tensor) -> tuple[Tensor, Tensor]:
        """Byte positions in `blob` of every kept element's value [K, value bytes] and column [K, col bytes]."""
        num_elems = int(lengths_Rk.sum())
        owner_K = torch.repeat_interleave(torch.arange(lengths_Rk.numel()), lengths_Rk, output_size=num_elems)
        local_K = torch.arange(num_elems) - (torch.cumsum(lengths_Rk, 0) - lengths_Rk).index_select(0, owner_K)
        start_K = byte_start_Rk.index_select(0, owner_K)
        value_pos = start_K + local_K * self._value_bytes
        col_pos = start_K + lengths_Rk.index_select(0, owner_K) * self._value_bytes + local_K * self._col_bytes
        return (value_pos.unsqueeze(1) + torch.arange(self._value_bytes),
                col_pos.unsqueeze(1) + torch.arange(self._col_bytes))

    def elements(self) -> tuple[Tensor, Tensor, Tensor]:
        """(packed_R with element (not byte) starts, values [K], cols [K] int64): the torch path's
        element-array view of `blob`, unpacked once on first use."""
        if self._elements is None:
            lengths_R = self.packed_R & _LENGTH_MASK
            row_ids = torch.nonzero(lengths_R).squeeze(1)
            lengths = lengths_R.index_select(0, row_ids)
            packed_rows = self.packed_R.index_select(0, row_ids)
            value_pos, col_pos = self._positions(lengths, packed_rows >> _START_SHIFT)
            values = self.blob[value_pos].contiguous().view(self.value_dtype).view(-1)
            cols = self.blob[col_pos].contiguous().view(self._col_dtype).view(-1).long()
            elem_start = torch.cumsum(lengths, 0) - lengths
            packed = self.packed_R.clone()
            packed[row_ids] = (elem_start << _START_SHIFT) | (packed_rows & ((1 << _START_SHIFT) - 1))
            self._elements = (packed, values, cols)
        return self._elements

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"kept_rows={self.kept_rows}, kept_params={self.kept_params}, values={self.value_dtype}")

    def forward(self, ids_N: Tensor, offsets_B1: Tensor, per_sample_weights: Tensor | None = None) -> Tensor:
        lib = load_kernel() if self.use_kernel else None
        if lib is None or ids_N.device.type != "cpu" or ids_N.dim() != 1 or offsets_B1.dim() != 1 \
                or offsets_B1.numel() < 1:
            return self.forward_reference(ids_N, offsets_B1, per_sample_weights)
        if ids_N.dtype != torch.int64 or not ids_N.is_contiguous():
            ids_N = ids_N.to(torch.int64).contiguous()
        if offsets_B1.dtype != torch.int64 or not offsets_B1.is_contiguous():
            offsets_B1 = offsets_B1.to(torch.int64).contiguous()
        if per_sample_weights is not None:
            if per_sample_weights.shape != ids_N.shape:
                raise ValueError(f"per_sample_weights: shape {tuple(per_sample_weights.shape)}, "
                                 f"expected {tuple(ids_N.shape)}")
            per_sample_weights = per_sample_weights.to(torch.float32).contiguous()
        num_bags = offsets_B1.numel() - 1
        out_BD = torch.empty(num_bags, self.embedding_dim)
        # The table's pointers are read per call (buffers may be moved / replaced, e.g. `.to()`).
        status = lib.pep_compact_pool(
            self.packed_R.data_ptr(), self.num_embeddings, ids_N.data_ptr(), ids_N.numel(), offsets_B1.data_ptr(),
            num_bags, self.embedding_dim, self.blob.data_ptr(), self._value_kind, self._col_kind, self._quantized_flag,
            per_sample_weights.data_ptr() if per_sample_weights is not None else None, self._mean_flag,
            out_BD.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if status == -2:
            raise ValueError(f"offsets must be [B + 1] non-decreasing from 0 to N = {ids_N.numel()}, "
                             f"got shape {tuple(offsets_B1.shape)}")
        if status >= 0:
            raise IndexError(f"ids outside [0, {self.num_embeddings})")
        return out_BD

    def forward_reference(self, ids_N: Tensor, offsets_B1: Tensor,
                          per_sample_weights: Tensor | None = None) -> Tensor:
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
        _bag_lengths(offsets_B1, ids_N.numel())
        if self.pooling == "mean" and per_sample_weights is not None:
            pooled = nn.functional.embedding_bag(ids_N.long(), self.weight, offsets_B1.long(), mode="sum",
                                                 per_sample_weights=per_sample_weights.float(),
                                                 include_last_offset=True)
            return pooled / (offsets_B1[1:] - offsets_B1[:-1]).clamp(min=1).unsqueeze(1)
        return nn.functional.embedding_bag(ids_N.long(), self.weight, offsets_B1.long(), mode=self.pooling,
                                           per_sample_weights=per_sample_weights, include_last_offset=True)


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
        # The models build their first-order EBC on `ebc.device`: meta until the artifact's linear
        # weights replace it, so no full-size throwaway table is allocated (see serving_model.py).
        self.device = torch.device("cpu")

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._configs

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        feature_dict = features.to_dict()
        pooled = []
        for config in self._configs:
            bag = self.embedding_bags[config.name]
            for name in config.feature_names:
                jt = feature_dict[name]
                pooled.append(bag(jt.values(), jt.offsets(), jt.weights_or_none()))
        return KeyedTensor(keys=self._feature_names, length_per_key=self._dims,
                           values=torch.cat(pooled, dim=1) if pooled else torch.zeros(0, 0))


class LinearWeights(nn.Module):
    """The FM family's first-order weights w_f[id], read from [R] vectors: a stand-in for the
    models' `linear_ebc` (whose width-4 tables use only column 0). Output: KeyedTensor of [B, 1]."""

    def __init__(self, tables: list[EmbeddingBagConfig], weights: dict[str, Tensor]) -> None:
        super().__init__()
        self._configs = list(tables)
        for c in tables:
            if tuple(weights[c.name].shape) != (c.num_embeddings,):
                raise ValueError(f"linear weights of {c.name!r}: shape {tuple(weights[c.name].shape)}")
        self.bags = nn.ModuleDict({
            c.name: DenseEmbeddingBag(weights[c.name].float().unsqueeze(1),
                                      pooling="mean" if c.pooling == PoolingType.MEAN else "sum")
            for c in tables
        })
        self._feature_names = [name for c in tables for name in c.feature_names]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        feature_dict = features.to_dict()
        pooled = [self.bags[c.name](feature_dict[n].values(), feature_dict[n].offsets(),
                                    feature_dict[n].weights_or_none())
                  for c in self._configs for n in c.feature_names]
        return KeyedTensor(keys=self._feature_names, length_per_key=[1] * len(pooled), values=torch.cat(pooled, 1))
