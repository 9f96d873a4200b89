"""Variational information distillation (Ahn et al., CVPR 2019), ``distill=vid``:

    loss = (1 − kd.lam)·CE + kd.lam·T²·KL + vid_weight · Σ_pairs mean_{n,c,h,w} ½·(log σ²_c + (t − μ(s))²/σ²_c)

over pairs of layers taken by position (module paths; null = every stage of each model, paired
from the output side when the depths differ). Each pair has its own learned Gaussian
q(t | s) = N(μ(s), σ²): the mean μ a regressor from the student's feature to the teacher's shape
(three 1×1 convolutions with ReLUs between them for two maps, as in the authors' and the CRD
benchmark's code; a linear layer otherwise) and one variance per teacher channel,
σ²_c = softplus(α_c) + 1e-5, starting at ``init_variance``. Minimising the negative
log-likelihood maximises a variational lower bound on the mutual information between the two
features. The larger map of a pair is average-pooled to the smaller size first.

The paper's negative log-likelihood sums over channels and positions; the reference code (which
the CRD benchmark's weight ``-b 1`` is set on) averages over them and over the batch, and so
does this one. The constant ½·log 2π is left out, as in both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillab.distill.methods.base import FeatureMethod, KDTerm
from distillab.distill.methods.nst import pooled_to_common_size
from distillab.settings import Range, Weight

#: the floor added to every learned variance
VARIANCE_EPS = 1e-5

#: the variance σ² each channel starts with
InitVariance = Annotated[float, Range(1e-5, low_open=True, what="a variance", note="5 in the paper's code")]


def _is_map(shape: torch.Size) -> bool:
    return len(shape) == 4


def inverse_softplus(value: float) -> float:
    """The α with softplus(α) = log(1 + e^α) = ``value`` > 0."""
    return value + math.log(-math.expm1(-value))


def gaussian_nll(mean: Tensor, target: Tensor, variance: Tensor) -> Tensor:
    """½·(log σ² + (t − μ)²/σ²) averaged over every entry (batch, channels, positions), σ² one
    variance per channel (dimension 1), without the constant ½·log 2π."""
    variance = variance.view(1, -1, *([1] * (target.dim() - 2)))
    return (0.5 * (torch.log(variance) + (target - mean).pow(2) / variance)).mean()


class VariationalRegressor(nn.Module):
    """The Gaussian q(t | s) of one layer pair: the mean μ(s) on the teacher's shape and a learned
    variance per teacher channel, σ² = softplus(α) + 1e-5, α set so that σ² starts at
    ``init_variance``. Between two maps, μ is three 1×1 convolutions without bias with ReLUs
    between them, the hidden width the teacher's channel count; otherwise a linear layer on the
    flattened student feature."""

    def __init__(self, student_shape: torch.Size, teacher_shape: torch.Size, init_variance: float) -> None:
        super().__init__()
        self.teacher_shape = tuple(teacher_shape[1:])
        self.spatial = _is_map(student_shape) and _is_map(teacher_shape)
        channels = int(teacher_shape[1])
        if self.spatial:
            self.mean = nn.Sequential(
                nn.Conv2d(int(student_shape[1]), channels, 1, bias=False),
                nn.ReLU(),
                nn.Conv2d(channels, channels, 1, bias=False),
                nn.ReLU(),
                nn.Conv2d(channels, channels, 1, bias=False),
            )
        else:
            self.mean = nn.Linear(
                int(torch.Size(student_shape[1:]).numel()), int(torch.Size(teacher_shape[1:]).numel())
            )
        self.raw_variance = nn.Parameter(torch.full((channels,), inverse_softplus(init_variance - VARIANCE_EPS)))

    def variance(self) -> Tensor:
        """σ² per teacher channel."""
        return F.softplus(self.raw_variance) + VARIANCE_EPS

    def forward(self, student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
        """The negative log-likelihood of the teacher feature under q(· | student feature)."""
        if self.spatial:
            student_feat, teacher_feat = pooled_to_common_size(student_feat, teacher_feat)
            mean = self.mean(student_feat)
        else:
            mean = self.mean(student_feat.flatten(1)).view(len(student_feat), *self.teacher_shape)
        return gaussian_nll(mean, teacher_feat, self.variance())


class VID(FeatureMethod):
    """Variational information distillation (Ahn et al., CVPR 2019):

        vid = vid_weight · Σ_pairs mean ½·(log σ² + (t − μ(s))²/σ²)

    with one learned ``VariationalRegressor`` per layer pair (trained with the student, counted in
    its extra parameters). Default layers: every stage of each model, paired from the output side
    when the depths differ. Logs ``vid``, which goes below zero once the variances fall under 1.
    """

    default_layers = "stages"

    def __init__(
        self,
        vid_weight: Weight,
        init_variance: InitVariance,
        student_layers: str | Sequence[str] | None,
        teacher_layers: str | Sequence[str] | None,
        kd: KDTerm,
    ) -> None:
        super().__init__(kd, student_layers, teacher_layers)
        self.vid_weight, self.init_variance = float(vid_weight), float(init_variance)
        self.regressors = nn.ModuleList()

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        self.regressors = nn.ModuleList(
            VariationalRegressor(s, t, self.init_variance) for s, t in zip(student_shapes, teacher_shapes)
        )

    def feature_terms(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> dict[str, Tensor]:
        total = sum(q(s, t) for q, s, t in zip(self.regressors, student_feats, teacher_feats))
        return {"vid": self.vid_weight * total}

    def extra_repr(self) -> str:
        return (
            f"vid_weight={self.vid_weight}, init_variance={self.init_variance}, lam={self.lam}, "
            f"temperature={self.temperature}"
        )
