"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018), ``distill=pkt``:

    loss = (1 − kd.lam)·CE + kd.lam·T²·KL + pkt_weight · KL(P_t ‖ P_s)

P the conditional distributions over the batch given by the cosine similarities of one layer's
flattened features mapped to [0, 1] by (cos + 1)/2, rows summing to 1; the KL is summed over the
b² entries and divided by b² (module paths; null = the input of each model's last linear layer).
Student and teacher dimensions may differ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from distillab.distill.methods.base import FeatureMethod, KDTerm
from distillab.settings import Weight


def cosine_conditionals(feature: Tensor, eps: float = 1e-7) -> Tensor:
    """PKT's conditional distributions over the batch: the cosine similarities of the L2-normalised
    flattened features mapped to [0, 1] by (cos + 1)/2, each row then divided by its sum."""
    flat = feature.flatten(1)
    unit = flat / (flat.norm(dim=1, keepdim=True) + eps)
    similarity = (unit @ unit.t() + 1.0) / 2.0
    return similarity / similarity.sum(dim=1, keepdim=True)


def pkt_loss(student_feat: Tensor, teacher_feat: Tensor, eps: float = 1e-7) -> Tensor:
    """KL(P_t ‖ P_s) of the ``cosine_conditionals``, with ``eps`` inside the logarithm:
    Σ_ij P_t[i,j]·log((P_t[i,j] + eps)/(P_s[i,j] + eps)) / b². Dividing by b² (the mean over all
    entries, i.e. the per-row KL averaged over rows and divided by b) is the authors' convention,
    on whose scale the CRD weight 30000 is set."""
    p_student, p_teacher = cosine_conditionals(student_feat, eps), cosine_conditionals(teacher_feat, eps)
    return (p_teacher * torch.log((p_teacher + eps) / (p_student + eps))).mean()


class ProbabilisticTransfer(FeatureMethod):
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018):

        pkt = pkt_weight · KL(P_t ‖ P_s),   P = row-normalised (cos + 1)/2 over the batch

    on one layer's flattened features (``pkt_loss``). Default layer: the embedding (input of the
    last linear layer). Student and teacher dimensions may differ; logs ``pkt``.
    """

    default_layers = "embedding"
    student_key = "distill.student_layer"
    teacher_key = "distill.teacher_layer"

    def __init__(self, pkt_weight: Weight, student_layer: str | None, teacher_layer: str | None, kd: KDTerm) -> None:
        super().__init__(kd, student_layer, teacher_layer)
        self.pkt_weight = float(pkt_weight)

    def feature_terms(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> dict[str, Tensor]:
        (student_feat,), (teacher_feat,) = student_feats, teacher_feats
        return {"pkt": self.pkt_weight * pkt_loss(student_feat, teacher_feat)}

    def extra_repr(self) -> str:
        return f"pkt_weight={self.pkt_weight}, lam={self.lam}, temperature={self.temperature}"
