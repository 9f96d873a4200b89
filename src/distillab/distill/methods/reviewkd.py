"""Distilling knowledge via knowledge review (Chen et al., CVPR 2021), ``distill=reviewkd``:

    loss = (1 − kd.lam)·CE + kd.lam·T²·KL + w(epoch) · hcl_weight · Σ_levels HCL(F_i, f_t,i)

Each level's student feature passes through an attention-based fusion module (ABF), from the
deepest level to the shallowest: a 1×1 conv + BN to ``mid`` channels, fused with the deeper
level's fused map (resized to this level, nearest neighbour) through two spatial attention maps
(1×1 conv on the concatenation, sigmoid), then resized to the teacher's map and turned into the
teacher's channels by a 3×3 conv + BN: F_i. HCL, the hierarchical context loss, is the MSE at
full resolution plus the MSEs after adaptive average pooling to 4×4, 2×2 and 1×1 (only the sizes
smaller than the map), weighted 1, 1/2, 1/4, … in that order and divided by the sum of the
weights used. w = min((epoch + 1)/warmup_epochs, 1) with 0-based epochs (1 without warm-up).

Levels, as in the authors' CIFAR-100 code (dvlab-research/ReviewKD, ``CIFAR-100/model/reviewkd.py``
and ``train.py``): every stage output of the student and the teacher's pre-activation at the end
of every stage (``ofd.preactivation_paths``), then the pooled embedding of each (the input of the
last linear layer, as a 1×1 map); ``mid`` = min(``max_mid_channels``, channels of the student's
deepest level).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillab.distill.hooks import default_paths
from distillab.distill.methods.base import FeatureMethod, KDTerm
from distillab.distill.methods.dkd import dkd_warmup
from distillab.distill.methods.ofd import check_readable, layer_pair, layers_given, preactivation_paths
from distillab.settings import ConfigError, Range, Weight

#: the length of the warm-up of the HCL term
WarmupEpochs = Annotated[int, Range(0, what="epochs", note="the HCL term ramps up over them; 0 = no warm-up")]
#: the cap on the ABFs' inner channel count
MidChannels = Annotated[int, Range(1, what="channels", note="512 in the authors' code")]

#: the pooled sizes of the hierarchical context loss, each weighted half the one before
HCL_SIZES = (4, 2, 1)


# -- the maths -----------------------------------------------------------------------------------------
def hcl_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """The hierarchical context loss between two N×C×H×W maps of one shape: MSE(s, t) plus, for
    each size k of 4, 2, 1 smaller than the map (k < min(H, W)), MSE(pool_k(s), pool_k(t))
    with adaptive average pooling, weighted 1, 1/2, 1/4, … in the order used, the sum divided
    by the sum of those weights (the authors' ``hcl``, which compares k with H of square maps)."""
    loss = F.mse_loss(student, teacher)
    weight = total = 1.0
    smallest = min(student.shape[2:])
    for size in HCL_SIZES:
        if size >= smallest:
            continue
        weight /= 2
        pooled = F.mse_loss(F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size))
        loss = loss + weight * pooled
        total += weight
    return loss / total


def as_map(feature: Tensor) -> Tensor:
    """An N×C vector (a pooled embedding) as an N×C×1×1 map; a map as it is."""
    return feature[:, :, None, None] if feature.dim() == 2 else feature


class ABF(nn.Module):
    """Attention-based fusion of one level: ``to_mid`` (1×1 conv + BN) maps the student feature to
    ``mid`` channels; with ``fuse``, the deeper level's fused map, resized to this level (nearest),
    is mixed in by two sigmoid attention maps from a 1×1 conv on the concatenation,
    x·a₀ + y·a₁; the result, resized to the teacher's size (nearest) when it differs, goes
    through ``to_teacher`` (3×3 conv + BN) to the teacher's channels. Conv weights are
    initialised as in the authors' code (Kaiming uniform, a = 1)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.to_mid = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        self.to_teacher = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        nn.init.kaiming_uniform_(self.to_mid[0].weight, a=1)
        nn.init.kaiming_uniform_(self.to_teacher[0].weight, a=1)

    def forward(self, x: Tensor, deeper: Tensor | None, out_size: Sequence[int]) -> tuple[Tensor, Tensor]:
        """``(output, fused)``: the map compared with the teacher and the fused map handed to the
        next shallower level."""
        x = self.to_mid(x)
        if self.attention is not None:
            if deeper is None:
                raise ValueError("a fusing ABF needs the deeper level's fused map")
            deeper = F.interpolate(deeper, size=tuple(x.shape[2:]), mode="nearest")
            weights = self.attention(torch.cat([x, deeper], dim=1))
            x = x * weights[:, :1] + deeper * weights[:, 1:]
        if tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.to_teacher(x), x


def review(
    abfs: Sequence[ABF], student_feats: Sequence[Tensor], teacher_sizes: Sequence[Sequence[int]]
) -> list[Tensor]:
    """The fused student maps F_i, one per level (shallowest first), computed from the deepest
    level down: level i's ABF takes the student feature of level i and level i + 1's fused map."""
    outputs: list[Tensor] = []
    deeper = None
    for abf, feature, size in zip(reversed(abfs), reversed(student_feats), reversed(teacher_sizes)):
        out, deeper = abf(as_map(feature), deeper, size)
        outputs.insert(0, out)
    return outputs


# -- the module ----------------------------------------------------------------------------------------
class ReviewKD(FeatureMethod):
    """Distilling knowledge via knowledge review (Chen et al., CVPR 2021):

        hcl = w · hcl_weight · Σ_levels hcl_loss(F_i, f_t,i)

    F_i the fused student maps (``review`` through one ``ABF`` per level), w =
    ``dkd_warmup(epoch, warmup_epochs)`` set at each epoch start. Levels are paired by position
    (from the output side when the default depths differ); a flat feature is a 1×1 map. Default
    layers: the student's stage outputs and the teacher's pre-activations at the end of each
    stage, then each model's pooled embedding. Logs ``hcl``.
    """

    default_layers = "stages"  # with the embedding after them, see ``bind``

    def __init__(
        self,
        hcl_weight: Weight,
        warmup_epochs: WarmupEpochs,
        max_mid_channels: MidChannels,
        student_layers: str | Sequence[str] | None,
        teacher_layers: str | Sequence[str] | None,
        kd: KDTerm,
    ) -> None:
        super().__init__(kd, student_layers, teacher_layers)
        self.hcl_weight, self.warmup_epochs = float(hcl_weight), int(warmup_epochs)
        self.max_mid_channels = int(max_mid_channels)
        self.warmup = dkd_warmup(0, self.warmup_epochs)
        self.abfs = nn.ModuleList()
        self.teacher_sizes: list[tuple[int, ...]] = []

    def on_epoch_start(self, epoch: int) -> None:
        """Set the warm-up weight w of the 0-based ``epoch``."""
        self.warmup = dkd_warmup(epoch, self.warmup_epochs)

    def bind(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        example: Tensor,
        same_architecture: bool = False,
        train_size: int | None = None,
    ) -> None:
        """Resolve the levels (stage outputs of the student, pre-activations of the teacher, each
        followed by its embedding) and build the ABFs (``FeatureMethod.bind``)."""
        if teacher is None:  # the base says in one line that a teacher is needed
            super().bind(student, teacher, example, same_architecture, train_size)
            return

        def student_rule(model: nn.Module, key: str) -> list[str]:
            return default_paths(model, "stages", key) + default_paths(model, "embedding", key)

        def teacher_rule(model: nn.Module, key: str) -> list[str]:
            return preactivation_paths(model, example, key) + default_paths(model, "embedding", key)

        student_paths, teacher_paths = layer_pair(self, student, teacher, same_architecture, student_rule, teacher_rule)
        check_readable(student, student_paths, self.student_key, "reviewkd")
        check_readable(teacher, teacher_paths, self.teacher_key, "reviewkd")
        with layers_given(self, student_paths, teacher_paths):
            super().bind(student, teacher, example, same_architecture, train_size)

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        for role, key, paths, shapes in (
            ("student", self.student_key, self.student_paths, student_shapes),
            ("teacher", self.teacher_key, self.teacher_paths, teacher_shapes),
        ):
            for path, shape in zip(paths, shapes):
                if len(shape) not in (2, 4):
                    raise ConfigError(
                        f"{key}: distill=reviewkd needs N×C×H×W maps or N×C vectors (1×1 maps), but {role} layer "
                        f"{path!r} gives shape {list(shape)}; set {key} to conv layers or embeddings"
                    )
        mid = min(self.max_mid_channels, int(student_shapes[-1][1]))
        last = len(student_shapes) - 1
        self.abfs = nn.ModuleList(
            ABF(int(s[1]), mid, int(t[1]), fuse=i < last)
            for i, (s, t) in enumerate(zip(student_shapes, teacher_shapes))
        )
        self.teacher_sizes = [tuple(int(d) for d in t[2:]) if len(t) == 4 else (1, 1) for t in teacher_shapes]

    def feature_terms(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> dict[str, Tensor]:
        fused = review(self.abfs, student_feats, self.teacher_sizes)
        total = sum((hcl_loss(f, as_map(t)) for f, t in zip(fused, teacher_feats)), student_feats[0].new_zeros(()))
        return {"hcl": self.warmup * self.hcl_weight * total}

    def extra_repr(self) -> str:
        return (
            f"hcl_weight={self.hcl_weight}, warmup_epochs={self.warmup_epochs}, "
            f"max_mid_channels={self.max_mid_channels}, lam={self.lam}, temperature={self.temperature}"
        )
