"""Logits, predictions and classification metrics on one split.

One pass of a model over a split (``logits_and_targets``) gives its logits; accuracy, F1, calibration and
per-class accuracy all follow from them, so a model is never run twice over the same data.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.functional.classification import (
    multiclass_calibration_error,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

# the protocol of Guo et al. 2017 ("On Calibration of Modern Neural Networks"): fixed rather
# than configurable, so an ECE compares across runs, sweeps and published tables
CALIBRATION_BINS = 15
CALIBRATION_NORM = "l1"


@torch.no_grad()
def logits_and_targets(
    model: nn.Module, batches: Iterable, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Float logits and targets for every sample of ``batches``, in order, on the CPU.

    Only ``model(x)`` is called, so int8 models and wrappers of other runtimes work alike; the
    model runs in eval mode and its mode is restored afterwards."""
    was_training = model.training
    model.eval()
    logits, targets = [], []
    try:
        for batch in batches:
            x, y = batch[0], batch[1]
            logits.append(model(x.to(device)).float().cpu())
            targets.append(y.cpu())
    finally:
        model.train(was_training)
    return torch.cat(logits), torch.cat(targets)


def predict(model: nn.Module, batches: Iterable, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Predicted classes and targets for every sample of ``batches``, in order, on the CPU."""
    logits, targets = logits_and_targets(model, batches, device)
    return logits.argmax(dim=1), targets


def classification_metrics(preds: Tensor, targets: Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy over samples; F1, precision and recall as unweighted means over classes."""
    args = (preds, targets, num_classes)
    return {
        "acc": round(float((preds == targets).double().mean()), 6),
        "f1": round(float(multiclass_f1_score(*args, average="macro")), 6),
        "precision": round(float(multiclass_precision(*args, average="macro")), 6),
        "recall": round(float(multiclass_recall(*args, average="macro")), 6),
    }


def calibration(logits: Tensor, targets: Tensor, num_classes: int) -> dict[str, float | None]:
    """Expected calibration error and negative log-likelihood of ``logits``.

    ``ece``: the l1 gap between top-1 confidence and accuracy over ``CALIBRATION_BINS`` equal-width
    confidence bins, weighted by the share of samples in each (a fraction); ``nll``: the mean
    cross-entropy in nats. Both are None when a logit is not finite: a broken model still gets a
    record, and its accuracy says the rest."""
    if not bool(torch.isfinite(logits).all()):
        return {"ece": None, "nll": None}
    probabilities = logits.double().softmax(dim=1)
    ece = multiclass_calibration_error(
        probabilities, targets, num_classes, n_bins=CALIBRATION_BINS, norm=CALIBRATION_NORM
    )
    nll = F.cross_entropy(logits.double(), targets.long())
    return {"ece": round(float(ece), 6), "nll": round(float(nll), 6)}


def per_class_accuracy(preds: Tensor, targets: Tensor, num_classes: int) -> list[float | None]:
    """Accuracy on the samples of each class (recall), indexed by class; None for a class the
    split does not hold."""
    counts = torch.bincount(targets.long(), minlength=num_classes)
    correct = torch.bincount(targets[preds == targets].long(), minlength=num_classes)
    return [round(float(c) / int(n), 6) if n else None for c, n in zip(correct.tolist(), counts.tolist())]


def largest_drop(acc: list[float | None], reference: list[float | None]) -> dict[str, int | float]:
    """The class on which ``acc`` falls furthest below ``reference`` (both per-class accuracies of
    one split) and by how much: ``{"class": k, "drop": reference[k] - acc[k]}``, positive when
    worse. A mean accuracy can hide a class a model has lost; this names it. The lowest class
    wins a tie; the drop is negative when the model is better on every class."""
    drops = [
        (round(ref - own, 6), k)
        for k, (own, ref) in enumerate(zip(acc, reference, strict=True))
        if own is not None and ref is not None
    ]
    if not drops:
        raise ValueError("largest_drop needs a class that both per-class accuracies hold")
    drop, k = max(drops, key=lambda pair: (pair[0], -pair[1]))
    return {"class": k, "drop": drop}


def agreement(preds_a: Tensor, preds_b: Tensor) -> float:
    """Share of samples on which two models predict the same class."""
    return round(float((preds_a == preds_b).double().mean()), 6)
