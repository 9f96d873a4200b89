"""Predictions and classification metrics on one split."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torchmetrics.functional.classification import (
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Predicted classes and targets for every sample of ``batches``, in order, on the CPU."""
    was_training = model.training
    model.eval()
    preds, targets = [], []
    try:
        for batch in batches:
            x, y = batch[0], batch[1]
            preds.append(model(x.to(device)).argmax(dim=1).cpu())
            targets.append(y.cpu())
    finally:
        model.train(was_training)
    return torch.cat(preds), torch.cat(targets)


def classification_metrics(preds: Tensor, targets: Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy over samples; F1, precision and recall as unweighted means over classes."""
    args = (preds, targets, num_classes)
    return {
        "acc": round(float((preds == targets).double().mean()), 6),
        "f1": round(float(multiclass_f1_score(*args, average="macro")), 6),
        "precision": round(float(multiclass_precision(*args, average="macro")), 6),
        "recall": round(float(multiclass_recall(*args, average="macro")), 6),
    }


def agreement(preds_a: Tensor, preds_b: Tensor) -> float:
    """Share of samples on which two models predict the same class."""
    return round(float((preds_a == preds_b).double().mean()), 6)
