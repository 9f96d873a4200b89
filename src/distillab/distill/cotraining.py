"""Peers trained together in one fit, with no pre-trained teacher: the co-training methods
(``distill=dml``, ``distill=online``; ``methods.base``: ``cotrains``, ``peer_roles``).

Every peer is a registered child of the module, so all of them are in the optimizer, the
checkpoint and DDP's gradient buckets, and all of them train (the frozen-teacher rule of
``DistillationModule`` is not for them: here the teacher learns by design). The checkpoint is
chosen on peer 0's validation accuracy, the student's; the other peers are restored from the same
epoch and measured there. Each peer's validation accuracy is logged as ``val/peer<k>/acc``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from distillab.distill.methods.base import cotrains, peer_roles
from distillab.distill.module import ClassifierModule, _unpack
from distillab.settings import ConfigError
from distillab.steps.teacher import cache


class CoTrainingModule(ClassifierModule):
    """Trains ``peers`` on ``loss(list of the peers' logits, targets)``; peer 0 is the student."""

    def __init__(self, peers: list[nn.Module], loss: nn.Module, **kwargs: Any) -> None:
        super().__init__(model=peers[0], loss=loss, **kwargs)
        self.others = nn.ModuleList(peers[1:])
        self._peer_val: list[tuple[Tensor, Tensor]] = []

    @property
    def peers(self) -> list[nn.Module]:
        return [self.model, *self.others]

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x, y, _ = _unpack(batch)
        logits = [peer(x) for peer in self.peers]
        terms = self.loss(logits, y)
        self._accumulate("train", terms, logits[0], y)
        return terms["loss"]

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        x, y, _ = _unpack(batch)
        logits = [peer(x) for peer in self.peers]
        self._accumulate("val", {"loss": nn.functional.cross_entropy(logits[0], y)}, logits[0], y)
        with torch.no_grad():
            correct = torch.stack([(z.argmax(dim=1) == y).sum() for z in logits])
        self._peer_val.append((correct, y.new_tensor(len(y))))

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self._peer_val:
            correct = torch.stack([c for c, _ in self._peer_val]).sum(dim=0).float()
            seen = torch.stack([n for _, n in self._peer_val]).sum().float()
            self.log_dict({f"val/peer{k}/acc": value for k, value in enumerate(correct / seen)}, sync_dist=True)
        self._peer_val = []


def build_peers(method: nn.Module, student: nn.Module, make: Any) -> list[nn.Module]:
    """The cohort: ``student`` as peer 0, then ``make(role)`` for each other peer's role."""
    return [student] + [make(role) for role in peer_roles(method)[1:]]


def check(cfg: DictConfig, method: nn.Module, name: str) -> None:
    """What a co-training run cannot take, in one line, before any training."""
    if not cotrains(method):
        return
    roles = set(peer_roles(method)) - {"student", "teacher"}
    if roles:
        raise ConfigError(f"distill={name}: peer roles must be student or teacher, got {sorted(roles)}")
    clashes = {
        "teachers": (cfg.get("teachers"), "trains its peers from scratch; an ensemble of cached teachers"),
        "teacher.ckpt_path": (cfg.teacher.get("ckpt_path"), "trains the teacher from scratch; a teacher file"),
        "student.init": (cfg.student.get("init"), "starts every peer from scratch; starting from the teacher"),
        "teacher_assistant": (cfg.get("teacher_assistant"), "has no pre-trained teacher; an assistant"),
    }
    for key, (value, why) in clashes.items():
        if value:
            raise ConfigError(
                f"{key}={value} is not allowed with distill={name}, which {why} has no use: set {key}=null"
            )
    if str(cfg.teacher_outputs.get("cache")) == "cached":
        raise ConfigError(
            f"teacher_outputs.cache=cached is not allowed with distill={name}: its teacher changes at every "
            "step, so no table of its outputs exists; use auto or live"
        )
    if cfg.compress.get("target") == "teacher" and (cfg.compress.get("_target_") or cfg.compress.get("steps")):
        raise ConfigError(f"compress.target=teacher is not allowed with distill={name}: compress the student")


def as_teacher(peers: list[nn.Module], method: nn.Module, names: dict[str, str], out: Path) -> cache.Teacher:
    """Peer 1, the peer the student learned from (the co-trained teacher of ``online``), in the
    place of the teacher in results: no cache entry was read or written for it."""
    arch = names[peer_roles(method)[1]]
    return cache.Teacher(peers[1].eval(), "", "cotrained", out, arch=arch)
