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
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from distillab import training
from distillab.data import adapter
from distillab.distill.cotraining import CoTrainingModule
from distillab.distill.methods.base import needs_index, needs_teacher
from distillab.distill.module import DistillationModule
from distillab.teacher import cache, outputs
from distillab.teacher.training import scheduler_factory


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
    taught: outputs.OutputSettings,
    accelerator: str,
    optim: DictConfig,
    fitting: training.Fitting,
    role: str,
    checkpoint_dir: Path,
    max_epochs: int,
    seed: int,
    single_process: bool = False,
) -> Fitted:
    """Train ``model`` in place with ``method`` against the frozen ``teacher`` (its outputs from the
    cached table when ``taught`` allows), seeded with ``seed``, logging as ``role``."""
    given = outputs.for_run(taught, accelerator, teacher, data, method)
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
    checkpoint_dir: Path,
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
