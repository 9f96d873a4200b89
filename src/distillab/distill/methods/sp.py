"""Similarity-preserving KD (Tung & Mori, ICCV 2019), ``distill=sp``:

    loss = (1 − kd.lam)·CE + kd.lam·T²·KL + sp_weight · Σ_pairs ‖G_s − G_t‖²_F / b²

G the row-normalised b×b similarity matrix f·fᵀ of a layer's flattened features over the batch
(module paths; null = the last stage of each model). Student and teacher features may have any
(different) shapes: only the b×b matrices meet.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from distillab.distill.methods.base import FeatureMethod, KDTerm
from distillab.settings import Weight


def similarity_matrix(feature: Tensor) -> Tensor:
    """The b×b similarities f·fᵀ of the batch's flattened features, each row L2-normalised."""
    flat = feature.flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


def sp_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """Similarity-preserving loss of one layer pair: ‖G_s − G_t‖²_F / b², G = ``similarity_matrix``.
    Student and teacher features may have any (different) shapes: only the b×b matrices meet."""
    b = len(student_feat)
    return (similarity_matrix(student_feat) - similarity_matrix(teacher_feat)).pow(2).sum() / b**2


class SimilarityPreserving(FeatureMethod):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019):

        sp = sp_weight · Σ_pairs ‖G_s − G_t‖²_F / b²,   G = row-normalised f·fᵀ over the batch

    (``sp_loss``). Default layer: the last stage of each model; logs ``sp``.
    """

    default_layers = "last"

    def __init__(
        self,
        sp_weight: Weight,
        student_layers: str | Sequence[str] | None,
        teacher_layers: str | Sequence[str] | None,
        kd: KDTerm,
    ) -> None:
        super().__init__(kd, student_layers, teacher_layers)
        self.sp_weight = float(sp_weight)

    def feature_terms(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> dict[str, Tensor]:
        return {"sp": self.sp_weight * sum(sp_loss(s, t) for s, t in zip(student_feats, teacher_feats))}

    def extra_repr(self) -> str:
        return f"sp_weight={self.sp_weight}, lam={self.lam}, temperature={self.temperature}"
