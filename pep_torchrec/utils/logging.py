"""Logging set-up shared by the command-line entry points."""

from __future__ import annotations

import logging
import warnings


def setup_logging(level: int = logging.WARNING) -> None:
    """Our messages at `level`; TorchRec's planner advice and deprecation chatter only when it is an error."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("torchrec", "fbgemm_gpu", "torch.distributed.checkpoint", "torch.fx._symbolic_trace"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for module in ("torchrec", "fbgemm_gpu", "torch.distributed"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
