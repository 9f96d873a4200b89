"""Decoupled knowledge distillation (Zhao et al., CVPR 2022), ``distill=dkd``, a logit method:

    loss = ce_weight·CE(y, s) + w(epoch)·(alpha·TCKD + beta·NCKD)·T²

TCKD the KL between the binary target/non-target distributions of teacher and student, NCKD the
KL among the non-target classes alone, both at temperature T; w = min((epoch + 1)/warmup_epochs, 1)
with 0-based epochs (1 when warmup_epochs = 0). Per sample, KD = TCKD + (1 − p_target^teacher)·NCKD
(the paper's equation 4): DKD weighs the two parts apart.

``standardize`` (Sun et al., CVPR 2024): the student's and the teacher's logits are each z-scored
per sample (``kd.standardize_logits``) before TCKD and NCKD; the cross-entropy stays on the raw
logits.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillab.distill.methods.kd import standardize_logits
from distillab.labels import UNLABELLED, labelled_cross_entropy
from distillab.settings import Range, Temperature, Weight, checked

#: the length of the warm-up of the DKD terms
WarmupEpochs = Annotated[int, Range(0, what="epochs", note="the DKD terms ramp up over them; 0 = no warm-up")]


def _binary_log_probs(log_probs: Tensor, target_mask: Tensor) -> Tensor:
    """log [p_target, 1 − p_target] per sample, the non-target mass summed in log space."""
    target = log_probs[target_mask]  # one entry per row
    other = log_probs.masked_fill(target_mask, float("-inf")).logsumexp(dim=1)
    return torch.stack([target, other], dim=1)


def _kl_rows(log_p_teacher: Tensor, log_p_student: Tensor) -> Tensor:
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)


def dkd_parts(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float, reduction: str = "mean"
) -> tuple[Tensor, Tensor]:
    """Unweighted (TCKD, NCKD) of decoupled KD (Zhao et al., CVPR 2022), both at temperature T.

    TCKD = KL(b_t ‖ b_s) between the binary distributions [p_target, 1 − p_target];
    NCKD = KL(p̂_t ‖ p̂_s) between the distributions among the non-target classes alone.
    The non-target logits are gathered into a b×(C − 1) tensor, which is the published code's
    masking of the target logit with a large negative value before the softmax, taken exactly.
    Per sample, KD = TCKD + (1 − p_target^teacher)·NCKD (the paper's equation 4).
    ``reduction``: ``mean`` over the batch or ``none`` (per sample).
    """
    n, classes = student_logits.shape
    target_mask = F.one_hot(targets, classes).bool()
    s, t = student_logits / temperature, teacher_logits / temperature
    tckd = _kl_rows(
        _binary_log_probs(F.log_softmax(t, dim=1), target_mask), _binary_log_probs(F.log_softmax(s, dim=1), target_mask)
    )
    others = ~target_mask
    nckd = _kl_rows(
        F.log_softmax(t[others].view(n, classes - 1), dim=1), F.log_softmax(s[others].view(n, classes - 1), dim=1)
    )
    if reduction == "none":
        return tckd, nckd
    if reduction != "mean":
        raise ValueError(f"reduction={reduction!r}: must be 'mean' or 'none'")
    return tckd.mean(), nckd.mean()


def dkd_warmup(epoch: int, warmup_epochs: int) -> float:
    """The DKD terms' weight at the 0-based ``epoch``: min((epoch + 1)/warmup_epochs, 1), 1 without
    warm-up. The published code counts epochs from 1 and uses min(epoch/warmup, 1): the same ramp."""
    if warmup_epochs <= 0:
        return 1.0
    return min((epoch + 1) / warmup_epochs, 1.0)


@checked
class DecoupledKD(nn.Module):
    """Decoupled knowledge distillation (Zhao et al., CVPR 2022), a logit method:

        ce = ce_weight·CE(y, s),  tckd = w·alpha·T²·TCKD,  nckd = w·beta·T²·NCKD

    (``dkd_parts``), w = ``dkd_warmup(epoch, warmup_epochs)`` set at each epoch start. A sample
    without a label (target ``UNLABELLED``, see ``distill.labels``) is left out of the
    cross-entropy, and TCKD/NCKD take the teacher's predicted class as its target class.
    ``standardize``: TCKD and NCKD read the z-scored logits of each sample (Sun et al., CVPR 2024).
    """

    def __init__(
        self,
        ce_weight: Weight,
        alpha: Weight,
        beta: Weight,
        temperature: Temperature,
        warmup_epochs: WarmupEpochs,
        standardize: bool,
    ) -> None:
        super().__init__()
        self.ce_weight, self.alpha, self.beta = float(ce_weight), float(alpha), float(beta)
        self.temperature, self.warmup_epochs = float(temperature), int(warmup_epochs)
        self.standardize = bool(standardize)
        self.warmup = dkd_warmup(0, self.warmup_epochs)

    def on_epoch_start(self, epoch: int) -> None:
        """Set the warm-up weight w of the 0-based ``epoch``."""
        self.warmup = dkd_warmup(epoch, self.warmup_epochs)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
        teacher_logits = teacher_logits.detach()
        labelled = targets != UNLABELLED
        zero = student_logits.new_zeros(())
        ce = self.ce_weight * labelled_cross_entropy(student_logits, targets) if self.ce_weight > 0 else zero
        kd_targets = torch.where(labelled, targets, teacher_logits.argmax(dim=1))
        student, teacher = student_logits, teacher_logits
        if self.standardize:
            student, teacher = standardize_logits(student), standardize_logits(teacher)
        tckd, nckd = dkd_parts(student, teacher, kd_targets, self.temperature)
        scale = self.warmup * self.temperature**2
        terms = {"ce": ce, "tckd": scale * self.alpha * tckd, "nckd": scale * self.beta * nckd}
        terms["loss"] = terms["ce"] + terms["tckd"] + terms["nckd"]
        return terms

    def extra_repr(self) -> str:
        return (
            f"ce_weight={self.ce_weight}, alpha={self.alpha}, beta={self.beta}, "
            f"temperature={self.temperature}, warmup_epochs={self.warmup_epochs}, standardize={self.standardize}"
        )
