"""Hinton knowledge distillation (Hinton, Vinyals & Dean 2015), ``distill=kd``:

    loss = (1 − λ)·CE(y, s) + λ·T²·KL(softmax(t/T) ‖ softmax(s/T))

with λ = ``lam`` in [0, 1] and T = ``temperature`` > 0. λ = 0 is plain cross-entropy, λ = 1 pure
distillation from the teacher's soft targets; the T² keeps the soft-target gradients on the
same scale as the hard-target ones when T changes. The feature methods add their own terms to
these two (``base.FeatureMethod``).

``standardize`` (Sun et al., CVPR 2024, "Logit Standardization in Knowledge Distillation"):
the student's and the teacher's logits are each z-scored per sample over the classes,
(z − mean_c z)/(std_c z + 1e-7) with the sample standard deviation (C − 1 in the denominator),
before the softmax at T of the KD term; the cross-entropy stays on the raw logits and T² is kept.
"""

from __future__ import annotations

from typing import Annotated

import torch.nn.functional as F
from torch import Tensor, nn

from distillab.distill.labels import labelled_cross_entropy
from distillab.settings import Range, Temperature, checked

#: λ of the Hinton loss
Lam = Annotated[float, Range(0, 1, what="a weight", note="0 = cross-entropy only, 1 = soft targets only")]


#: added to the standard deviation of a sample's logits when they are standardised
STANDARDIZE_EPS = 1e-7


def standardize_logits(logits: Tensor, eps: float = STANDARDIZE_EPS) -> Tensor:
    """Each row z-scored over the classes: (z − mean_c z)/(std_c z + eps), std the sample standard
    deviation (divided by C − 1), as in the code of Sun et al. (CVPR 2024). The result does not
    change when a constant is added to a row or the row is scaled by a positive factor."""
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True)
    return (logits - mean) / (std + eps)


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float, weight: float = 1.0) -> Tensor:
    """``weight``·KL(softmax(t/T) ‖ softmax(s/T)), summed over classes, mean over the batch.

    One log-softmax per side (none of the teacher's is recorded for backward) and torch's fused
    ``kl_div`` on the two log-probabilities, summed, then scaled once by ``weight``/N: a KD step
    costs a few kernels more than a cross-entropy step (``benchmarks/cached_teacher.py``).
    """
    log_p_student = F.log_softmax(student_logits if temperature == 1 else student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    total = F.kl_div(log_p_student, log_p_teacher, reduction="sum", log_target=True)
    return total * (weight / student_logits.shape[0])


def kd_terms(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    lam: float,
    temperature: float,
    *,
    standardize: bool = False,
) -> dict[str, Tensor]:
    """The weighted terms ``ce`` = (1 − λ)·CE(y, s) and ``kd`` = λ·T²·KL(softmax(t/T) ‖ softmax(s/T)).

    A term whose weight is zero is not computed (so λ = 1 needs no labels). CE averages over
    the labelled samples only (targets ``UNLABELLED`` have none), KL over all of them. Each
    weight is applied in the one scaling that makes a sum a mean.
    ``standardize``: s and t are replaced by ``standardize_logits`` of each in the KL term only.
    """
    if lam < 1:
        ce = labelled_cross_entropy(student_logits, targets, weight=1.0 - lam)
    else:
        ce = student_logits.new_zeros(())
    if lam > 0:
        student, teacher = student_logits, teacher_logits.detach()
        if standardize:
            student, teacher = standardize_logits(student), standardize_logits(teacher)
        kd = soft_kl(student, teacher, temperature, weight=lam * temperature**2)
    else:
        kd = student_logits.new_zeros(())
    return {"ce": ce, "kd": kd}


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    lam: float,
    temperature: float,
    *,
    standardize: bool = False,
) -> Tensor:
    """(1 − λ)·CE(y, s) + λ·T²·KL(softmax(t/T) ‖ softmax(s/T)), mean over the batch (``kd_terms``)."""
    terms = kd_terms(student_logits, teacher_logits, targets, lam, temperature, standardize=standardize)
    return terms["ce"] + terms["kd"]


@checked
class KD(nn.Module):
    """Hinton KD with weight λ = ``lam`` and temperature T = ``temperature``; logs ``ce`` and ``kd``.
    ``standardize``: z-score each sample's student and teacher logits before the KD term (Sun et
    al., CVPR 2024; ``standardize_logits``)."""

    def __init__(self, lam: Lam, temperature: Temperature, standardize: bool) -> None:
        super().__init__()
        self.lam, self.temperature, self.standardize = float(lam), float(temperature), bool(standardize)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
        terms = kd_terms(
            student_logits, teacher_logits, targets, self.lam, self.temperature, standardize=self.standardize
        )
        terms["loss"] = terms["ce"] + terms["kd"]
        return terms

    def extra_repr(self) -> str:
        return f"lam={self.lam}, temperature={self.temperature}, standardize={self.standardize}"
