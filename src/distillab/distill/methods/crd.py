"""Contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020), ``distill=crd``:

    loss = (1 − kd.lam)·CE + kd.lam·T²·KL + crd_weight·(L_s + L_t)

on one layer of each model (module paths; null = the input of each model's last linear layer),
flattened. Two heads, a linear layer to ``feat_dim`` then L2 normalisation, embed the student's
feature as v_s and the teacher's as v_t. A memory bank keeps, for every training sample, a
momentum average of its past v_s (student memory) and v_t (teacher memory). For each sample i of
the batch, its own row of the other network's memory is the positive and ``nce_k`` rows of other
training samples (drawn uniformly) are negatives; a row m scores h = exp(m·v/τ)/Z, and

    L = −Σ_i [ log(h_i⁺ / (h_i⁺ + K/N)) + Σ_k log((K/N) / (h_ik + K/N)) ] / B

is the NCE loss with noise distribution P_n = 1/N (N training samples, K negatives, batch B; the
paper's eq. 18 as in the authors' code). L_s has the student's v_s as anchors against the
teacher memory, L_t the teacher's v_t against the student memory. Z is estimated once per
direction, on the first batch: the mean of its exp(m·v/τ) times N. After the scores, the batch's
rows of each memory move to normalise(momentum·m + (1 − momentum)·v), without gradient.

The memory is indexed by the training samples, so the training batches carry their indices
(``needs_index``); the live teacher is needed for its embedding, so cached teacher outputs
(``teacher_outputs.cache``) never apply.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Annotated

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from distillab.distill.methods.base import FeatureMethod, KDTerm
from distillab.settings import ConfigError, Count, Range, Temperature, Weight

log = logging.getLogger(__name__)

#: added to the denominators of the NCE posteriors, as in the authors' code
EPS = 1e-7

Momentum = Annotated[
    float, Range(0, 1, high_open=True, what="a momentum", note="the share of a memory row kept at each update")
]


# -- the maths ----------------------------------------------------------------------------------------
def nce_loss(scores: Tensor, train_size: int, eps: float = EPS) -> Tensor:
    """The NCE loss of one direction. ``scores``: B×(1 + K) normalised scores h = exp(m·v/τ)/Z,
    column 0 the positive, the others the K negatives; noise P_n = 1/``train_size``:

        −Σ_i [ log(h_i0 / (h_i0 + K·P_n + eps)) + Σ_k log(K·P_n / (h_ik + K·P_n + eps)) ] / B
    """
    noise = (scores.shape[1] - 1) / float(train_size)
    positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))
    negative = torch.log(noise / (scores[:, 1:] + noise + eps))
    return -(positive.sum() + negative.sum()) / len(scores)


def contrast_scores(anchors: Tensor, memory: Tensor, rows: Tensor, temperature: float) -> Tensor:
    """exp(m_j·v_i/τ) for anchors v (B×D) and, per anchor, the memory rows ``rows`` (B×(1 + K)):
    B×(1 + K) unnormalised scores. The memory takes no gradient."""
    picked = memory[rows].detach().to(anchors.dtype)  # B×(1 + K)×D
    return torch.exp(torch.bmm(picked, anchors.unsqueeze(2)).squeeze(2) / temperature)


def draw_contrast_rows(index: Tensor, negatives: int, train_size: int, generator: torch.Generator) -> Tensor:
    """B×(1 + ``negatives``) memory rows: the batch's own ``index`` in column 0, then negatives drawn
    uniformly, with replacement, from the other ``train_size`` − 1 training samples."""
    drawn = torch.randint(
        0, train_size - 1, (len(index), negatives), generator=generator, device=index.device, dtype=torch.long
    )
    drawn += (drawn >= index.unsqueeze(1)).long()  # 0…N−2 onto 0…N−1 without the positive
    return torch.cat([index.unsqueeze(1), drawn], dim=1)


@torch.no_grad()
def update_memory(memory: Tensor, index: Tensor, embeddings: Tensor, momentum: float) -> None:
    """In place, without gradient: rows ``index`` of ``memory`` become
    normalise(momentum·row + (1 − momentum)·v), v the batch's embeddings."""
    mixed = memory[index] * momentum + embeddings.detach().to(memory.dtype) * (1.0 - momentum)
    memory.index_copy_(0, index, F.normalize(mixed, dim=1))


def initial_memory(train_size: int, feat_dim: int, generator: torch.Generator) -> Tensor:
    """A ``train_size``×``feat_dim`` memory, uniform in [−a, a] with a = 1/√(feat_dim/3), as in the
    authors' code: each row then has unit norm in expectation."""
    bound = 1.0 / math.sqrt(feat_dim / 3.0)
    return torch.rand(train_size, feat_dim, generator=generator).mul_(2 * bound).sub_(bound)


class Embedding(nn.Module):
    """CRD's head: the flattened feature, a linear layer to ``feat_dim``, L2 normalisation."""

    def __init__(self, in_features: int, feat_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, feat_dim)

    def forward(self, feature: Tensor) -> Tensor:
        flat = feature.flatten(1).to(self.linear.weight.dtype)
        return F.normalize(self.linear(flat), dim=1)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gathered(tensor: Tensor) -> Tensor:
    """``tensor`` of every process, concatenated (itself outside data-parallel training). Every
    process then updates its memory with the whole global batch, so the copies stay equal."""
    if not _distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def _z_unknown(module: nn.Module, incompatible_keys: object) -> None:
    """After a state dict is loaded, Z is read from the buffers again at the next step."""
    module.z_ready = False


# -- the method ---------------------------------------------------------------------------------------
class CRD(FeatureMethod):
    """Contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020):

        crd = crd_weight·(L_s + L_t),   L the NCE loss of ``nce_loss``

    between the L2-normalised linear embeddings (``feat_dim``) of one student and one teacher
    layer and a memory bank of both networks' embeddings of every training sample (``nce_k``
    negatives per positive, temperature ``nce_t``, memory momentum ``nce_momentum``). Default layer:
    the embedding (input of the last linear layer); logs ``crd``. The two heads train with the
    student and are counted apart from it; the memory bank and the two normalisation constants are
    buffers (kept in checkpoints, never trained).
    """

    default_layers = "embedding"
    needs_index = True
    student_key = "distill.student_layer"
    teacher_key = "distill.teacher_layer"

    def __init__(
        self,
        crd_weight: Weight,
        feat_dim: Count,
        nce_k: Count,
        nce_t: Temperature,
        nce_momentum: Momentum,
        student_layer: str | None,
        teacher_layer: str | None,
        kd: KDTerm,
    ) -> None:
        super().__init__(kd, student_layer, teacher_layer)
        self.crd_weight, self.feat_dim = float(crd_weight), int(feat_dim)
        self.nce_k, self.nce_t, self.nce_momentum = int(nce_k), float(nce_t), float(nce_momentum)
        self.negatives = 0  # nce_k, capped to train_size − 1 in build
        self.seed = 0
        self.generators: dict[torch.device, torch.Generator] = {}
        self.z_ready = False  # both Z are set: no need to read them (a device sync) at each step
        self.register_load_state_dict_post_hook(_z_unknown)
        self.embed_student: nn.Module = nn.Identity()
        self.embed_teacher: nn.Module = nn.Identity()

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        (student_shape,), (teacher_shape,) = student_shapes, teacher_shapes
        size = self.train_size
        if not size or size < 2:
            raise ConfigError(
                f"distill: CRD keeps one memory row per training sample and draws negatives among the others; "
                f"it needs a map-style training set of at least 2 samples, got train_size={size}"
            )
        self.negatives = min(self.nce_k, size - 1)
        if self.negatives < self.nce_k:
            log.info(
                "distill.nce_k=%d is more than the %d other samples of a %d-sample training set: %d negatives per "
                "positive",
                self.nce_k,
                size - 1,
                size,
                self.negatives,
            )
        self.embed_student = Embedding(int(torch.Size(student_shape[1:]).numel()), self.feat_dim)
        self.embed_teacher = Embedding(int(torch.Size(teacher_shape[1:]).numel()), self.feat_dim)
        # from the run's seed: the memory and the negatives do not depend on how much of torch's
        # global random stream was drawn before
        self.seed = torch.initial_seed()
        self.generators = {}
        generator = torch.Generator().manual_seed(self.seed)
        self.register_buffer("memory_student", initial_memory(size, self.feat_dim, generator))
        self.register_buffer("memory_teacher", initial_memory(size, self.feat_dim, generator))
        # log Z of the scores with student anchors (teacher memory) and with teacher anchors (student
        # memory), NaN until the first batch sets them; logarithms, since Z (about N) would overflow
        # a half-precision buffer (trainer.precision=16-true) on a large training set
        self.register_buffer("log_z_student", torch.tensor(math.nan))
        self.register_buffer("log_z_teacher", torch.tensor(math.nan))
        self.z_ready = False

    def generator(self, device: torch.device) -> torch.Generator:
        """The generator of the negatives on ``device``: seeded from the run's seed (+ 1, apart from the
        memory's initial values), plus the process's rank in data-parallel training so that the
        processes draw different negatives."""
        if device not in self.generators:
            rank = dist.get_rank() if _distributed() else 0
            self.generators[device] = torch.Generator(device=device).manual_seed(self.seed + 1 + rank)
        return self.generators[device]

    def __getstate__(self) -> dict:
        # a torch.Generator cannot travel to a spawned process (ddp_spawn); it is made again there
        state = dict(super().__getstate__())
        state["generators"] = {}
        return state

    def normaliser(self, log_z: Tensor, scores: Tensor) -> Tensor:
        """Z of one direction (its log is kept): set once, from the first batch's scores, their
        mean × N."""
        if not self.z_ready and math.isnan(float(log_z)):
            estimate = scores.detach().mean() * self.train_size
            if _distributed():
                dist.all_reduce(estimate)
                estimate /= dist.get_world_size()
            log_z.fill_(math.log(float(estimate)))
            log.info("distill: CRD normalisation constant Z set to %.1f", float(estimate))
        return torch.exp(log_z.to(scores.dtype))

    def feature_terms(
        self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], index: Tensor
    ) -> dict[str, Tensor]:
        (student_feat,), (teacher_feat,) = student_feats, teacher_feats
        if not isinstance(self.embed_student, Embedding):
            raise RuntimeError("CRD.feature_terms before bind(): the heads and the memory are built there")
        index = index.to(device=student_feat.device, dtype=torch.long)
        # in float32 whatever the trainer's precision: exp(1/0.07) overflows half precision
        with torch.autocast(device_type=student_feat.device.type, enabled=False):
            v_s = self.embed_student(student_feat).float()
            v_t = self.embed_teacher(teacher_feat).float()
            rows = draw_contrast_rows(index, self.negatives, self.train_size, self.generator(index.device))
            scores_s = contrast_scores(v_s, self.memory_teacher, rows, self.nce_t)
            scores_t = contrast_scores(v_t, self.memory_student, rows, self.nce_t)
            loss_s = nce_loss(scores_s / self.normaliser(self.log_z_student, scores_s), self.train_size)
            loss_t = nce_loss(scores_t / self.normaliser(self.log_z_teacher, scores_t), self.train_size)
        self.z_ready = True
        every = _gathered(index)
        update_memory(self.memory_student, every, _gathered(v_s.detach()), self.nce_momentum)
        update_memory(self.memory_teacher, every, _gathered(v_t.detach()), self.nce_momentum)
        return {"crd": self.crd_weight * (loss_s + loss_t)}

    def extra_repr(self) -> str:
        return (
            f"crd_weight={self.crd_weight}, feat_dim={self.feat_dim}, nce_k={self.nce_k}, nce_t={self.nce_t}, "
            f"nce_momentum={self.nce_momentum}, train_size={self.train_size}, lam={self.lam}, "
            f"temperature={self.temperature}"
        )
