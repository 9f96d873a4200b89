"""Distillation methods beyond Hinton KD.

Each method is a pure function holding its maths, checked by the tests against independent
computations, and a small ``DistillLoss`` module that configs instantiate
(``conf/distill/<method>.yaml``). Feature methods add their own weighted term to the
cross-entropy and KD terms of ``kd_terms``:

    loss = (1 − λ)·CE(y, s) + λ·T²·KL(softmax(t/T) ‖ softmax(s/T)) + weight · feature term

with λ = ``distill.kd.lam`` and T = ``distill.kd.temperature``. The defaults follow the
CIFAR-100 recipes of the benchmark tables (Tian et al., CRD, ICLR 2020): CE plus the feature
term, no KD term (λ = 0). Decoupled KD (``DKDLoss``) is a logit method with weights of its own.
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
from distillab.distill.labels import UNLABELLED, labelled_cross_entropy
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


def _check_weight(value: float, name: str) -> float:
    if not value >= 0:
        raise ValueError(f"{name}={value}: must be >= 0")
    return float(value)


# -- attention transfer -----------------------------------------------------------------------------
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


class ATLoss(FeatureDistillLoss):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017):

        at = at_weight · Σ_pairs mean_{n, j} (q_s − q_t)²,   q = normalize(mean_c |f|^p)

    over pairs of layers taken by position (``at_loss``). Default layers: every stage of each
    model (the outputs of ``layer1``…, ``stages.i``, ``block i``), paired from the output side
    when the depths differ; weight 1000 and p = 2 (CRD recipe). The original code weights the
    same sum by β/2 with β = 1000, i.e. ``at_weight=500``. Needs N×C×H×W maps on both sides.
    """

    method = "at"
    default_layers = "stages"

    def __init__(self, at_weight: float = 1000.0, p: float = 2.0, student_layers: str | Sequence[str] | None = None,
                 teacher_layers: str | Sequence[str] | None = None, kd: dict[str, Any] | None = None) -> None:
        super().__init__(kd, student_layers, teacher_layers)
        self.at_weight = _check_weight(at_weight, "at_weight")
        if not p > 0:
            raise ValueError(f"p={p}: must be > 0 (2 in the paper)")
        self.p = float(p)

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        for role, key, paths, shapes in (("student", self.student_key, self.student_paths, student_shapes),
                                         ("teacher", self.teacher_key, self.teacher_paths, teacher_shapes)):
            for path, shape in zip(paths, shapes):
                if not _spatial(shape):
                    raise ConfigError(
                        f"{key}: distill=at needs N×C×H×W feature maps, but {role} layer {path!r} gives shape "
                        f"{list(shape)}; use a convolutional {role} (e.g. {role}=cnn) or set {key} to conv layers"
                    )

    def feature_terms(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> dict[str, Tensor]:
        total = sum(at_loss(s, t, self.p) for s, t in zip(student_feats, teacher_feats))
        return {"at": self.at_weight * total}

    def extra_repr(self) -> str:
        return f"at_weight={self.at_weight}, p={self.p}, lam={self.lam}, temperature={self.temperature}"


# -- similarity-preserving KD ------------------------------------------------------------------------
def similarity_matrix(feature: Tensor) -> Tensor:
    """The b×b similarities f·fᵀ of the batch's flattened features, each row L2-normalised."""
    flat = feature.flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


def sp_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """Similarity-preserving loss of one layer pair: ‖G_s − G_t‖²_F / b², G = ``similarity_matrix``.
    Student and teacher features may have any (different) shapes: only the b×b matrices meet."""
    b = len(student_feat)
    return (similarity_matrix(student_feat) - similarity_matrix(teacher_feat)).pow(2).sum() / b**2


class SPLoss(FeatureDistillLoss):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019):

        sp = sp_weight · Σ_pairs ‖G_s − G_t‖²_F / b²,   G = row-normalised f·fᵀ over the batch

    (``sp_loss``). Default layer: the last stage of each model; weight 3000 (CRD recipe).
    """

    method = "sp"
    default_layers = "last"

    def __init__(self, sp_weight: float = 3000.0, student_layers: str | Sequence[str] | None = None,
                 teacher_layers: str | Sequence[str] | None = None, kd: dict[str, Any] | None = None) -> None:
        super().__init__(kd, student_layers, teacher_layers)
        self.sp_weight = _check_weight(sp_weight, "sp_weight")

    def feature_terms(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> dict[str, Tensor]:
        return {"sp": self.sp_weight * sum(sp_loss(s, t) for s, t in zip(student_feats, teacher_feats))}

    def extra_repr(self) -> str:
        return f"sp_weight={self.sp_weight}, lam={self.lam}, temperature={self.temperature}"


# -- relational KD ----------------------------------------------------------------------------------
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


class RKDLoss(FeatureDistillLoss):
    """Relational KD (Park et al., CVPR 2019):

        rkd_distance = distance_weight · Huber(ψ_D(s), ψ_D(t)),   rkd_angle = angle_weight · Huber(ψ_A(s), ψ_A(t))

    on one layer's flattened features (``rkd_distance_loss``, ``rkd_angle_loss``); the two terms
    are logged apart. Default layer: the embedding (input of the last linear layer); weights
    25 and 50 (paper and CRD recipe). Student and teacher dimensions may differ.
    """

    method = "rkd"
    default_layers = "embedding"
    student_key, teacher_key = "distill.student_layer", "distill.teacher_layer"

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0, student_layer: str | None = None,
                 teacher_layer: str | None = None, kd: dict[str, Any] | None = None) -> None:
        super().__init__(kd, student_layer, teacher_layer)
        self.distance_weight = _check_weight(distance_weight, "distance_weight")
        self.angle_weight = _check_weight(angle_weight, "angle_weight")

    def feature_terms(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> dict[str, Tensor]:
        (student_feat,), (teacher_feat,) = student_feats, teacher_feats
        zero = student_feat.new_zeros(())
        # a term whose weight is zero is not computed (the angle term is b³ in memory)
        distance = rkd_distance_loss(student_feat, teacher_feat) if self.distance_weight > 0 else zero
        angle = rkd_angle_loss(student_feat, teacher_feat) if self.angle_weight > 0 else zero
        return {"rkd_distance": self.distance_weight * distance, "rkd_angle": self.angle_weight * angle}

    def extra_repr(self) -> str:
        return (f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}, lam={self.lam}, "
                f"temperature={self.temperature}")


# -- probabilistic knowledge transfer ---------------------------------------------------------------
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


class PKTLoss(FeatureDistillLoss):
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018):

        pkt = pkt_weight · KL(P_t ‖ P_s),   P = row-normalised (cos + 1)/2 over the batch

    on one layer's flattened features (``pkt_loss``). Default layer: the embedding (input of the
    last linear layer); weight 30000 (CRD recipe). Student and teacher dimensions may differ.
    """

    method = "pkt"
    default_layers = "embedding"
    student_key, teacher_key = "distill.student_layer", "distill.teacher_layer"

    def __init__(self, pkt_weight: float = 30000.0, student_layer: str | None = None, teacher_layer: str | None = None,
                 kd: dict[str, Any] | None = None) -> None:
        super().__init__(kd, student_layer, teacher_layer)
        self.pkt_weight = _check_weight(pkt_weight, "pkt_weight")

    def feature_terms(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> dict[str, Tensor]:
        (student_feat,), (teacher_feat,) = student_feats, teacher_feats
        return {"pkt": self.pkt_weight * pkt_loss(student_feat, teacher_feat)}

    def extra_repr(self) -> str:
        return f"pkt_weight={self.pkt_weight}, lam={self.lam}, temperature={self.temperature}"


# -- decoupled KD -----------------------------------------------------------------------------------
def _binary_log_probs(log_probs: Tensor, target_mask: Tensor) -> Tensor:
    """log [p_target, 1 − p_target] per sample, the non-target mass summed in log space."""
    target = log_probs[target_mask]  # one entry per row
    other = log_probs.masked_fill(target_mask, float("-inf")).logsumexp(dim=1)
    return torch.stack([target, other], dim=1)


def _kl_rows(log_p_teacher: Tensor, log_p_student: Tensor) -> Tensor:
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)


def dkd_parts(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float,
              reduction: str = "mean") -> tuple[Tensor, Tensor]:
    """Unweighted (TCKD, NCKD) of decoupled KD (Zhao et al., CVPR 2022), both at temperature T.

    TCKD = KL(b_t ‖ b_s) between the binary distributions [p_target, 1 − p_target];
    NCKD = KL(p̂_t ‖ p̂_s) between the distributions among the non-target classes alone.
    The non-target logits are gathered into a b×(C − 1) tensor, which is the published code's
    masking of the target logit with a large negative value before the softmax, taken exactly.
    Per sample, KD = TCKD + (1 − p_target^teacher)·NCKD (the paper's equation 4).
    ``reduction``: ``mean`` over the batch or ``none`` (per sample).
    """
    n, classes = student_logits.shape
    target_mask = F.one_hot(targets, classes).bool()
    s, t = student_logits / temperature, teacher_logits / temperature
    tckd = _kl_rows(_binary_log_probs(F.log_softmax(t, dim=1), target_mask),
                    _binary_log_probs(F.log_softmax(s, dim=1), target_mask))
    others = ~target_mask
    nckd = _kl_rows(F.log_softmax(t[others].view(n, classes - 1), dim=1),
                    F.log_softmax(s[others].view(n, classes - 1), dim=1))
    if reduction == "none":
        return tckd, nckd
    if reduction != "mean":
        raise ValueError(f"reduction={reduction!r}: must be 'mean' or 'none'")
    return tckd.mean(), nckd.mean()


def dkd_warmup(epoch: int, warmup_epochs: int) -> float:
    """The DKD terms' weight at the 0-based ``epoch``: min((epoch + 1)/warmup_epochs, 1), 1 without
    warm-up. The published code counts epochs from 1 and uses min(epoch/warmup, 1): the same ramp."""
    if warmup_epochs <= 0:
        return 1.0
    return min((epoch + 1) / warmup_epochs, 1.0)


class DKDLoss(DistillLoss):
    """Decoupled knowledge distillation (Zhao et al., CVPR 2022), a logit method:

        ce = ce_weight·CE(y, s),  tckd = w·alpha·T²·TCKD,  nckd = w·beta·T²·NCKD

    (``dkd_parts``), w = ``dkd_warmup(epoch, warmup_epochs)`` set at each epoch start. Defaults
    α = 1, β = 8, T = 4, 20 warm-up epochs: the paper's CIFAR-100 recipe. A sample without a
    label (target ``UNLABELLED``, see ``distill.labels``) is left out of the cross-entropy, and
    TCKD/NCKD take the teacher's predicted class as its target class.
    """

    needs_teacher = True
    method = "dkd"

    def __init__(self, ce_weight: float = 1.0, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 warmup_epochs: int = 20) -> None:
        super().__init__()
        self.ce_weight = _check_weight(ce_weight, "ce_weight")
        self.alpha = _check_weight(alpha, "alpha")
        self.beta = _check_weight(beta, "beta")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature}: must be > 0")
        if not warmup_epochs >= 0:
            raise ValueError(f"warmup_epochs={warmup_epochs}: must be >= 0")
        self.temperature, self.warmup_epochs = float(temperature), int(warmup_epochs)
        self.warmup = dkd_warmup(0, self.warmup_epochs)

    def on_epoch_start(self, epoch: int) -> None:
        self.warmup = dkd_warmup(epoch, self.warmup_epochs)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
                student_feats: Sequence[Tensor] = (), teacher_feats: Sequence[Tensor] = ()) -> dict[str, Tensor]:
        teacher_logits = teacher_logits.detach()
        labelled = targets != UNLABELLED
        zero = student_logits.new_zeros(())
        ce = self.ce_weight * labelled_cross_entropy(student_logits, targets) if self.ce_weight > 0 else zero
        kd_targets = torch.where(labelled, targets, teacher_logits.argmax(dim=1))
        tckd, nckd = dkd_parts(student_logits, teacher_logits, kd_targets, self.temperature)
        scale = self.warmup * self.temperature**2
        terms = {"ce": ce, "tckd": scale * self.alpha * tckd, "nckd": scale * self.beta * nckd}
        terms["loss"] = terms["ce"] + terms["tckd"] + terms["nckd"]
        return terms

    def extra_repr(self) -> str:
        return (f"ce_weight={self.ce_weight}, alpha={self.alpha}, beta={self.beta}, "
                f"temperature={self.temperature}, warmup_epochs={self.warmup_epochs}")
