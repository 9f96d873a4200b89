"""A teacher assistant (Mirzadeh et al., AAAI 2020): ``teacher_assistant=<model option>``.

The assistant, a model between the teacher and the student in size, is distilled from the
teacher first, with the run's own method; the student is then distilled from the assistant.
Both steps happen in one run. The assistant is a model node like the teacher and the student
(``teacher_assistant.width=16``), with its own recipe (``teacher_assistant.recipe.*``: epochs,
seed, optimizer; each the teacher's unless set), and is cached like a teacher, keyed by the
teacher's key, its own architecture and recipe, and the method, so a sweep over students trains
it once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from distillab import build, loggers, training
from distillab.config import check_role
from distillab.data import adapter
from distillab.distill.methods.base import cotrains, is_feature_method, needs_index, needs_teacher
from distillab.settings import ConfigError
from distillab.steps import fit
from distillab.steps.teacher import cache, ensemble
from distillab.steps.teacher.training import Recipe

KEY = "teacher_assistant"
NONE = "none"  # the option that chooses no assistant


@dataclasses.dataclass(frozen=True)
class AssistantRole:
    """The assistant node's own keys, beside its architecture's: ``recipe``, as the teacher's."""

    recipe: Recipe


@dataclasses.dataclass(frozen=True)
class Assistant:
    """A chosen assistant: its node (architecture and recipe), its option name, and what its cache
    key and its distillation read from the run: the data and method nodes, the teacher's file."""

    node: DictConfig
    option: str
    data: DictConfig
    distill: DictConfig
    teacher_file: str | None


def chosen(node: DictConfig | None, option: str | None) -> bool:
    """Whether the run has an assistant: ``teacher_assistant=<model>`` (any option but ``none``)."""
    return bool(option and option != NONE) or bool(node is not None and node.get("_target_"))


def check(
    node: DictConfig, option: str, method: nn.Module, name: str, teachers: Any, target: str | None, dirs: list[Path]
) -> DictConfig:
    """The assistant's node, checked: ``option`` a model (``dirs``: the config search path), its
    values, and no setting it cannot go with (``teachers``, ``target``: what the run compresses); one
    line, before any training."""
    if not node.get("_target_"):
        ensemble.model_file(option, dirs, KEY)  # not a model option: says so, with the allowed ones
    if not needs_teacher(method) or cotrains(method):
        raise ConfigError(f"{KEY}={option} is not allowed with distill={name}, which distils from no trained teacher")
    if teachers:
        raise ConfigError(f"{KEY}={option} is not allowed with teachers=[...]: an assistant learns from one teacher")
    if target == "teacher":
        raise ConfigError(f"{KEY}={option} is not allowed with compress.target=teacher, which trains no student")
    check_role(KEY, node)
    return node


def obtain(
    assistant: Assistant,
    model: nn.Module,
    data: Any,
    teacher: cache.Teacher,
    fitting: training.Fitting,
    teaching: fit.Teaching,
    cache_dir: str,
) -> cache.Teacher:
    """The ``assistant`` (``model``, untrained: ``build.teacher`` seeds it with the recipe's seed)
    distilled from ``teacher``: from the cache, or trained now."""
    # keyed as a teacher node (ckpt_path null), as before the assistant was a node: earlier caches still hit
    node = OmegaConf.create({**OmegaConf.to_container(assistant.node, resolve=True), "ckpt_path": None})
    identity = {
        **cache.identity(assistant.data, node, str(fitting.trainer.precision)),
        "assistant_of": teacher.key,
        "distill": OmegaConf.to_container(assistant.distill, resolve=True),
    }
    if assistant.teacher_file:  # a teacher file's key says nothing of its weights: its bytes do
        identity["teacher_file"] = hashlib.sha256(Path(assistant.teacher_file).read_bytes()).hexdigest()
    recipe = node.recipe

    def train(untrained: nn.Module, staging: Path, single_process: bool) -> dict[str, Any]:
        method = build.part("distill", assistant.distill)
        if is_feature_method(method):
            size = adapter.train_size(data) if needs_index(method) else None
            method.bind(untrained, teacher.model, adapter.example(data), train_size=size)
        schedule = fit.Schedule(
            recipe.optim, int(recipe.max_epochs), int(recipe.seed), staging / "checkpoints", KEY, single_process
        )
        fitted = fit.distill(untrained, method, teacher, data, fitting, schedule, teaching)
        loggers.finish(fitted.loggers, {})
        shutil.rmtree(staging / "checkpoints", ignore_errors=True)
        return {"best_epoch": fitted.best_epoch, "outputs": fitted.mode}

    found = cache.obtain(model, identity, cache_dir, fitting.trainer, train, None, int(recipe.max_epochs))
    found.arch = cache.arch_name(assistant.node, assistant.option)
    return found
