"""A co-training run's cohort (``distill=dml``, ``distill=online``): its peers built, what such a run
cannot take refused before any training, and the peer that stands in the teacher's place in results.
The module that trains them is ``distill.cotraining.CoTrainingModule``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from distillab.distill.methods.base import cotrains, peer_roles
from distillab.settings import ConfigError
from distillab.steps.teacher import cache


def build(method: nn.Module, student: nn.Module, make: Callable[[str], nn.Module]) -> list[nn.Module]:
    """The cohort: ``student`` as peer 0, then ``make(role)`` for each other peer's role."""
    return [student] + [make(role) for role in peer_roles(method)[1:]]


def check(method: nn.Module, name: str, clashes: dict[str, Any], outputs_cache: str, target: str | None) -> None:
    """What a co-training run cannot take, in one line, before any training. ``clashes``: the values
    of ``teachers``, ``teacher.ckpt_path``, ``student.init`` and ``teacher_assistant`` (null when
    unset); ``outputs_cache``: ``teacher_outputs.cache``; ``target``: what the run compresses."""
    if not cotrains(method):
        return
    roles = set(peer_roles(method)) - {"student", "teacher"}
    if roles:
        raise ConfigError(f"distill={name}: peer roles must be student or teacher, got {sorted(roles)}")
    why = {
        "teachers": "trains its peers from scratch; an ensemble of cached teachers",
        "teacher.ckpt_path": "trains the teacher from scratch; a teacher file",
        "student.init": "starts every peer from scratch; starting from the teacher",
        "teacher_assistant": "has no pre-trained teacher; an assistant",
    }
    for key, value in clashes.items():
        if value:
            unset = "none" if key == "teacher_assistant" else "null"
            raise ConfigError(
                f"{key}={value} is not allowed with distill={name}, which {why[key]} has no use: set {key}={unset}"
            )
    if outputs_cache == "cached":
        raise ConfigError(
            f"teacher_outputs.cache=cached is not allowed with distill={name}: its teacher changes at every "
            "step, so no table of its outputs exists; use auto or live"
        )
    if target == "teacher":
        raise ConfigError(f"compress.target=teacher is not allowed with distill={name}: compress the student")


def as_teacher(peers: list[nn.Module], method: nn.Module, names: dict[str, str], out: Path) -> cache.Teacher:
    """Peer 1, the peer the student learned from (the co-trained teacher of ``online``), in the
    place of the teacher in results: no cache entry was read or written for it."""
    arch = names[peer_roles(method)[1]]
    return cache.Teacher(peers[1].eval(), "", "cotrained", out, arch=arch)
