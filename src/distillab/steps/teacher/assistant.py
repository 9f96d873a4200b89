"""A teacher assistant (Mirzadeh et al., AAAI 2020): ``teacher_assistant=<model option>``.

The assistant, a model between the teacher and the student in size, is distilled from the
teacher first, with the run's own method; the student is then distilled from the assistant.
Both steps happen in one run. The assistant is trained by the teacher's recipe (epochs, seed,
optimizer: ``teacher.recipe.*``) and cached like a teacher, keyed by the teacher's key, its own
architecture and recipe, and the method, so a sweep over students trains it once.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from distillab import build, loggers, training
from distillab.data import adapter
from distillab.distill.methods.base import cotrains, is_feature_method, needs_index, needs_teacher
from distillab.settings import ConfigError
from distillab.steps import fit
from distillab.steps.teacher import cache, ensemble

KEY = "teacher_assistant"


def check(cfg: DictConfig, method: nn.Module, name: str, search_dirs: list[Path]) -> DictConfig | None:
    """The assistant's node (its architecture with the teacher's recipe), or None without one; a
    setting it cannot go with is one line, before any training."""
    option = cfg.get(KEY)
    if not option:
        return None
    if not needs_teacher(method) or cotrains(method):
        raise ConfigError(f"{KEY}={option} is not allowed with distill={name}, which distils from no trained teacher")
    if cfg.get("teachers"):
        raise ConfigError(f"{KEY}={option} is not allowed with teachers=[...]: an assistant learns from one teacher")
    if cfg.compress.get("target") == "teacher" and (cfg.compress.get("_target_") or cfg.compress.get("steps")):
        raise ConfigError(f"{KEY}={option} is not allowed with compress.target=teacher, which trains no student")
    (node,) = ensemble.member_nodes([str(option)], cfg.teacher, search_dirs, key=KEY)
    return node


def obtain(
    cfg: DictConfig, node: DictConfig, model: nn.Module, data: Any, teacher: cache.Teacher, fitting: training.Fitting
) -> cache.Teacher:
    """The assistant of ``node`` (``model``, untrained: ``build.teacher`` seeds it with the recipe's
    seed) distilled from ``teacher``: from the cache, or trained now."""
    identity = {
        **cache.identity(cfg.data, node, str(fitting.trainer.precision)),
        "assistant_of": teacher.key,
        "distill": OmegaConf.to_container(cfg.distill, resolve=True),
    }
    if cfg.teacher.get("ckpt_path"):  # a teacher file's key says nothing of its weights: its bytes do
        identity["teacher_file"] = hashlib.sha256(Path(cfg.teacher.ckpt_path).read_bytes()).hexdigest()
    recipe = node.recipe

    def train(untrained: nn.Module, staging: Path, single_process: bool) -> dict[str, Any]:
        method = build.part("distill", cfg.distill)
        if is_feature_method(method):
            size = adapter.train_size(data) if needs_index(method) else None
            method.bind(untrained, teacher.model, adapter.example(data), train_size=size)
        fitted = fit.distill(
            untrained, method, teacher, data, cfg, fitting, KEY, staging / "checkpoints",
            int(recipe.max_epochs), int(recipe.seed), recipe.optim, single_process,
        )  # fmt: skip
        loggers.finish(fitted.loggers, {})
        shutil.rmtree(staging / "checkpoints", ignore_errors=True)
        return {"best_epoch": fitted.best_epoch, "outputs": fitted.mode}

    found = cache.obtain(model, identity, cfg.paths.cache_dir, fitting.trainer, train, None, int(recipe.max_epochs))
    found.arch = cache.arch_name(node, str(cfg.get(KEY)))
    return found
