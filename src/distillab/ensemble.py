"""Several teachers at once: ``python train.py teachers=[cnn,resnet20]``.

Each member is a ``conf/teacher/<name>`` architecture trained with the run's teacher recipe
(``teacher.recipe.*``, so one override reaches every member) and obtained through the
teacher cache on its own, exactly as a single teacher would be. The soft target is the
average of the members' tempered probabilities (Hinton et al. 2015, section 2, on ensembles
as teachers), or of their logits, optionally weighted per member (``ensemble.weights``).

The members are combined into one logit tensor that every logit method takes unchanged:
averaging probabilities at temperature T gives the logits ``T·log Σ_k w_k softmax(t_k/T)``,
whose softmax at T is that average exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, open_dict
from torch import Tensor, nn

from distillab.config import ConfigError
from distillab.distill.methods import FeatureDistillLoss

COMBINE = ("probs", "logits")


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

    def __init__(self, members: Sequence[nn.Module], names: Sequence[str], weights: Sequence[float] | None = None,
                 combine: str = "probs", temperature: float = 1.0) -> None:
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
def names(cfg: DictConfig) -> list[str]:
    """The members of ``teachers=[...]``; [] for the usual single ``teacher``."""
    value = cfg.get("teachers")
    return [] if value is None else [str(name) for name in value]


def check(cfg: DictConfig, loss: nn.Module) -> None:
    """The ensemble settings, before anything is built; one line per mistake."""
    members = names(cfg)
    node = cfg.get("ensemble") or {}
    combine = str(node.get("combine", "probs"))
    if combine not in COMBINE:
        raise ConfigError(f"ensemble.combine={combine!r} is not allowed: one of {', '.join(COMBINE)}")
    weights = node.get("weights")
    if not members:
        return
    if len(members) < 2:
        raise ConfigError(f"teachers={members} needs at least two names (one teacher: teacher={members[0]})")
    if weights is not None:
        weights = list(weights)
        if len(weights) != len(members) or any(not float(w) >= 0 for w in weights) or not sum(weights) > 0:
            raise ConfigError(f"ensemble.weights={weights} is not allowed: one weight >= 0 per teacher "
                              f"({len(members)}: {', '.join(members)}), not all zero")
    if cfg.teacher.get("ckpt_path"):
        raise ConfigError("teacher.ckpt_path is for a single teacher; with teachers=[...] every member "
                          "comes from the teacher cache: set teacher.ckpt_path=null")
    if isinstance(loss, FeatureDistillLoss):
        raise ConfigError(f"distill={loss.method} reads the features of one teacher; with teachers=[...] "
                          "use a logit method (distill=kd or distill=dkd)")
    if str(cfg.compress.method) != "none" and str(cfg.compress.get("target", "student")) == "teacher":
        raise ConfigError("compress.target=teacher compresses a single teacher, not an ensemble: "
                          "set compress.target=student")


def member_configs(cfg: DictConfig) -> list[DictConfig]:
    """One run config per member: its ``teacher`` node is ``conf/teacher/<name>`` with the run's
    teacher recipe, so each member has its own teacher-cache key."""
    configs = []
    for name in names(cfg):
        node = _teacher_node(name, cfg)
        member = cfg.copy()
        with open_dict(member):
            node.recipe = cfg.teacher.recipe
            node.ckpt_path = None
            member.teacher = node
            member.teachers = None
        configs.append(member)
    return configs


def _teacher_node(name: str, cfg: DictConfig) -> DictConfig:
    """``conf/teacher/<name>`` composed with its defaults (model file, recipe schema)."""
    overrides = [f"teacher={name}"]
    try:
        if GlobalHydra.instance().is_initialized():  # inside a Hydra job: its own search path
            config_name = HydraConfig.get().job.config_name if HydraConfig.initialized() else "train"
            composed = compose(config_name=config_name, overrides=overrides)
        else:
            with initialize_config_dir(str(Path(cfg.paths.root_dir) / "conf"), version_base="1.3"):
                composed = compose(config_name="train", overrides=overrides)
    except HydraException as error:
        first = str(error).splitlines()[0]
        raise ConfigError(f"teachers: {name!r} is not a teacher option ({first})") from None
    return composed.teacher


def arch_name(members: Sequence[str]) -> str:
    return "ensemble(" + "+".join(members) + ")"


def cache_key(member_keys: Sequence[str], cfg: DictConfig, temperature: float) -> str:
    """What determines the combined soft targets: the members, the weights, the combination."""
    node = cfg.get("ensemble") or {}
    weights = node.get("weights")
    blob = json.dumps({
        "members": list(member_keys),
        "weights": None if weights is None else [float(w) for w in weights],
        "combine": str(node.get("combine", "probs")),
        "temperature": None if str(node.get("combine", "probs")) == "logits" else temperature,
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def weights_of(cfg: DictConfig, count: int) -> list[float]:
    node = cfg.get("ensemble") or {}
    weights = node.get("weights")
    raw = [1.0] * count if weights is None else [float(w) for w in weights]
    total = math.fsum(raw)
    return [w / total for w in raw]


__all__ = ["COMBINE", "Ensemble", "arch_name", "cache_key", "check", "combine_logits", "member_configs", "names"]
