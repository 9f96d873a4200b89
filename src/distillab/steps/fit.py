"""One distillation fit: a model trained with a method against a trained teacher (the student, or a
teacher assistant), or a cohort of peers trained together (co-training methods).

Both keep the best-on-validation epoch of the model that is kept and return what the run reports:
that epoch, the loggers, how the model got its teacher's logits and the seconds spent.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from distillab import io, training
from distillab.data import adapter
from distillab.distill import transfer
from distillab.distill.cotraining import CoTrainingModule
from distillab.distill.methods.base import cotrains, needs_index, needs_teacher
from distillab.distill.module import DistillationModule
from distillab.steps import peers
from distillab.steps.handoff import Handoff, checkpoint
from distillab.steps.teacher import cache, outputs
from distillab.steps.teacher.training import scheduler_factory


@dataclasses.dataclass
class Fitted:
    best_epoch: int
    loggers: list
    mode: str  # how the model got its teacher's logits: cached, live, none, or cotrained
    table_seconds: float  # filling the teacher-output table (part of the teacher's time)
    seconds: float  # the fit itself


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How one fit runs: its ``optim`` node (optimizer and scheduler), epochs and seed, where its
    checkpoints go, and the role it logs as."""

    optim: DictConfig
    max_epochs: int
    seed: int
    checkpoint_dir: Path | None
    role: str = "student"
    single_process: bool = False


@dataclasses.dataclass(frozen=True)
class Teaching:
    """How a distilled model gets its teacher's logits: the run's ``teacher_outputs`` settings and
    the trainer's accelerator."""

    outputs: outputs.OutputSettings
    accelerator: str


def distill(
    model: nn.Module,
    method: nn.Module,
    teacher: cache.Teacher,
    data: Any,
    fitting: training.Fitting,
    schedule: Schedule,
    teaching: Teaching,
) -> Fitted:
    """Train ``model`` in place with ``method`` against the frozen ``teacher`` (its outputs from the
    cached table when ``teaching`` allows), as ``schedule`` says."""
    given = outputs.for_run(teaching.outputs, teaching.accelerator, teacher, data, method)
    pl.seed_everything(schedule.seed, workers=True, verbose=False)  # a cache miss drew random numbers
    tick = time.perf_counter()
    live = teacher.model if needs_teacher(method) and given.table is None else None
    module = DistillationModule(
        model,
        live,
        method,
        teacher_table=given.table,
        optimizer=instantiate(schedule.optim.optimizer),
        scheduler=scheduler_factory(schedule.optim),
    )
    fit, run_loggers = fitting.trainer_for(
        schedule.role, schedule.checkpoint_dir, schedule.max_epochs, single_process=schedule.single_process
    )
    fit.fit(module, **adapter.fit_arguments(data, indexed=given.table is not None or needs_index(method)))
    best = training.restore_best(module, fit)
    return Fitted(best, run_loggers, given.mode, given.seconds, time.perf_counter() - tick)


def cotrain(
    peers: list[nn.Module], method: nn.Module, data: Any, fitting: training.Fitting, schedule: Schedule
) -> Fitted:
    """Train ``peers`` together with the co-training ``method``; all are restored from the epoch
    that is best for peer 0, the student."""
    tick = time.perf_counter()
    optim = schedule.optim
    module = CoTrainingModule(peers, method, optimizer=instantiate(optim.optimizer), scheduler=scheduler_factory(optim))
    fit, run_loggers = fitting.trainer_for("student", schedule.checkpoint_dir, schedule.max_epochs)
    fit.fit(module, **adapter.fit_arguments(data, indexed=False))
    best = training.restore_best(module, fit)
    return Fitted(best, run_loggers, "cotrained", 0.0, time.perf_counter() - tick)


def student(
    parts: Any,
    source: cache.Teacher | None,
    fitting: training.Fitting,
    role: transfer.StudentRole,
    handoff: Handoff | None = None,
) -> tuple[Fitted, dict[str, Any] | None, cache.Teacher | None]:
    """The run's student fit (``parts``: the ``pipeline.Parts``, whose ``schedule`` and ``teaching``
    it follows): distilled from ``source`` (the teacher, or its assistant), after ``role.init`` when
    set; or, with a co-training method, trained with its peers; a member of a stacked group
    (``handoff``) as its group trained it. Returns the fit, the weight transfer's report, and for
    co-training the peer that stands in the teacher's place."""
    if handoff is not None:  # trained with its group by hydra/launcher=stacked
        return taken_over(handoff, parts.student, fitting, parts.plan.schedule.checkpoint_dir), None, None
    if cotrains(parts.method):
        fitted = cotrain(parts.peers, parts.method, parts.data, fitting, parts.plan.schedule)
        return fitted, None, peers.as_teacher(parts.peers, parts.method, parts.names, parts.out)
    init = None
    if role.init:
        names = (parts.names["student"], source.arch or parts.names["teacher"])
        init = transfer.apply(parts.student, source.model, role.init_weight, names)
    return (
        distill(parts.student, parts.method, source, parts.data, fitting, parts.plan.schedule, parts.plan.teaching),
        init,
        None,
    )


def taken_over(handoff: Handoff, model: nn.Module, fitting: training.Fitting, checkpoint_dir: Path) -> Fitted:
    """A member of a stacked group, trained with its group, finished as its own fit would have
    ended: the best weights loaded into ``model`` and saved as ``checkpoint_dir/best.ckpt``, the
    metrics of every epoch logged to the job's loggers at the steps Lightning logs them."""
    trained = handoff.trained
    if trained.error is not None:
        raise FloatingPointError(trained.error)
    model.load_state_dict(trained.state)
    best = checkpoint(trained.state, trained.best_epoch, trained.best_step)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    io.atomic_save(checkpoint_dir / "best.ckpt", lambda handle: torch.save(best, handle))
    run_loggers = fitting.loggers("student")
    for step, metrics in trained.history:
        for logger in run_loggers:
            logger.log_metrics(metrics, step)
    for logger in run_loggers:
        logger.save()
    return Fitted(trained.best_epoch, run_loggers, handoff.mode, handoff.table_seconds, handoff.seconds)
