"""Logit matching (Ba & Caruana, "Do Deep Nets Really Need to be Deep?", NeurIPS 2014), ``distill=logit_matching``:

    loss = ce_weight · CE(y, s) + weight · ½ · mean over the batch of Σ_classes (s − t)²

The student regresses the teacher's logits instead of its tempered probabilities. Hinton et al.
(2015, §2.1) show that KD at a high temperature approaches this regression of zero-mean logits,
so ``centered: true`` subtracts each sample's mean logit first (logits are shift-invariant);
``ce_weight: 0`` is Ba & Caruana's pure mimic learning, without labels.

A logit method is any ``nn.Module`` whose ``forward(student_logits, teacher_logits, targets)``
returns its terms by name with the total under ``"loss"``; its settings are the typed
parameters of ``__init__``, their values in ``conf/distill/logit_matching.yaml``.
"""

from __future__ import annotations

from torch import Tensor, nn

from distillab.distill.labels import labelled_cross_entropy
from distillab.settings import Weight, checked


def logit_mse(student_logits: Tensor, teacher_logits: Tensor, centered: bool) -> Tensor:
    """½ · Σ_classes (s − t)², mean over the batch; each sample's mean logit removed when ``centered``."""
    if centered:
        student_logits = student_logits - student_logits.mean(dim=1, keepdim=True)
        teacher_logits = teacher_logits - teacher_logits.mean(dim=1, keepdim=True)
    return 0.5 * (student_logits - teacher_logits).pow(2).sum(dim=1).mean()


@checked  # built from Python, it checks its settings as the config check does
class LogitMatching(nn.Module):
    """Ba & Caruana's logit regression plus a cross-entropy term; logs ``ce`` and ``mse``."""

    def __init__(self, weight: Weight, ce_weight: Weight, centered: bool) -> None:
        super().__init__()
        self.weight, self.ce_weight, self.centered = float(weight), float(ce_weight), bool(centered)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
        # unlabelled samples (data.labelled_fraction < 1) count in the regression, not in CE
        ce = self.ce_weight * labelled_cross_entropy(student_logits, targets)
        mse = self.weight * logit_mse(student_logits, teacher_logits.detach(), self.centered)
        return {"ce": ce, "mse": mse, "loss": ce + mse}
