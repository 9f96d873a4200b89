"""Neuron selectivity transfer (Huang & Wang, 2017, arXiv 1707.01219), ``distill=nst``:

    loss = (1 − kd.lam)·CE + kd.lam·T²·KL + nst_weight · Σ_pairs MMD²(F_s, F_t)

over pairs of N×C×H×W maps taken by position (module paths; null = every stage of each model,
paired from the output side when the depths differ). Per image, each channel's H·W map,
flattened and L2-normalised, is one sample: the student's C_s channels and the teacher's C_t
channels are two sets of samples, compared by the squared maximum mean discrepancy with the
polynomial kernel k(x, y) = (xᵀy + c)^d, d = 2, c = 0:

    MMD² = mean_{i,i'} k(s_i, s_i') + mean_{j,j'} k(t_j, t_j') − 2·mean_{i,j} k(s_i, t_j),

averaged over the batch. The larger map of a pair is average-pooled to the smaller size first; the
channel counts need not agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distillab.distill.methods.base import FeatureMethod, KDTerm
from distillab.settings import Weight

#: the polynomial kernel k(x, y) = (xᵀy + c)^d of the paper's CIFAR experiments: d = 2, c = 0
KERNEL_DEGREE = 2
KERNEL_OFFSET = 0.0


def pooled_to_common_size(student_feat: Tensor, teacher_feat: Tensor) -> tuple[Tensor, Tensor]:
    """The two N×C×H×W maps at one spatial size: the larger of each dimension adaptive-average-pooled
    to the smaller one (a map already at that size is left as it is)."""
    s_size, t_size = tuple(student_feat.shape[2:]), tuple(teacher_feat.shape[2:])
    if s_size == t_size:
        return student_feat, teacher_feat
    size = (min(s_size[0], t_size[0]), min(s_size[1], t_size[1]))
    student_feat = F.adaptive_avg_pool2d(student_feat, size) if s_size != size else student_feat
    teacher_feat = F.adaptive_avg_pool2d(teacher_feat, size) if t_size != size else teacher_feat
    return student_feat, teacher_feat


def channel_samples(feature: Tensor) -> Tensor:
    """N×C×H×W → N×C×(H·W): each channel's flattened map, L2-normalised."""
    return F.normalize(feature.flatten(2), dim=2)


def polynomial_kernel(a: Tensor, b: Tensor, degree: int = KERNEL_DEGREE, offset: float = KERNEL_OFFSET) -> Tensor:
    """k(a_i, b_j) = (a_iᵀb_j + c)^d for the rows of N×I×D ``a`` and N×J×D ``b``: N×I×J."""
    return (a @ b.transpose(1, 2) + offset).pow(degree)


def nst_loss(
    student_feat: Tensor, teacher_feat: Tensor, degree: int = KERNEL_DEGREE, offset: float = KERNEL_OFFSET
) -> Tensor:
    """Squared MMD between the student's and the teacher's channels, each channel's normalised
    H·W map a sample (``channel_samples``), with the polynomial kernel; the mean over the batch.
    The means over the C_s², C_t² and C_s·C_t kernel entries are the paper's 1/C² factors; the
    teacher-only term carries no gradient but is kept, so that the loss is the MMD² itself (≥ 0)."""
    student_feat, teacher_feat = pooled_to_common_size(student_feat, teacher_feat)
    s, t = channel_samples(student_feat), channel_samples(teacher_feat)
    ss = polynomial_kernel(s, s, degree, offset).mean(dim=(1, 2))
    tt = polynomial_kernel(t, t, degree, offset).mean(dim=(1, 2))
    st = polynomial_kernel(s, t, degree, offset).mean(dim=(1, 2))
    return (ss + tt - 2.0 * st).mean()


class NST(FeatureMethod):
    """Neuron selectivity transfer (Huang & Wang, 2017):

        nst = nst_weight · Σ_pairs MMD²(channels of f_s, channels of f_t),   k(x, y) = (xᵀy)²

    over pairs of layers taken by position (``nst_loss``). Default layers: every stage of each
    model, paired from the output side when the depths differ. Needs N×C×H×W maps on both sides;
    logs ``nst``.
    """

    default_layers = "stages"

    def __init__(
        self,
        nst_weight: Weight,
        student_layers: str | Sequence[str] | None,
        teacher_layers: str | Sequence[str] | None,
        kd: KDTerm,
    ) -> None:
        super().__init__(kd, student_layers, teacher_layers)
        self.nst_weight = float(nst_weight)

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        self.require_maps(student_shapes, teacher_shapes, "nst")

    def feature_terms(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> dict[str, Tensor]:
        total = sum(nst_loss(s, t) for s, t in zip(student_feats, teacher_feats))
        return {"nst": self.nst_weight * total}

    def extra_repr(self) -> str:
        return f"nst_weight={self.nst_weight}, lam={self.lam}, temperature={self.temperature}"
