"""The fused CPU kernels of `threshold_pool`: build-at-first-use, ctypes launchers.

Legend: N = gathered rows, B = bags, D = embedding dim, W = stored row width.

`csrc/threshold_pool_cpu.cpp` has no torch headers, so it compiles in about a second with the
system C++ compiler (`g++ -O3 -march=native -fopenmp`); the shared object is cached in
`$PEP_TORCHREC_CACHE` (default `~/.cache/pep_torchrec`) under a key made of the source hash, the
compiler and the host CPU, so later processes only `dlopen` it. Why not `torch.utils.cpp_extension`:
the same kernel built through it took 35-90 s on the 2-core CI machine (the torch headers), which a
fresh checkout's test run would pay; the kernels do not need torch's dispatcher on their side,
because `library.py` registers them as the CPU implementation of the `torch.library` op.

`group_forward` / `group_backward` (bottom) run every feature of a sharded TBE group in one call each way,
reading the TBE output and writing its gradient in place of per-feature slices (the sharded lookup
uses it on CPU; per-call Python / dispatch overhead × features was the fused op's main cost at one
id per bag). Compile flags: `-fno-trapping-math` lets GCC if-convert the branch-free clamps and
selects of the threshold / exp code, which is what vectorises the loops over d (without it the
ROW_DIM kernel ran ~10x slower, scalar); no `-ffast-math` (results stay IEEE, close to the reference).

If the build or load fails (no compiler, read-only cache, ...), `load()` returns None after one
warning and `library.py` falls back to the pure-PyTorch reference.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import Tensor

from pep_torchrec.utils.native import NativeLibrary

SOURCE = Path(__file__).with_name("csrc") / "threshold_pool_cpu.cpp"
_ABI_VERSION = 5
_FLAGS = [
    "-O3",
    "-march=native",
    "-fopenmp",
    "-fno-trapping-math",
    "-fno-math-errno",
    "-shared",
    "-fPIC",
    "-std=c++17",
]

_i64, _int, _dbl, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_double, ctypes.c_void_p
_FWD_ARGS = [_ptr, _i64, _ptr, _i64, _i64, _int, _dbl, _ptr, _ptr, _int, _ptr, _int]
_BWD_ARGS = [
    _ptr,
    _ptr,
    _i64,
    _ptr,
    _i64,
    _i64,
    _i64,
    _int,
    _dbl,
    _ptr,
    _ptr,
    _int,
    _dbl,
    _dbl,
    _ptr,
    _ptr,
    _ptr,
    _int,
]
_GROUP_FWD_ARGS = [_ptr, _i64, _i64, _i64, _ptr, _i64, _i64, _int, _dbl, _ptr, _int, _ptr, _int]
_GROUP_BWD_ARGS = [
    _ptr,
    _ptr,
    _i64,
    _i64,
    _i64,
    _i64,
    _ptr,
    _i64,
    _i64,
    _int,
    _dbl,
    _ptr,
    _int,
    _dbl,
    _dbl,
    _ptr,
    _i64,
    _int,
]
_S_GATHER_ARGS = [_ptr, _i64, _i64, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _int]
_UNIQUE_ROWS_ARGS = [_ptr, _i64, _i64, _i64, _ptr, _ptr, _i64, _ptr, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr]
_S_UPDATE_ARGS = [_ptr, _i64, _ptr, _ptr, _i64, _ptr, _i64, _i64, _ptr, _dbl, _int]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def _configure(lib: ctypes.CDLL) -> None:
    for suffix in _SUFFIX.values():
        getattr(lib, f"pep_threshold_pool_fwd_{suffix}").argtypes = _FWD_ARGS
        getattr(lib, f"pep_threshold_pool_bwd_{suffix}").argtypes = _BWD_ARGS
        getattr(lib, f"pep_threshold_pool_group_fwd_{suffix}").argtypes = _GROUP_FWD_ARGS
        getattr(lib, f"pep_threshold_pool_group_bwd_{suffix}").argtypes = _GROUP_BWD_ARGS
        getattr(lib, f"pep_s_update_{suffix}").argtypes = _S_UPDATE_ARGS
        getattr(lib, f"pep_s_gather_{suffix}").argtypes = _S_GATHER_ARGS
    lib.pep_unique_rows.argtypes = _UNIQUE_ROWS_ARGS
    lib.pep_unique_rows.restype = _i64


_NATIVE = NativeLibrary(
    SOURCE,
    _FLAGS,
    abi_symbol="pep_abi_version",
    abi_version=_ABI_VERSION,
    configure=_configure,
    what="fused CPU threshold_pool kernel",
    fallback="the (slower) pure-PyTorch reference",
)


def load() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use), or None (after one warning) if they cannot be built."""
    return _NATIVE.load()


def available() -> bool:
    return load() is not None


def _p(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _rows_stride(rows: Tensor) -> int:
    # Columns must be unit-stride; rows may be a column slice of a wider buffer (any row stride).
    assert rows.stride(1) == 1 or rows.shape[1] <= 1, "rows must have unit column stride"
    return rows.stride(0) if rows.shape[0] > 1 else rows.shape[1]


def forward(
    rows: Tensor,
    offsets: Tensor,
    coarse_s: Tensor | None,
    per_sample_weights: Tensor | None,
    dim: int,
    mode: int,
    gk: float,
    mean: bool,
) -> Tensor:
    """pooled [B, D] (rows' dtype, float32 or float64); all inputs prepared by `library.py`:
    offsets int64 contiguous, coarse_s [D] and per_sample_weights [N] contiguous in rows' dtype."""
    lib = load()
    assert lib is not None
    num_bags = offsets.numel() - 1
    out = torch.empty(num_bags, dim, dtype=rows.dtype)
    if num_bags > 0:
        getattr(lib, f"pep_threshold_pool_fwd_{_SUFFIX[rows.dtype]}")(
            rows.data_ptr(), _rows_stride(rows), offsets.data_ptr(), num_bags, dim, mode, gk,
            _p(coarse_s), _p(per_sample_weights), int(mean), out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
    return out


def backward(
    grad_pooled: Tensor,
    rows: Tensor,
    offsets: Tensor,
    coarse_s: Tensor | None,
    per_sample_weights: Tensor | None,
    dim: int,
    mode: int,
    gk: float,
    mean: bool,
    s_decay: float,
    s_push: float,
    need_rows: bool,
    need_coarse: bool,
    need_weights: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(grad rows [N, W], grad coarse_s [D] without the pressure term, grad weights [N]), each
    None unless asked for; all in rows' dtype. grad_pooled: [B, D] contiguous, rows' dtype."""
    lib = load()
    assert lib is not None
    num_rows, width = rows.shape
    num_bags = offsets.numel() - 1
    grad_rows = torch.empty(num_rows, width, dtype=rows.dtype) if need_rows else None
    grad_coarse = torch.zeros(dim, dtype=rows.dtype) if need_coarse else None
    grad_psw = torch.empty(num_rows, dtype=rows.dtype) if need_weights else None
    if num_bags > 0:
        getattr(lib, f"pep_threshold_pool_bwd_{_SUFFIX[rows.dtype]}")(
            grad_pooled.data_ptr(), rows.data_ptr(), _rows_stride(rows), offsets.data_ptr(), num_bags, dim,
            width, mode, gk, _p(coarse_s), _p(per_sample_weights), int(mean), s_decay, s_push,
            _p(grad_rows), _p(grad_coarse), _p(grad_psw), torch.get_num_threads(),
        )  # fmt: skip
    return grad_rows, grad_coarse, grad_psw


# ---- grouped: all features of one TBE group in one call ----------------------------------------
# Legend: F = features of the group, B = bags per feature, N_max = rows of the TBE output (feature
# f's N_f ids in rows [0, N_f)), W = stored row width (the same for every feature of the group).
# `library.GroupedThresholdPool` is the autograd.Function over these (and over the Triton launchers).


def group_forward(rows_all: Tensor, offsets: Tensor, psw: Tensor | None, num_features: int, dim: int,
                  mode: int, gk: float, mean: bool) -> Tensor:  # fmt: skip
    """pooled [B, F·D] of rows_all [N_max, F·W] (float32/64, unit column stride), offsets [F·B + 1]
    int64 (a KJT's), psw [sum N_f] (the KJT's weights, rows' dtype) or None."""
    lib = load()
    assert lib is not None and rows_all.dtype in _SUFFIX and rows_all.stride(1) == 1
    width = rows_all.shape[1] // num_features if num_features else 0
    num_bags = (offsets.numel() - 1) // num_features if num_features else 0
    out = torch.empty(num_bags, num_features * dim, dtype=rows_all.dtype)
    if num_bags > 0 and num_features > 0:
        getattr(lib, f"pep_threshold_pool_group_fwd_{_SUFFIX[rows_all.dtype]}")(
            rows_all.data_ptr(), rows_all.stride(0), num_features, width, offsets.data_ptr(), num_bags,
            dim, mode, gk, _p(psw), int(mean), out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
    else:
        out.zero_()
    return out


def group_backward(grad_out: Tensor, rows_all: Tensor, offsets: Tensor, psw: Tensor | None,
                   num_features: int, dim: int, mode: int, gk: float, mean: bool, s_decay: float,
                   s_push: float) -> Tensor:  # fmt: skip
    """grad rows_all [N_max, F·W] (rows past N_f: zero); grad_out [B, F·D] contiguous, rows' dtype."""
    lib = load()
    assert lib is not None
    width = rows_all.shape[1] // num_features if num_features else 0
    num_bags = (offsets.numel() - 1) // num_features if num_features else 0
    grad_rows = torch.empty(rows_all.shape, dtype=rows_all.dtype)
    if num_bags > 0 and num_features > 0:
        getattr(lib, f"pep_threshold_pool_group_bwd_{_SUFFIX[rows_all.dtype]}")(
            grad_out.data_ptr(), rows_all.data_ptr(), rows_all.stride(0), rows_all.shape[0], num_features,
            width, offsets.data_ptr(), num_bags, dim, mode, gk, _p(psw), int(mean), s_decay, s_push,
            grad_rows.data_ptr(), grad_rows.stride(0), torch.get_num_threads(),
        )  # fmt: skip
    else:
        grad_rows.zero_()
    return grad_rows


def unique_rows(
    values: Tensor,
    num_features: int,
    lengths: Tensor | None,
    feature_base: Tensor,
    num_rows: int,
    base_sorted: Tensor,
    base_table: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The storage rows a batch looks up (`s_optimizer.plan_step`): occurrence k's row is
    values[j] + feature_base[f], in (n, f) order when `lengths` is None (values [F·n_max]
    feature-major), else in (f, n < lengths[f]) order (j = k). Returns (ids, inverse, table_of_id,
    slots, seg): exactly torch.unique(rows, return_inverse=True) and the table of each unique row (the
    last of `base_sorted` ≤ it, mapped through `base_table`), plus the occurrences grouped by row
    (`slots`: n·F + f, row u's at slots[seg[u]:seg[u + 1]], in occurrence order) for `s_gather`. All
    int64; one radix sort over the ids (no pass over the num_rows table rows)."""
    lib = load()
    assert lib is not None
    values = values.to(torch.int64).contiguous()
    n = values.numel()
    n_max = n // num_features if lengths is None and num_features else 0
    lengths = None if lengths is None else lengths.to(torch.int64).contiguous()
    feature_base = feature_base.to(torch.int64).contiguous()
    base_sorted, base_table = base_sorted.contiguous(), base_table.contiguous()
    ids, inverse, table_of_id, slots = (torch.empty(n, dtype=torch.int64) for _ in range(4))
    seg = torch.empty(n + 1, dtype=torch.int64)
    num_unique = lib.pep_unique_rows(
        values.data_ptr(), n, num_features, n_max, _p(lengths), feature_base.data_ptr(), num_rows,
        base_sorted.data_ptr(), base_table.data_ptr(), base_sorted.numel(), ids.data_ptr(),
        inverse.data_ptr(), table_of_id.data_ptr(), slots.data_ptr(), seg.data_ptr(),
    )  # fmt: skip
    if num_unique < 0:
        raise IndexError(f"unique_rows: a looked-up row is outside the storage's {num_rows} rows")
    return ids[:num_unique], inverse, table_of_id[:num_unique], slots, seg[: num_unique + 1]


def s_gather(
    grad: Tensor,
    num_features: int,
    width: int,
    s_off: int,
    s_width: int,
    slots: Tensor,
    seg: Tensor,
    lengths: Tensor | None,
) -> Tensor:
    """g [U, s_width]: the s columns of grad [N_max, F·W] (unit column stride) summed per unique row
    u over its occurrences slots[seg[u]:seg[u + 1]] (`unique_rows`) in that order, exactly as
    index_add_ sums them in occurrence order; those columns of grad are zeroed in place, and so are
    the padding rows' (n ≥ lengths[f])."""
    lib = load()
    assert lib is not None and grad.dtype in _SUFFIX and grad.stride(1) == 1
    assert slots.dtype == seg.dtype == torch.int64 and (lengths is None or lengths.dtype == torch.int64)
    slots, seg = slots.contiguous(), seg.contiguous()
    lengths = None if lengths is None else lengths.contiguous()
    num_unique = seg.numel() - 1
    g = torch.empty(num_unique, s_width, dtype=grad.dtype)
    getattr(lib, f"pep_s_gather_{_SUFFIX[grad.dtype]}")(
        grad.data_ptr(), grad.stride(0), grad.shape[0], num_features, width, s_off, s_width,
        slots.data_ptr(), seg.data_ptr(), _p(lengths), g.data_ptr(), num_unique, torch.get_num_threads(),
    )  # fmt: skip
    return g


def s_update(
    storage: Tensor, ids: Tensor, table_of_id: Tensor, grad: Tensor, s_off: int, scale: Tensor, gk: float
) -> None:
    """The own s optimizer's in-place step on CPU, rounded like its PyTorch path
    (`SOptimizerState.update`): storage [R, W] (unit column stride) rows `ids` (unique, int64),
    columns [s_off, s_off + S) -= grad / gk · scale[table_of_id]; grad [U, S] in storage's dtype,
    scale [tables] float64."""
    lib = load()
    assert (
        lib is not None
        and storage.dtype in _SUFFIX
        and storage.stride(1) == 1
        and grad.dtype == storage.dtype
    )
    assert scale.dtype == torch.float64
    ids, table_of_id, grad, scale = (
        ids.contiguous(),
        table_of_id.contiguous(),
        grad.contiguous(),
        scale.contiguous(),
    )
    getattr(lib, f"pep_s_update_{_SUFFIX[storage.dtype]}")(
        storage.data_ptr(), storage.stride(0), ids.data_ptr(), table_of_id.data_ptr(), ids.numel(),
        grad.data_ptr(), grad.shape[1], s_off, scale.data_ptr(), gk, torch.get_num_threads(),
    )  # fmt: skip
