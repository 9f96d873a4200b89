"""Online distillation from a teacher trained alongside, ``distill=online``: the teacher starts
from scratch and learns from the labels alone, in the same fit as the student, which distils
from the teacher's current predictions at each step:

    L_student = (1 − λ)·CE(y, s) + λ·T²·KL( softmax(t/T) ‖ softmax(s/T) ),   L_teacher = CE(y, t)

with t taken as a constant in the student's loss, so the teacher is never pulled towards the
student (the one-way case of deep mutual learning, Zhang et al., CVPR 2018). No cached teacher is
read or written: both models are peers of one fit (peer 0 the student, peer 1 the teacher).
"""

from __future__ import annotations

from torch import Tensor, nn

from distillab.distill.methods.kd import KD, Lam, kd_terms
from distillab.labels import labelled_cross_entropy
from distillab.settings import Temperature, checked


@checked
class OnlineKD(nn.Module):
    """The student distils from a teacher that trains at the same time; logs ``ce``, ``kd`` and
    ``teacher_ce``."""

    cotrains = True
    needs_teacher = False
    peer_roles = ["student", "teacher"]

    def __init__(self, lam: Lam, temperature: Temperature) -> None:
        super().__init__()
        self.lam, self.temperature = float(lam), float(temperature)

    def forward(self, logits: list[Tensor], targets: Tensor) -> dict[str, Tensor]:
        student, teacher = logits
        terms = kd_terms(student, teacher.detach(), targets, self.lam, self.temperature)
        terms["teacher_ce"] = labelled_cross_entropy(teacher, targets)
        terms["loss"] = terms["ce"] + terms["kd"] + terms["teacher_ce"]
        return terms

    def finetune_method(self) -> nn.Module:
        """KD at the student's own λ and T, from the uncompressed student."""
        return KD(lam=self.lam, temperature=self.temperature, standardize=False)

    def extra_repr(self) -> str:
        return f"lam={self.lam}, temperature={self.temperature}"
