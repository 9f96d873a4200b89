"""Training with labels for part of the training set only (``data.labelled_fraction``).

The classic use of distillation is a student that has few labels but plenty of inputs: the
teacher's soft targets teach it on every sample, the labels only where there are some. A
training sample without a label carries the target ``UNLABELLED``; cross-entropy terms then
average over the labelled samples of a batch (``labelled_cross_entropy``) while soft-target
terms cover all of them. Validation and test samples always keep their labels.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

#: the target of a training sample whose label the student may not see
UNLABELLED = -1

# torch's NLL kernel, which returns the sum and the count of the targets it did not ignore, and
# its reduction code for a sum (the ``reduction="sum"`` of torch.nn.functional)
_NLL_FORWARD = torch.ops.aten.nll_loss_forward.default
_SUM = 2


def labelled_cross_entropy(logits: Tensor, targets: Tensor, weight: float = 1.0) -> Tensor:
    """Mean cross-entropy over the samples whose target is not ``UNLABELLED``, times ``weight``.

    A batch without any labelled sample gives exactly 0 with a (zero) gradient path to the
    logits, never NaN, so a step on such a batch is still a valid step of the other terms
    (``labelled_nll`` of the log-softmax of ``logits``, N×C).
    """
    return labelled_nll(logits.log_softmax(dim=1), targets, weight)


def labelled_nll(log_probs: Tensor, targets: Tensor, weight: float = 1.0) -> Tensor:
    """``labelled_cross_entropy`` from the log-probabilities (N×C) instead of the logits, so that a
    loss that needs them for another term too computes them once.

    torch's NLL kernel returns the count of the targets it did not ignore beside their sum, so the
    mean costs one clamp (an empty count is taken as 1: the sum is then 0) and one division, into
    which ``weight`` is folded; neither the count nor the weight needs a gradient.
    """
    total, count = _NLL_FORWARD(log_probs, targets, None, _SUM, UNLABELLED)
    scale = count.clamp_min(1)
    return total / (scale if weight == 1 else scale / weight)


def labelled_subset(targets: Tensor | np.ndarray, fraction: float, seed: int) -> Tensor:
    """A boolean mask of the samples that keep their label: ``floor(fraction · N + 1/2)`` of
    the ``N`` samples (but at least one per class), stratified, drawn with ``seed`` alone.

    Each class's samples are put in a random order (``seed``); the ``r``-th of a class of
    ``n`` samples gets the priority ``(r + 1/2) / n``, its first sample the priority −1, and the
    samples of lowest priority keep their labels (ties between classes broken at random). So
    every class keeps about ``fraction`` of its samples (within one), never none, and the
    subset at a smaller fraction is contained in the subset at a larger one.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"labelled_fraction={fraction!r}: must be a fraction in (0, 1]")
    labels = np.asarray(targets)
    n = len(labels)
    if fraction >= 1:
        return torch.ones(n, dtype=torch.bool)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    priority = np.empty(n)
    for label in classes:
        members = rng.permutation(np.flatnonzero(labels == label))
        priority[members] = (np.arange(len(members)) + 0.5) / len(members)
        priority[members[0]] = -1.0
    size = max(len(classes), int(fraction * n + 0.5))
    chosen = np.lexsort((rng.random(n), priority))[:size]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.as_tensor(chosen)] = True
    return mask


def hide_labels(targets: Tensor, labelled: Tensor) -> Tensor:
    """``targets`` with ``UNLABELLED`` wherever ``labelled`` is False."""
    return torch.where(labelled, targets, torch.full_like(targets, UNLABELLED))


__all__ = ["UNLABELLED", "hide_labels", "labelled_cross_entropy", "labelled_nll", "labelled_subset"]
