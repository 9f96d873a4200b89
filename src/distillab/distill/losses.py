"""Distillation losses.

The maths lives in pure functions (``kd_terms``, ``kd_loss``) that tests check against
hand-computed values; the small ``nn.Module`` wrappers are what configs instantiate. Every
loss module returns its terms by name, with the total under ``"loss"``, so each is logged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from distillab.distill.labels import labelled_cross_entropy


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
    A term whose weight is zero is not computed (so λ = 1 needs no labels). CE averages over
    the labelled samples only (targets ``UNLABELLED`` have none), KL over all of them.
    """
    zero = student_logits.new_zeros(())
    ce = (1.0 - lam) * labelled_cross_entropy(student_logits, targets) if lam < 1 else zero
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


class DistillLoss(nn.Module):
    """What every distillation method is: an ``nn.Module`` returning its weighted terms by name.

    ``forward(student_logits, teacher_logits, targets, student_feats=(), teacher_feats=())``
    returns ``{"term": value, ..., "loss": total}``; every term is logged as ``train/<term>``.
    Logit methods ignore the features. A feature method lists the layers it reads in
    ``student_paths`` / ``teacher_paths`` (module paths, see ``distill.hooks``), filled by
    ``bind`` before training; the module then hands it the features of those layers, the
    teacher's computed without gradients. Parameters of the loss itself (regressors,
    embeddings) train with the student and are counted apart from it.
    """

    needs_teacher = True
    method = ""
    #: the temperature of the teacher's soft targets (an ensemble averages probabilities at it)
    temperature = 1.0

    def __init__(self) -> None:
        super().__init__()
        self.student_paths: list[str] = []
        self.teacher_paths: list[str] = []

    @property
    def needs_features(self) -> bool:
        return bool(self.student_paths or self.teacher_paths)

    def bind(self, student: nn.Module, teacher: nn.Module | None, example: Tensor,
             same_architecture: bool = False) -> None:
        """Resolve layers and build the method's own modules for this student/teacher pair,
        from one example batch; a wrong layer or shape fails here, before any training.
        ``same_architecture``: the teacher is the student's own uncompressed copy
        (compression fine-tuning), so the student's layer paths are used for both."""

    def on_epoch_start(self, epoch: int) -> None:
        """Called at the start of every training epoch (0-based), for schedules of weights."""


class CrossEntropy(DistillLoss):
    """No distillation: the student trains on labels alone (``distill=none``), on the labelled
    samples only when ``data.labelled_fraction`` < 1."""

    needs_teacher = False
    method = "none"

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | None, targets: Tensor,
                student_feats: Sequence[Tensor] = (), teacher_feats: Sequence[Tensor] = ()) -> dict[str, Tensor]:
        ce = labelled_cross_entropy(student_logits, targets)
        return {"ce": ce, "loss": ce}


class KDLoss(DistillLoss):
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

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
                student_feats: Sequence[Tensor] = (), teacher_feats: Sequence[Tensor] = ()) -> dict[str, Tensor]:
        terms = kd_terms(student_logits, teacher_logits, targets, self.lam, self.temperature)
        terms["loss"] = terms["ce"] + terms["kd"]
        return terms

    def extra_repr(self) -> str:
        return f"lam={self.lam}, temperature={self.temperature}"


__all__ = ["CrossEntropy", "DistillLoss", "KDLoss", "kd_loss", "kd_terms", "soft_kl"]
