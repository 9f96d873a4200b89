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

import torch
from torch import Tensor, nn

from distillab.labels import labelled_nll
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


def teacher_log_probs(teacher_logits: Tensor, temperature: float, *, standardize: bool = False) -> Tensor:
    """The teacher's side of the KD term: log softmax(t/T), with each row of t first replaced by
    ``standardize_logits`` of it when ``standardize``; no gradient reaches the teacher.

    Row i depends on row i of ``teacher_logits`` alone, so the rows of a whole table's result
    are the results of its rows: a fit on cached teacher outputs computes it once per table
    (``KD.prepare_teacher``), not at every step.
    """
    teacher = teacher_logits.detach()
    if standardize:
        teacher = standardize_logits(teacher)
    return log_softmax_at(teacher, temperature)


def log_softmax_at(logits: Tensor, temperature: float) -> Tensor:
    """log softmax(z/T) over the classes (dim 1); at T = 1 without a division."""
    return (logits if temperature == 1 else logits / temperature).log_softmax(dim=1)


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float, weight: float = 1.0) -> Tensor:
    """``weight``·KL(softmax(t/T) ‖ softmax(s/T)), summed over classes, mean over the batch."""
    student = log_softmax_at(student_logits, temperature)
    return weighted_kl(teacher_log_probs(teacher_logits, temperature), student, weight / student_logits.shape[0])


def weighted_kl(log_p: Tensor, log_q: Tensor, scale: float) -> Tensor:
    """``scale``·Σ_i Σ_c p_ic (log p_ic − log q_ic) for the teacher's log-probabilities ``log_p``
    (no gradient) and the student's ``log_q``, of the same shape.

    One subtraction and one dot product with the teacher's probabilities, scaled first: two
    small autograd nodes where torch's ``kl_div`` and a weight take four, and the same sum of
    the same products (its precision near KL = 0 included). The difference is taken as
    log q − log p against −scale·p, so that its gradient reaches log q without a negation. A
    class the teacher gives probability exactly 0 (log p = −inf) makes it NaN, as ``kl_div`` does.
    """
    if log_p.requires_grad:
        log_p = log_p.detach()
    gap = log_q - log_p
    weights = log_p.exp().mul_(-scale)
    if weights.dtype != gap.dtype:  # float32 teacher, float64 student: the sum in float64
        weights = weights.to(gap.dtype)
    return torch.dot(weights.reshape(-1), gap.reshape(-1))


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

    A term whose weight is zero is not computed (so λ = 1 needs no labels, λ = 0 no teacher). CE
    averages over the labelled samples only (targets ``UNLABELLED`` have none), KL over all of
    them. ``standardize``: s and t are replaced by ``standardize_logits`` of each in the KL term
    only. ``kd_terms_from_log_probs`` of the teacher's ``teacher_log_probs``.
    """
    teacher = teacher_log_probs(teacher_logits, temperature, standardize=standardize) if lam > 0 else None
    return kd_terms_from_log_probs(student_logits, teacher, targets, lam, temperature, standardize=standardize)


def kd_terms_from_log_probs(
    student_logits: Tensor,
    teacher: Tensor | None,
    targets: Tensor,
    lam: float,
    temperature: float,
    *,
    standardize: bool = False,
) -> dict[str, Tensor]:
    """``kd_terms`` with the teacher's side given as ``teacher`` = ``teacher_log_probs(t, T,
    standardize=...)`` (None when λ = 0).

    Each log-softmax of the student is computed once: at T = 1 without standardizing, the CE's
    serves the KL term too. Each weight is folded into a scale factor that needs no gradient (the
    KL's into the teacher's probabilities, ``weighted_kl``).
    """
    log_probs = None
    if lam < 1:
        log_probs = student_logits.log_softmax(dim=1)
        ce = labelled_nll(log_probs, targets, weight=1.0 - lam)
    else:
        ce = student_logits.new_zeros(())
    if lam > 0:
        if log_probs is None or temperature != 1 or standardize:
            student = standardize_logits(student_logits) if standardize else student_logits
            log_probs = log_softmax_at(student, temperature)
        kd = weighted_kl(teacher, log_probs, lam * temperature**2 / student_logits.shape[0])
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
    al., CVPR 2024; ``standardize_logits``).

    Beside ``forward`` it has the optional pair of methods a fit on cached teacher outputs uses
    (``DistillationModule``): ``prepare_teacher`` maps the table of the teacher's logits, once per
    fit, to its log-probabilities at T, and ``forward_prepared`` takes rows of that table where
    ``forward`` takes rows of logits, with the same result.
    """

    def __init__(self, lam: Lam, temperature: Temperature, standardize: bool) -> None:
        super().__init__()
        self.lam, self.temperature, self.standardize = float(lam), float(temperature), bool(standardize)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
        teacher = self.prepare_teacher(teacher_logits) if self.lam > 0 else None
        return self.forward_prepared(student_logits, teacher, targets)

    def prepare_teacher(self, teacher_logits: Tensor) -> Tensor:
        """The teacher's log-probabilities at T (``teacher_log_probs``), row by row."""
        return teacher_log_probs(teacher_logits, self.temperature, standardize=self.standardize)

    def forward_prepared(self, student_logits: Tensor, teacher: Tensor | None, targets: Tensor) -> dict[str, Tensor]:
        """``forward`` with the teacher's side given as rows of ``prepare_teacher``'s result."""
        terms = kd_terms_from_log_probs(
            student_logits, teacher, targets, self.lam, self.temperature, standardize=self.standardize
        )
        terms["loss"] = terms["ce"] + terms["kd"]
        return terms

    def extra_repr(self) -> str:
        return f"lam={self.lam}, temperature={self.temperature}, standardize={self.standardize}"
