"""Distillation methods beyond Hinton KD.

Each method is a pure function holding its maths, checked by the tests against independent
computations, and a small ``DistillLoss`` module that configs instantiate
(``conf/distill/<method>.yaml``). Feature methods add their own weighted term to the
cross-entropy and KD terms of ``kd_terms``:

    loss = (1 − λ)·CE(y, s) + λ·T²·KL(softmax(t/T) ‖ softmax(s/T)) + weight · feature term

with λ = ``distill.kd.lam`` and T = ``distill.kd.temperature``. The defaults follow the
CIFAR-100 recipes of the benchmark tables (Tian et al., CRD, ICLR 2020): CE plus the feature
term, no KD term (λ = 0).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillab.config import ConfigError
from distillab.distill.hooks import FeatureTaps, default_paths
from distillab.distill.losses import DistillLoss, kd_terms


# -- shared machinery -----------------------------------------------------------------------------
def _as_list(value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


@torch.no_grad()
def feature_shapes(model: nn.Module, paths: Sequence[str], example: Tensor, key: str) -> list[torch.Size]:
    """The shapes of the features at ``paths`` for ``example``, without touching the model's
    state (eval mode for the pass: BatchNorm statistics are not updated)."""
    taps = FeatureTaps(model, paths, key)
    was_training = model.training
    try:
        model.eval()
        model(example)
        return [feature.shape for feature in taps.take()]
    finally:
        taps.remove()
        model.train(was_training)


class FeatureDistillLoss(DistillLoss, abc.ABC):
    """CE and KD terms (``kd_terms``) plus a weighted term between student and teacher features.

    Subclasses set ``default_layers`` (``stages``, ``middle``, ``last`` or ``embedding``, see
    ``distill.hooks.default_paths``) and implement ``feature_terms``; ``build`` may create
    learned modules from the feature shapes (a regressor when shapes differ).
    """

    default_layers = "last"
    #: config keys of the layer lists, for error messages
    student_key, teacher_key = "distill.student_layers", "distill.teacher_layers"

    def __init__(self, kd: dict[str, Any] | None = None, student_layers: str | Sequence[str] | None = None,
                 teacher_layers: str | Sequence[str] | None = None) -> None:
        super().__init__()
        kd = dict(kd or {})
        self.lam = float(kd.get("lam", 0.0))
        self.temperature = float(kd.get("temperature", 4.0))
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"kd.lam={self.lam}: must be in [0, 1]")
        if not self.temperature > 0:
            raise ValueError(f"kd.temperature={self.temperature}: must be > 0")
        self.student_layers = _as_list(student_layers)
        self.teacher_layers = _as_list(teacher_layers)

    def bind(self, student: nn.Module, teacher: nn.Module | None, example: Tensor,
             same_architecture: bool = False) -> None:
        if teacher is None:
            raise ConfigError(f"distill={self.method} needs a teacher")
        student_paths = self.student_layers or default_paths(student, self.default_layers, self.student_key)
        if same_architecture:
            teacher_paths = student_paths
        else:
            teacher_paths = self.teacher_layers or default_paths(teacher, self.default_layers, self.teacher_key)
        if len(student_paths) != len(teacher_paths) and not (self.student_layers or self.teacher_layers):
            # default stages of models of different depth: pair them from the output side, where
            # the resolutions agree (a 2-stage student and a 3-stage teacher: the last two of each)
            n = min(len(student_paths), len(teacher_paths))
            student_paths, teacher_paths = student_paths[-n:], teacher_paths[-n:]
        if len(student_paths) != len(teacher_paths):
            raise ConfigError(
                f"{self.student_key} and {self.teacher_key} must pair up, got {len(student_paths)} student layers "
                f"{student_paths} and {len(teacher_paths)} teacher layers {teacher_paths}"
            )
        student_shapes = feature_shapes(student, student_paths, example, self.student_key)
        teacher_shapes = feature_shapes(teacher, teacher_paths, example, self.teacher_key)
        self.student_paths, self.teacher_paths = list(student_paths), list(teacher_paths)
        self.build(student_shapes, teacher_shapes)

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        """Check the shapes and create any learned modules; the default needs none."""

    @abc.abstractmethod
    def feature_terms(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> dict[str, Tensor]:
        """The method's weighted terms; teacher features arrive detached."""

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | None, targets: Tensor,
                student_feats: Sequence[Tensor] = (), teacher_feats: Sequence[Tensor] = ()) -> dict[str, Tensor]:
        if teacher_logits is None:
            teacher_logits = student_logits.detach()  # only read when lam > 0, which needs a teacher
        terms = kd_terms(student_logits, teacher_logits, targets, self.lam, self.temperature)
        terms.update(self.feature_terms(student_feats, [f.detach() for f in teacher_feats]))
        terms["loss"] = sum(terms.values())
        return terms


def _spatial(shape: torch.Size) -> bool:
    return len(shape) == 4


# -- FitNet -----------------------------------------------------------------------------------------
def hint_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """FitNet hint: mean squared error between the (regressed) student and the teacher feature."""
    return F.mse_loss(student_feat, teacher_feat)


class Regressor(nn.Module):
    """Maps a student feature onto the teacher's shape: a 1×1 conv + BN (FitNet's regressor as in
    the CRD benchmark code) when both are maps, resampled to the teacher's spatial size when the
    sizes differ; a linear layer on flattened features otherwise."""

    def __init__(self, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
        super().__init__()
        self.teacher_shape = tuple(teacher_shape[1:])
        self.spatial = _spatial(student_shape) and _spatial(teacher_shape)
        if self.spatial:
            self.map = nn.Sequential(nn.Conv2d(student_shape[1], teacher_shape[1], 1, bias=False),
                                     nn.BatchNorm2d(teacher_shape[1]))
        else:
            self.map = nn.Linear(int(torch.Size(student_shape[1:]).numel()), int(torch.Size(teacher_shape[1:]).numel()))

    def forward(self, x: Tensor) -> Tensor:
        if not self.spatial:
            return self.map(x.flatten(1)).view(len(x), *self.teacher_shape)
        if tuple(x.shape[2:]) != self.teacher_shape[1:]:
            x = F.adaptive_avg_pool2d(x, self.teacher_shape[1:])
        return self.map(x)


class FitNetLoss(FeatureDistillLoss):
    """FitNets (Romero et al., ICLR 2015): ``hint_weight``·MSE(r(f_s), f_t) between one student
    layer and one teacher layer, r a learned regressor when the shapes differ (identity when
    they match). Default layers: the middle stage of each model; weight 100 (CRD recipe)."""

    method = "fitnet"
    default_layers = "middle"
    student_key, teacher_key = "distill.student_layer", "distill.teacher_layer"

    def __init__(self, hint_weight: float = 100.0, student_layer: str | None = None,
                 teacher_layer: str | None = None, kd: dict[str, Any] | None = None) -> None:
        super().__init__(kd, student_layer, teacher_layer)
        if not hint_weight >= 0:
            raise ValueError(f"hint_weight={hint_weight}: must be >= 0")
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
