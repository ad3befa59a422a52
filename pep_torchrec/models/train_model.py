"""The training wrapper: Batch in, (loss, outputs) out, as TorchRec's TrainPipelineSparseDist expects.

Legend: B = examples in the batch (padding rows included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pep_torchrec.data.batch import Batch
from pep_torchrec.models.base import CTRModel


class TrainModel(nn.Module):
    """Weighted binary cross-entropy on a `CTRModel`'s logits.

    Args:
        model: the CTR model (kept as `self.model`, so parameter FQNs are `model.ebc...`).
    """

    def __init__(self, model: CTRModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, batch: Batch
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Args:
            batch: dense [B, N], KJT, labels [B], weights [B] (0 for padding rows).

        Returns:
            (loss, (loss.detach(), logits.detach() [B], labels [B], weights [B])), where loss is
            Σ w·BCE / Σ w: padding rows (w = 0) contribute nothing, and a batch of padding only
            has loss 0 (its gradient is 0 too, so every rank can still run backward).
        """
        logits_B = self.model(batch.dense_features, batch.sparse_features)
        labels_B = batch.labels.to(logits_B.dtype)
        weights_B = batch.weights.to(logits_B.dtype)
        per_example_B = F.binary_cross_entropy_with_logits(logits_B, labels_B, reduction="none")
        weight_sum = weights_B.sum()
        # torch.where rather than a Python `if`: no host sync, and traceable by the pipeline.
        denominator = torch.where(weight_sum > 0, weight_sum, torch.ones_like(weight_sum))
        loss = (per_example_B * weights_B).sum() / denominator
        return loss, (loss.detach(), logits_B.detach(), batch.labels.detach(), batch.weights.detach())
