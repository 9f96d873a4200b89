"""A run's plan: the composed config read once into frozen, typed settings (the run's own keys,
each part's settings, what step 6 compresses, the names a run reports its choices by). Below the
pipeline, parts take these values; only the config hash and the loggers see the whole config."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from distillab import job
from distillab.conf import ROLE_KEYS, no_compression, resolved
from distillab.distill.transfer import StudentRole
from distillab.measure import MeasureSettings
from distillab.settings import Count, Seed
from distillab.settings import build as settings_of
from distillab.steps import fit
from distillab.steps.teacher import assistant, cache, outputs
from distillab.steps.teacher.ensemble import EnsembleSettings


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The run's own keys; ``teachers``: ``conf/model`` options (an ensemble)."""

    seed: Seed
    num_threads: Count | None
    rerun: bool
    teachers: list[str] | None


@dataclasses.dataclass(frozen=True)
class Plan:
    """The run's settings, read from the config once: what step 6 compresses (``student``,
    ``teacher``, or None for compress=none), how models are measured, how an ensemble mixes, how
    the student gets its teacher's logits, its fit's schedule and its role's keys."""

    run: RunSettings
    target: str | None
    measure: MeasureSettings
    ensemble: EnsembleSettings
    teaching: fit.Teaching
    schedule: fit.Schedule
    student: StudentRole


def run_settings(cfg: DictConfig) -> RunSettings:
    return settings_from(RunSettings, {key: cfg[key] for key in ("seed", "num_threads", "rerun", "teachers")})


def make(cfg: DictConfig, settings: RunSettings | None = None) -> Plan:
    """The run's ``Plan``: each part's settings built, once, from its node."""
    settings = settings or run_settings(cfg)
    target = None if no_compression(cfg.compress) else str(cfg.compress.target)
    teaching = fit.Teaching(settings_from(outputs.OutputSettings, cfg.teacher_outputs), str(cfg.trainer.accelerator))
    epochs, checkpoints = int(cfg.trainer.max_epochs), Path(cfg.paths.output_dir) / "checkpoints"
    schedule = fit.Schedule(cfg.optim, epochs, settings.seed, checkpoints)
    student = settings_from(StudentRole, {key: cfg.student[key] for key in ROLE_KEYS["student"]})
    measure, mixing = settings_from(MeasureSettings, cfg.measure), settings_from(EnsembleSettings, cfg.ensemble)
    return Plan(settings, target, measure, mixing, teaching, schedule, student)


def assistant_option(node: DictConfig | None) -> str | None:
    """The ``teacher_assistant=`` option chosen, None for none; outside Hydra, the node's architecture."""
    option = job.choice(assistant.KEY)
    if not assistant.chosen(node, option):
        return None
    return option or cache.arch_name(node)


def name(group: str, node: DictConfig) -> str:
    """The option chosen for ``group`` (``distill=kd`` → kd); an architecture by its name (``cnn``,
    ``torchvision:resnet18``); outside Hydra, the name of what the node builds."""
    if group in ("teacher", "student"):
        return cache.arch_name(node, job.choice(group))
    if no_compression(node):
        return "none"
    return job.choice(group) or str(node.get("_target_")).rsplit(".")[-1]


def settings_from(kind: type, node: Any) -> Any:
    """The settings dataclass ``kind`` from a config node, with its interpolations resolved."""
    return settings_of(kind, resolved(node))
