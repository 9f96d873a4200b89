"""Hinton knowledge distillation (Hinton, Vinyals & Dean 2015), ``distill=kd``:

    loss = (1 − λ)·CE(y, s) + λ·T²·KL(softmax(t/T) ‖ softmax(s/T))

with λ = ``lam`` in [0, 1] and T = ``temperature`` > 0. λ = 0 is plain cross-entropy, λ = 1 pure
distillation from the teacher's soft targets; the T² keeps the soft-target gradients on the
same scale as the hard-target ones when T changes. The feature methods add their own terms to
these two (``base.FeatureMethod``).
"""

from __future__ import annotations

from typing import Annotated

import torch.nn.functional as F
from torch import Tensor, nn

from distillab.distill.labels import labelled_cross_entropy
from distillab.settings import Range, Temperature, checked

#: λ of the Hinton loss
Lam = Annotated[float, Range(0, 1, what="a weight", note="0 = cross-entropy only, 1 = soft targets only")]


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(softmax(t/T) ‖ softmax(s/T)), summed over classes, mean over the batch."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    per_sample = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    return per_sample.mean()


def kd_terms(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, lam: float, temperature: float
) -> dict[str, Tensor]:
    """The weighted terms ``ce`` = (1 − λ)·CE(y, s) and ``kd`` = λ·T²·KL(softmax(t/T) ‖ softmax(s/T)).

    A term whose weight is zero is not computed (so λ = 1 needs no labels). CE averages over
    the labelled samples only (targets ``UNLABELLED`` have none), KL over all of them.
    """
    zero = student_logits.new_zeros(())
    ce = (1.0 - lam) * labelled_cross_entropy(student_logits, targets) if lam < 1 else zero
    kd = lam * temperature**2 * soft_kl(student_logits, teacher_logits.detach(), temperature) if lam > 0 else zero
    return {"ce": ce, "kd": kd}


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, lam: float, temperature: float) -> Tensor:
    """(1 − λ)·CE(y, s) + λ·T²·KL(softmax(t/T) ‖ softmax(s/T)), mean over the batch."""
    terms = kd_terms(student_logits, teacher_logits, targets, lam, temperature)
    return terms["ce"] + terms["kd"]


@checked
class KD(nn.Module):
    """Hinton KD with weight λ = ``lam`` and temperature T = ``temperature``; logs ``ce`` and ``kd``."""

    def __init__(self, lam: Lam, temperature: Temperature) -> None:
        super().__init__()
        self.lam, self.temperature = float(lam), float(temperature)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
        terms = kd_terms(student_logits, teacher_logits, targets, self.lam, self.temperature)
        terms["loss"] = terms["ce"] + terms["kd"]
        return terms

    def extra_repr(self) -> str:
        return f"lam={self.lam}, temperature={self.temperature}"
