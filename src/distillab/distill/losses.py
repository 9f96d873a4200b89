"""Distillation losses.

The maths lives in pure functions (``kd_terms``, ``kd_loss``) that tests check against
hand-computed values; the small ``nn.Module`` wrappers are what configs instantiate. Every
loss module returns its terms by name, with the total under ``"loss"``, so each is logged.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(softmax(t/T) ‖ softmax(s/T)), summed over classes, mean over the batch."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    per_sample = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    return per_sample.mean()


def kd_terms(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    lam: float,
    temperature: float,
) -> dict[str, Tensor]:
    """The weighted terms of Hinton et al. (2015) distillation.

    ``ce`` is (1 − λ)·CE(y, s) and ``kd`` is λ·T²·KL(softmax(t/T) ‖ softmax(s/T)); the T²
    keeps the soft-target gradients on the same scale as the hard-target ones when T changes.
    A term whose weight is zero is not computed (so λ = 1 needs no labels).
    """
    zero = student_logits.new_zeros(())
    ce = (1.0 - lam) * F.cross_entropy(student_logits, targets) if lam < 1 else zero
    kd = lam * temperature**2 * soft_kl(student_logits, teacher_logits.detach(), temperature) if lam > 0 else zero
    return {"ce": ce, "kd": kd}


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    lam: float,
    temperature: float,
) -> Tensor:
    """(1 − λ)·CE(y, s) + λ·T²·KL(softmax(t/T) ‖ softmax(s/T)), mean over the batch.

    λ = 0 is plain cross-entropy, λ = 1 pure distillation from the teacher's soft targets.
    """
    terms = kd_terms(student_logits, teacher_logits, targets, lam, temperature)
    return terms["ce"] + terms["kd"]


class CrossEntropy(nn.Module):
    """No distillation: the student trains on labels alone (``distill=none``)."""

    needs_teacher = False
    method = "none"

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | None, targets: Tensor) -> dict[str, Tensor]:
        ce = F.cross_entropy(student_logits, targets)
        return {"ce": ce, "loss": ce}


class KDLoss(nn.Module):
    """Hinton knowledge distillation (``distill=kd``), weights λ = ``lam`` and T = ``temperature``."""

    needs_teacher = True
    method = "kd"

    def __init__(self, lam: float = 0.5, temperature: float = 2.0) -> None:
        super().__init__()
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"distill.lam must be in [0, 1], got {lam}")
        if not temperature > 0:
            raise ValueError(f"distill.temperature must be > 0, got {temperature}")
        self.lam, self.temperature = float(lam), float(temperature)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
        terms = kd_terms(student_logits, teacher_logits, targets, self.lam, self.temperature)
        terms["loss"] = terms["ce"] + terms["kd"]
        return terms

    def extra_repr(self) -> str:
        return f"lam={self.lam}, temperature={self.temperature}"


__all__ = ["CrossEntropy", "KDLoss", "kd_loss", "kd_terms", "soft_kl"]
