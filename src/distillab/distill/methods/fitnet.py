"""FitNets (Romero et al., ICLR 2015), ``distill=fitnet``:

    loss = (1 − kd.lam)·CE(y, s) + kd.lam·T²·KL(softmax(t/T) ‖ softmax(s/T)) + hint_weight·MSE(r(f_s), f_t)

between one student layer f_s and one teacher layer f_t (module paths; null = the middle stage
of each model), r a learned regressor when the shapes differ (identity when they match): a 1×1
conv + BN between feature maps, as in the CRD benchmark code, a linear layer otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillab.distill.methods.base import FeatureMethod, KDTerm
from distillab.settings import Weight


def hint_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """FitNet hint: mean squared error between the (regressed) student and the teacher feature."""
    return F.mse_loss(student_feat, teacher_feat)


def _spatial(shape: torch.Size) -> bool:
    return len(shape) == 4


class Regressor(nn.Module):
    """Maps a student feature onto the teacher's shape: a 1×1 conv + BN (FitNet's regressor as in
    the CRD benchmark code) when both are maps, resampled to the teacher's spatial size when the
    sizes differ; a linear layer on flattened features otherwise."""

    def __init__(self, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
        super().__init__()
        self.teacher_shape = tuple(teacher_shape[1:])
        self.spatial = _spatial(student_shape) and _spatial(teacher_shape)
        if self.spatial:
            self.map = nn.Sequential(
                nn.Conv2d(student_shape[1], teacher_shape[1], 1, bias=False), nn.BatchNorm2d(teacher_shape[1])
            )
        else:
            self.map = nn.Linear(int(torch.Size(student_shape[1:]).numel()), int(torch.Size(teacher_shape[1:]).numel()))

    def forward(self, x: Tensor) -> Tensor:
        if not self.spatial:
            return self.map(x.flatten(1)).view(len(x), *self.teacher_shape)
        if tuple(x.shape[2:]) != self.teacher_shape[1:]:
            x = F.adaptive_avg_pool2d(x, self.teacher_shape[1:])
        return self.map(x)


class FitNet(FeatureMethod):
    """FitNets (Romero et al., ICLR 2015): ``hint_weight``·MSE(r(f_s), f_t) between one student
    layer and one teacher layer, r a learned regressor when the shapes differ (identity when
    they match). Default layers: the middle stage of each model; logs ``hint``."""

    default_layers = "middle"
    student_key = "distill.student_layer"
    teacher_key = "distill.teacher_layer"

    def __init__(self, hint_weight: Weight, student_layer: str | None, teacher_layer: str | None, kd: KDTerm) -> None:
        super().__init__(kd, student_layer, teacher_layer)
        self.hint_weight = float(hint_weight)
        self.regressor: nn.Module = nn.Identity()

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        (student_shape,), (teacher_shape,) = student_shapes, teacher_shapes
        if student_shape[1:] != teacher_shape[1:]:
            self.regressor = Regressor(student_shape, teacher_shape)

    def feature_terms(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> dict[str, Tensor]:
        (student_feat,), (teacher_feat,) = student_feats, teacher_feats
        return {"hint": self.hint_weight * hint_loss(self.regressor(student_feat), teacher_feat)}

    def extra_repr(self) -> str:
        return f"hint_weight={self.hint_weight}, lam={self.lam}, temperature={self.temperature}"
