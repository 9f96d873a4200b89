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

from distillab import io, stacked, training
from distillab.conf import resolved
from distillab.data import adapter
from distillab.distill import transfer
from distillab.distill.cotraining import CoTrainingModule, as_teacher
from distillab.distill.methods.base import cotrains, needs_index, needs_teacher
from distillab.distill.module import DistillationModule
from distillab.settings import build as settings_of
from distillab.steps.teacher import cache, outputs
from distillab.steps.teacher.training import scheduler_factory


@dataclasses.dataclass
class Fitted:
    best_epoch: int
    loggers: list
    mode: str  # how the model got its teacher's logits: cached, live, none, or cotrained
    table_seconds: float  # filling the teacher-output table (part of the teacher's time)
    seconds: float  # the fit itself


def distill(
    model: nn.Module,
    method: nn.Module,
    teacher: cache.Teacher,
    data: Any,
    cfg: DictConfig,
    fitting: training.Fitting,
    role: str,
    checkpoint_dir: Path | None,
    max_epochs: int,
    seed: int,
    optim: DictConfig | None = None,
    single_process: bool = False,
) -> Fitted:
    """Train ``model`` in place with ``method`` against the frozen ``teacher`` (its outputs from the
    cached table when the run's ``teacher_outputs`` allow), by ``optim`` (the run's ``optim`` when
    None), seeded with ``seed``, logging as ``role``."""
    taught = settings_of(outputs.OutputSettings, resolved(cfg.teacher_outputs))
    optim = optim if optim is not None else cfg.optim
    given = outputs.for_run(taught, str(cfg.trainer.accelerator), teacher, data, method)
    pl.seed_everything(seed, workers=True, verbose=False)  # a cache miss drew random numbers
    tick = time.perf_counter()
    live = teacher.model if needs_teacher(method) and given.table is None else None
    module = DistillationModule(
        model,
        live,
        method,
        teacher_table=given.table,
        optimizer=instantiate(optim.optimizer),
        scheduler=scheduler_factory(optim),
    )
    fit, run_loggers = fitting.trainer_for(role, checkpoint_dir, max_epochs, single_process=single_process)
    fit.fit(module, **adapter.fit_arguments(data, indexed=given.table is not None or needs_index(method)))
    best = training.restore_best(module, fit)
    return Fitted(best, run_loggers, given.mode, given.seconds, time.perf_counter() - tick)


def cotrain(
    peers: list[nn.Module],
    method: nn.Module,
    data: Any,
    optim: DictConfig,
    fitting: training.Fitting,
    checkpoint_dir: Path | None,
    max_epochs: int,
) -> Fitted:
    """Train ``peers`` together with the co-training ``method``; all are restored from the epoch
    that is best for peer 0, the student."""
    tick = time.perf_counter()
    module = CoTrainingModule(peers, method, optimizer=instantiate(optim.optimizer), scheduler=scheduler_factory(optim))
    fit, run_loggers = fitting.trainer_for("student", checkpoint_dir, max_epochs)
    fit.fit(module, **adapter.fit_arguments(data, indexed=False))
    best = training.restore_best(module, fit)
    return Fitted(best, run_loggers, "cotrained", 0.0, time.perf_counter() - tick)


def student(
    cfg: DictConfig, parts: Any, source: cache.Teacher | None, fitting: training.Fitting
) -> tuple[Fitted, dict[str, Any] | None, cache.Teacher | None]:
    """The run's student fit (``parts``: the ``pipeline.Parts``): distilled from ``source`` (the
    teacher, or its assistant), after ``student.init`` when set; or, with a co-training method,
    trained with its peers. Returns the fit, the weight transfer's report, and for co-training the
    peer that stands in the teacher's place."""
    checkpoints, epochs = parts.out / "checkpoints", int(cfg.trainer.max_epochs)
    handoff = stacked.handoff(parts.out)
    if handoff is not None:  # trained with its group by hydra/launcher=stacked
        return taken_over(handoff, parts.student, fitting, checkpoints), None, None
    if cotrains(parts.method):
        fitted = cotrain(parts.peers, parts.method, parts.data, cfg.optim, fitting, checkpoints, epochs)
        return fitted, None, as_teacher(parts.peers, parts.method, parts.names, parts.out)
    init = None
    if cfg.student.init:
        names = (parts.names["student"], source.arch or parts.names["teacher"])
        init = transfer.apply(parts.student, source.model, cfg.student.init_weight, names)
    args = (parts.data, cfg, fitting, "student", checkpoints, epochs, parts.settings.seed)
    return distill(parts.student, parts.method, source, *args), init, None


def taken_over(handoff: stacked.Handoff, model: nn.Module, fitting: training.Fitting, checkpoint_dir: Path) -> Fitted:
    """A member of a stacked group, trained with its group, finished as its own fit would have
    ended: the best weights loaded into ``model`` and saved as ``checkpoint_dir/best.ckpt``, the
    metrics of every epoch logged to the job's loggers at the steps Lightning logs them."""
    trained = handoff.trained
    if trained.error is not None:
        raise FloatingPointError(trained.error)
    model.load_state_dict(trained.state)
    checkpoint = stacked.checkpoint(trained.state, trained.best_epoch, trained.best_step)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    io.atomic_save(checkpoint_dir / "best.ckpt", lambda handle: torch.save(checkpoint, handle))
    run_loggers = fitting.loggers("student")
    for step, metrics in trained.history:
        for logger in run_loggers:
            logger.log_metrics(metrics, step)
    for logger in run_loggers:
        logger.save()
    return Fitted(trained.best_epoch, run_loggers, handoff.mode, handoff.table_seconds, handoff.seconds)
