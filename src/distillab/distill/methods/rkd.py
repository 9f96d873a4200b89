"""Relational KD (Park et al., CVPR 2019), ``distill=rkd``:

    loss = (1 − kd.lam)·CE + kd.lam·T²·KL + distance_weight·Huber(ψ_D(s), ψ_D(t)) + angle_weight·Huber(ψ_A(s), ψ_A(t))

ψ_D the pairwise distances of the batch's embeddings divided by their mean, ψ_A the cosines of
the angles of the batch's triplets, on one layer's flattened features (module paths; null = the
input of each model's last linear layer). Student and teacher dimensions may differ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distillab.distill.methods.base import FeatureMethod, KDTerm
from distillab.settings import Weight


def pairwise_distances(embedding: Tensor, eps: float = 1e-12) -> Tensor:
    """The b×b Euclidean distances between the batch's flattened embeddings, 0 on the diagonal.
    Squared distances are clamped at ``eps`` before the root so its gradient stays finite."""
    flat = embedding.flatten(1)
    squared = (flat.unsqueeze(0) - flat.unsqueeze(1)).pow(2).sum(dim=2)
    off_diagonal = ~torch.eye(len(flat), dtype=torch.bool, device=flat.device)
    return squared.clamp_min(eps).sqrt() * off_diagonal


def rkd_distance_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """RKD distance term: smooth L1 (Huber, δ = 1) between ψ_D of student and teacher, where ψ_D
    is the distance matrix divided by its mean over the b(b − 1) pairs i ≠ j. Averaged over all
    b² entries (the zero diagonal included), as in the authors' code that weight 25 is set for."""

    def normalised(feature: Tensor) -> Tensor:
        distances = pairwise_distances(feature)
        pairs = max(len(feature) * (len(feature) - 1), 1)
        return distances / (distances.sum() / pairs).clamp_min(1e-12)

    return F.smooth_l1_loss(normalised(student_feat), normalised(teacher_feat))


def triplet_cosines(embedding: Tensor) -> Tensor:
    """ψ_A: the b×b×b cosines cos∠(e_j, e_i, e_k) = ⟨(e_j − e_i)/‖·‖, (e_k − e_i)/‖·‖⟩, vertex at e_i.
    A degenerate triplet (j = i or k = i) has a zero difference vector and a cosine of 0."""
    flat = embedding.flatten(1)
    directions = F.normalize(flat.unsqueeze(0) - flat.unsqueeze(1), dim=2)  # [i, j] = unit(e_j − e_i)
    return directions @ directions.transpose(1, 2)


def rkd_angle_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """RKD angle term: smooth L1 (Huber, δ = 1) between the triplet cosines ψ_A of student and
    teacher, averaged over all b³ triplets (degenerate ones included, as in the authors' code)."""
    return F.smooth_l1_loss(triplet_cosines(student_feat), triplet_cosines(teacher_feat))


class RelationalKD(FeatureMethod):
    """Relational KD (Park et al., CVPR 2019):

        rkd_distance = distance_weight · Huber(ψ_D(s), ψ_D(t)),   rkd_angle = angle_weight · Huber(ψ_A(s), ψ_A(t))

    on one layer's flattened features (``rkd_distance_loss``, ``rkd_angle_loss``); the two terms
    are logged apart. Default layer: the embedding (input of the last linear layer). Student and
    teacher dimensions may differ. A term whose weight is zero is not computed.
    """

    default_layers = "embedding"
    student_key = "distill.student_layer"
    teacher_key = "distill.teacher_layer"

    def __init__(
        self,
        distance_weight: Weight,
        angle_weight: Weight,
        student_layer: str | None,
        teacher_layer: str | None,
        kd: KDTerm,
    ) -> None:
        super().__init__(kd, student_layer, teacher_layer)
        self.distance_weight, self.angle_weight = float(distance_weight), float(angle_weight)

    def feature_terms(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> dict[str, Tensor]:
        (student_feat,), (teacher_feat,) = student_feats, teacher_feats
        zero = student_feat.new_zeros(())
        # a term whose weight is zero is not computed (the angle term is b³ in memory)
        distance = rkd_distance_loss(student_feat, teacher_feat) if self.distance_weight > 0 else zero
        angle = rkd_angle_loss(student_feat, teacher_feat) if self.angle_weight > 0 else zero
        return {"rkd_distance": self.distance_weight * distance, "rkd_angle": self.angle_weight * angle}

    def extra_repr(self) -> str:
        return (
            f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}, lam={self.lam}, "
            f"temperature={self.temperature}"
        )
