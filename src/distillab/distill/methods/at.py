"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017), ``distill=at``:

    loss = (1 − kd.lam)·CE + kd.lam·T²·KL + at_weight · Σ_pairs mean_{n, j} (q_s − q_t)²,
    q = normalize(mean_c |f|^p)

over pairs of layers taken by position (module paths; null = every stage of each model, paired
from the output side when the depths differ). The larger map of a pair is average-pooled to the
smaller size. The original code weights the same sum by β/2 with β = 1000, i.e. ``at_weight=500``.
Needs N×C×H×W feature maps on both sides.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor

from distillab.distill.methods.base import FeatureMethod, KDTerm
from distillab.settings import Range, Weight

#: the exponent p of the attention maps
Exponent = Annotated[float, Range(0, low_open=True, what="an exponent", note="2 in the paper")]


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    """Spatial attention of an N×C×H×W map (Zagoruyko & Komodakis, 2017): the mean over channels
    of |f|^p, flattened to N×(H·W) and L2-normalised per sample. |f| is clamped at 1e-12 so that
    an exponent p < 1 keeps a finite gradient where an activation is exactly zero."""
    return F.normalize(feature.abs().clamp_min(1e-12).pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(student_feat: Tensor, teacher_feat: Tensor, p: float = 2.0) -> Tensor:
    """Attention transfer between one pair of maps: the mean over the batch and the H·W positions
    of (q_s − q_t)², q = ``attention_map`` — that is (1/N)·Σ_n ‖q_s − q_t‖² / (H·W).

    The mean over positions is the convention of the authors' code and of the CRD benchmark code,
    on whose scale ``at_weight`` = 1000 is set. When the spatial sizes differ, the larger feature
    map is adaptive-average-pooled to the smaller size before its attention is taken (as in the
    CRD code); the channel counts need not agree.
    """
    s_size, t_size = tuple(student_feat.shape[2:]), tuple(teacher_feat.shape[2:])
    if s_size != t_size:
        size = (min(s_size[0], t_size[0]), min(s_size[1], t_size[1]))
        student_feat = F.adaptive_avg_pool2d(student_feat, size) if s_size != size else student_feat
        teacher_feat = F.adaptive_avg_pool2d(teacher_feat, size) if t_size != size else teacher_feat
    return (attention_map(student_feat, p) - attention_map(teacher_feat, p)).pow(2).mean()


class AttentionTransfer(FeatureMethod):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017):

        at = at_weight · Σ_pairs mean_{n, j} (q_s − q_t)²,   q = normalize(mean_c |f|^p)

    over pairs of layers taken by position (``at_loss``). Default layers: every stage of each
    model (the outputs of ``layer1``…, ``stages.i``, ``block i``), paired from the output side
    when the depths differ. The original code weights the same sum by β/2 with β = 1000, i.e.
    ``at_weight=500``. Needs N×C×H×W maps on both sides; logs ``at``.
    """

    default_layers = "stages"

    def __init__(
        self,
        at_weight: Weight,
        p: Exponent,
        student_layers: str | Sequence[str] | None,
        teacher_layers: str | Sequence[str] | None,
        kd: KDTerm,
    ) -> None:
        super().__init__(kd, student_layers, teacher_layers)
        self.at_weight, self.p = float(at_weight), float(p)

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        self.require_maps(student_shapes, teacher_shapes, "at")

    def feature_terms(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> dict[str, Tensor]:
        total = sum(at_loss(s, t, self.p) for s, t in zip(student_feats, teacher_feats))
        return {"at": self.at_weight * total}

    def extra_repr(self) -> str:
        return f"at_weight={self.at_weight}, p={self.p}, lam={self.lam}, temperature={self.temperature}"
