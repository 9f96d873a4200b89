"""Cosine embedding hint (DistilBERT's L_cos, Sanh et al. 2019), ``distill=cosine_hint``:

    loss = (1 − kd.lam)·CE(y, s) + kd.lam·T²·KL(softmax(t/T) ‖ softmax(s/T)) + cos_weight·mean(1 − cos(W·f_s, f_t))

aligns the direction of the student's embedding f_s with the teacher's f_t (module paths; null
= the input of each model's last linear layer). The student's width rarely equals the
teacher's, so a learned linear map W (TinyBERT's W_h, Jiao et al. 2020) projects it first; W
trains with the student and is counted apart from it (results.json: ``student.extra_params``).
Feature maps (N×C×H×W) are average-pooled to N×C.

A feature method derives from ``FeatureMethod``: ``default_layers`` names the layers it reads,
``build`` creates its modules from the traced shapes, ``feature_terms`` returns its terms.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillab.distill.methods.base import FeatureMethod, KDTerm
from distillab.settings import Weight


def embedding(feature: Tensor) -> Tensor:
    """N×D as it is; N×C×H×W (or any N×C×…) averaged over its positions."""
    return feature.flatten(2).mean(dim=2) if feature.dim() > 2 else feature


def cosine_loss(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """Mean over the batch of 1 − cos(student_emb, teacher_emb): 0 when they point the same way."""
    return (1.0 - F.cosine_similarity(student_emb, teacher_emb, dim=1)).mean()


class CosineHint(FeatureMethod):
    """``cos_weight``·mean(1 − cos(W·f_s, f_t)) per student/teacher layer pair, W learned; logs ``cos``."""

    default_layers = "embedding"

    def __init__(
        self,
        cos_weight: Weight,
        student_layers: str | Sequence[str] | None,
        teacher_layers: str | Sequence[str] | None,
        kd: KDTerm,
    ) -> None:
        super().__init__(kd, student_layers, teacher_layers)
        self.cos_weight = float(cos_weight)
        self.projections = nn.ModuleList()

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        self.projections = nn.ModuleList(
            nn.Linear(s[1], t[1], bias=False) for s, t in zip(student_shapes, teacher_shapes)
        )

    def feature_terms(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> dict[str, Tensor]:
        pairs = zip(self.projections, student_feats, teacher_feats)
        return {"cos": self.cos_weight * sum(cosine_loss(w(embedding(s)), embedding(t)) for w, s, t in pairs)}
