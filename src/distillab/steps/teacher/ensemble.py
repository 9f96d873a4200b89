"""Several teachers at once: ``python train.py teachers=[cnn,resnet20]``.

Each member is a ``conf/model/<name>`` architecture trained with the run's teacher recipe
(``teacher.recipe.*``, so one override reaches every member) and obtained through the
teacher cache on its own, exactly as a single teacher would be. The soft target is the
average of the members' tempered probabilities (Hinton et al. 2015, section 2, on ensembles
as teachers), or of their logits, optionally weighted per member (``ensemble.weights``).

The members are combined into one logit tensor that every logit method takes unchanged:
averaging probabilities at temperature T gives the logits ``T·log Σ_k w_k softmax(t_k/T)``,
whose softmax at T is that average exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from distillab.settings import ConfigError, Weight
from distillab.steps.teacher import cache

log = logging.getLogger(__name__)

COMBINE = ("probs", "logits")


@dataclasses.dataclass(frozen=True)
class EnsembleSettings:
    """``ensemble``: how the members' outputs are combined, and one weight per member (null: equal)."""

    combine: Literal["probs", "logits"]
    weights: list[Weight] | None


def combine_logits(logits: Tensor, weights: Tensor, combine: str, temperature: float) -> Tensor:
    """One logit tensor from the members' ``logits`` (K×B×C) with ``weights`` (K, sum 1).

    ``probs``: T·log Σ_k w_k softmax(t_k/T), so softmax(·/T) is the weighted average of the
    members' tempered probabilities; ``logits``: Σ_k w_k t_k.
    """
    w = weights.to(logits.dtype).view(-1, 1, 1)
    if combine == "logits":
        return (w * logits).sum(dim=0)
    log_probs = F.log_softmax(logits / temperature, dim=-1) + w.log()
    return temperature * torch.logsumexp(log_probs, dim=0)


class Ensemble(nn.Module):
    """The members side by side; the output is their combined logits (``combine_logits``)."""

    def __init__(
        self,
        members: Sequence[nn.Module],
        names: Sequence[str],
        weights: Sequence[float] | None = None,
        combine: str = "probs",
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.names = list(names)
        raw = torch.tensor([1.0] * len(members) if weights is None else [float(w) for w in weights])
        self.register_buffer("weights", raw / raw.sum(), persistent=False)
        self.combine, self.temperature = combine, float(temperature)

    def member_logits(self, x: Tensor) -> Tensor:
        return torch.stack([member(x) for member in self.members])

    def forward(self, x: Tensor) -> Tensor:
        return combine_logits(self.member_logits(x), self.weights, self.combine, self.temperature)


# -- configuration ----------------------------------------------------------------------------------
def check(
    names: Sequence[str],
    settings: EnsembleSettings,
    feature_method: str | None,
    ckpt_path: str | None,
    compresses_teacher: bool,
    init_from_teacher: bool,
    search_dirs: Sequence[Path],
) -> None:
    """The ensemble settings, before anything is built; one line per mistake. ``feature_method``: the
    name of the run's method when it reads features (which an ensemble has no single set of)."""
    if not names:
        return
    members = list(names)
    if len(members) < 2:
        raise ConfigError(f"teachers={members} needs at least two names (one teacher: teacher={members[0]})")
    weights = settings.weights
    if weights is not None and (len(weights) != len(members) or not sum(weights) > 0):
        raise ConfigError(
            f"ensemble.weights={list(weights)} is not allowed: one weight >= 0 per teacher "
            f"({len(members)}: {', '.join(members)}), not all zero"
        )
    if ckpt_path:
        raise ConfigError(
            "teacher.ckpt_path is for a single teacher; with teachers=[...] every member "
            "comes from the teacher cache: set teacher.ckpt_path=null"
        )
    if feature_method:
        raise ConfigError(
            f"distill={feature_method} reads the features of one teacher; with teachers=[...] "
            "use a logit method (distill=kd or distill=dkd)"
        )
    if compresses_teacher:
        raise ConfigError(
            "compress.target=teacher compresses a single teacher, not an ensemble: "
            "set compress.target=student or teachers=null"
        )
    if init_from_teacher:
        raise ConfigError(
            "student.init=from_teacher takes the weights of one teacher, not of an ensemble "
            "(teachers=...): set student.init=null"
        )
    for name in members:
        model_file(name, search_dirs)


def model_file(name: str, search_dirs: Sequence[Path], key: str = "teachers") -> Path:
    """``model/<name>.yaml`` in the first folder of the config search path that has it; else a
    one-line error naming ``key`` and the options."""
    for folder in search_dirs:
        path = Path(folder) / "model" / f"{name}.yaml"
        if path.is_file():
            return path
    options = sorted({p.stem for folder in search_dirs for p in (Path(folder) / "model").glob("*.yaml")})
    raise ConfigError(f"{key}: {name!r} is not a model option; allowed: {', '.join(options)}")


def member_nodes(
    names: Sequence[str], teacher: DictConfig, search_dirs: Sequence[Path], key: str = "teachers"
) -> list[DictConfig]:
    """One teacher node per member: the architecture of ``model/<name>.yaml`` with the run's teacher
    recipe (so one ``teacher.recipe`` override reaches every member), each with its own cache key."""
    nodes = []
    for name in names:
        node = OmegaConf.load(model_file(name, search_dirs, key))
        node.ckpt_path = None
        node.recipe = teacher.recipe
        nodes.append(node)
    return nodes


def build(
    models: Sequence[nn.Module], names: Sequence[str], settings: EnsembleSettings, temperature: float
) -> Ensemble:
    """The ensemble of ``models`` (untrained members), combined as ``settings`` say at ``temperature``."""
    return Ensemble(models, names, normalised_weights(settings, len(models)), settings.combine, temperature)


def obtain(
    model: Ensemble,
    nodes: Sequence[DictConfig],
    settings: EnsembleSettings,
    obtain_member: Callable[[nn.Module, DictConfig, str], cache.Teacher],
) -> cache.Teacher:
    """Each member from the cache or trained now (``obtain_member(model, node, name)``), as one teacher:
    a hit when every member was one, keyed by the members' keys and the way they are combined."""
    members = []
    for name, node, member in zip(model.names, nodes, model.members):
        members.append(obtain_member(member, node, name))
        members[-1].arch = cache.arch_name(node, name)
    hit = "hit" if all(member.cache == "hit" for member in members) else "miss"
    key = cache_key([member.key for member in members], settings, model.temperature)
    log.info(
        "ensemble of %d teachers (%s, combine=%s, weights %s)",
        len(members),
        ", ".join(model.names),
        model.combine,
        [round(float(w), 4) for w in model.weights],
    )
    return cache.Teacher(
        model.eval(),
        key,
        hit,
        members[0].path,
        seconds=sum(m.seconds for m in members),
        members=members,
        arch=arch_name(model.names),
    )


def arch_name(members: Sequence[str]) -> str:
    return "ensemble(" + "+".join(members) + ")"


def cache_key(member_keys: Sequence[str], settings: EnsembleSettings, temperature: float) -> str:
    """What determines the combined soft targets: the members, the weights, the combination."""
    blob = json.dumps(
        {
            "members": list(member_keys),
            "weights": None if settings.weights is None else [float(w) for w in settings.weights],
            "combine": settings.combine,
            "temperature": None if settings.combine == "logits" else temperature,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def normalised_weights(settings: EnsembleSettings, count: int) -> list[float]:
    raw = [1.0] * count if settings.weights is None else [float(w) for w in settings.weights]
    total = math.fsum(raw)
    return [w / total for w in raw]


__all__ = [
    "COMBINE",
    "Ensemble",
    "EnsembleSettings",
    "arch_name",
    "cache_key",
    "check",
    "combine_logits",
    "member_nodes",
    "normalised_weights",
]
