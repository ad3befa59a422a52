"""Kernels of PEP: thresholding + pooling of gathered embedding rows.

`threshold_pool` is the single entry point the embedding modules (unsharded and sharded) call; the
pure-PyTorch reference in `threshold_pool.py` is its specification; `library.py` registers the
fused op (`pep_torchrec::threshold_pool`, CPU C++ / CUDA Triton / fake).
"""

from pep_torchrec.ops.threshold_pool import (
    ROW_S_COLUMNS,
    ThresholdMode,
    margins,
    row_width,
    s_columns,
    threshold,
    threshold_pool,
    threshold_pool_reference,
)

__all__ = [
    "ROW_S_COLUMNS",
    "ThresholdMode",
    "margins",
    "row_width",
    "s_columns",
    "threshold",
    "threshold_pool",
    "threshold_pool_reference",
]
