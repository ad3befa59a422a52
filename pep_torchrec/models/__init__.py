"""The PEP paper's base CTR models (FM, DeepFM, AutoInt) plus DLRM, over a TorchRec embedding module.

Every model takes its embedding module from outside (`ebc`), so a later stage can swap in the PEP
embedding module; see `CTRModel` for the contract. Build one with `build_model`, wrap it in
`TrainModel` for training.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from pep_torchrec.models.autoint import AutoInt, InteractingLayer
from pep_torchrec.models.base import (
    LINEAR_TABLE_DIM,
    LINEAR_TABLE_PREFIX,
    CTRModel,
    embedding_tables,
    fm_interaction,
    linear_tables,
)
from pep_torchrec.models.dlrm import DLRMModel
from pep_torchrec.models.fm import FM, DeepFM
from pep_torchrec.models.train_model import TrainModel

MODELS: dict[str, type[CTRModel]] = {"fm": FM, "deepfm": DeepFM, "autoint": AutoInt, "dlrm": DLRMModel}


def _model_class(name: str) -> type[CTRModel]:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name]


def model_options(name: str) -> dict[str, Any]:
    """The options `build_model(name, ...)` accepts, with their defaults.

    Args:
        name: "fm", "deepfm", "autoint" or "dlrm".

    Returns:
        option name → default, in signature order (the model class's keyword-only arguments).
    """
    params = inspect.signature(_model_class(name).__init__).parameters
    return {
        param.name: param.default
        for param in params.values()
        if param.kind is inspect.Parameter.KEYWORD_ONLY and param.name not in ("ebc", "num_dense")
    }


def build_model(name: str, *, ebc: nn.Module, num_dense: int, **options: Any) -> CTRModel:
    """Build a CTR model reading its embeddings from `ebc`.

    Args:
        name: "fm", "deepfm", "autoint" or "dlrm".
        ebc: the embedding module (EmbeddingBagCollection or a drop-in replacement); all fields share
            one output dim. May be on the meta device; dense layers use the current default device.
        num_dense: width of the batch's dense features (0 when the dataset has none).
        **options: model hyper-parameters; see `model_options(name)` for names and defaults.

    Returns:
        The model; forward(dense [B, N], KJT) → logits [B].

    Raises:
        ValueError: unknown model name, unknown option (named), or a bad option value (named).
    """
    cls = _model_class(name)
    valid = model_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for model {name!r}; valid options: {sorted(valid)}")
    return cls(ebc=ebc, num_dense=num_dense, **options)


__all__ = [
    "LINEAR_TABLE_DIM",
    "LINEAR_TABLE_PREFIX",
    "MODELS",
    "AutoInt",
    "CTRModel",
    "DLRMModel",
    "DeepFM",
    "FM",
    "InteractingLayer",
    "TrainModel",
    "build_model",
    "embedding_tables",
    "fm_interaction",
    "linear_tables",
    "model_options",
]
