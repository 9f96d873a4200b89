"""How a teacher is trained when the cache misses: the ``teacher.recipe`` node.

The recipe has its own epochs, seed and optimizer, and may switch the data's augmentation and
share of labels for the teacher alone; all of it is part of the teacher's cache key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from pathlib import Path
from typing import Annotated, Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from distillab import loggers, training
from distillab.distill.methods.none import CrossEntropy
from distillab.distill.module import ClassifierModule
from distillab.evaluate import classification_metrics, predict
from distillab.settings import ConfigError, NonNegativeCount, Range, Seed
from distillab.steps.teacher import cache


@dataclasses.dataclass(frozen=True)
class Recipe:
    """``teacher.recipe``. ``augment``: training-batch augmentation for the teacher only (null:
    as the data says); ``labelled_fraction``: the share of training labels it trains on (null:
    all of them, whatever ``data.labelled_fraction`` gives the student). ``max_epochs=0``: the
    teacher is used as built (a pretrained model's weights), evaluated and cached, never fitted:
    one fit at learning rate 0 would still move its BatchNorm statistics."""

    max_epochs: NonNegativeCount
    seed: Seed
    optim: dict[str, Any]
    augment: bool | None
    labelled_fraction: (
        Annotated[float, Range(0, 1, low_open=True, what="a fraction", note="of the training labels, or null for all")]
        | None
    )


@dataclasses.dataclass(frozen=True)
class TeacherRole:
    """The teacher node's own keys, beside its architecture's. ``ckpt_path``: a state_dict file
    to load instead of training (``weights_only=True``); the cache is then bypassed."""

    ckpt_path: str | None
    recipe: Recipe


def scheduler_factory(optim: DictConfig) -> Any:
    """The scheduler factory of an ``optim`` node; ``optim/scheduler=none`` has no target."""
    node = optim.get("scheduler")
    return instantiate(node) if node is not None and node.get("_target_") else None


def train(
    model: nn.Module,
    data: Any,
    num_classes: int,
    recipe: DictConfig,
    fitting: training.Fitting,
    role: str,
    staging: Path,
    single_process: bool = False,
) -> dict[str, Any]:
    """Fit ``model`` with cross-entropy by ``recipe``; keep its best-on-validation epoch and return
    its metrics (``best_epoch``, ``val`` over ``num_classes`` classes). It logs as ``role``
    ("teacher", "teacher-<name>"); checkpoints go to ``staging``."""
    pl.seed_everything(int(recipe.seed), workers=True, verbose=False)
    if int(recipe.max_epochs) == 0:
        return _as_built(model, data, num_classes, str(fitting.trainer.get("accelerator", "auto")))
    optimizer, scheduler = instantiate(recipe.optim.optimizer), scheduler_factory(recipe.optim)
    module = ClassifierModule(model, CrossEntropy(), optimizer=optimizer, scheduler=scheduler)
    fit, run_loggers = fitting.trainer_for(
        role, staging / "checkpoints", int(recipe.max_epochs), single_process=single_process
    )
    with augmentation(data, recipe.get("augment")), labels(data, recipe.get("labelled_fraction")):
        fit.fit(module, datamodule=data)
    best_epoch = training.restore_best(module, fit)
    shutil.rmtree(staging / "checkpoints", ignore_errors=True)
    val_preds, val_targets = predict(model, data.val_dataloader(), module.device)
    metrics = {"best_epoch": best_epoch, "val": classification_metrics(val_preds, val_targets, num_classes)}
    loggers.finish(run_loggers, {"teacher/val_acc": metrics["val"]["acc"]})
    return metrics


def _as_built(model: nn.Module, data: Any, num_classes: int, accelerator: str) -> dict[str, Any]:
    """The metrics of a teacher used as built (``max_epochs=0``): no fit, its validation accuracy,
    evaluated on the run's GPU when it has one."""
    gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    data.setup("fit")
    val_preds, val_targets = predict(model.to(device), data.val_dataloader(), device)
    model.cpu()
    return {"best_epoch": 0, "val": classification_metrics(val_preds, val_targets, num_classes)}


def obtain(
    model: nn.Module,
    node: DictConfig,
    data: Any,
    num_classes: int,
    data_node: DictConfig,
    cache_dir: str | Path,
    fitting: training.Fitting,
    role: str,
) -> cache.Teacher:
    """The teacher of ``node`` (architecture, recipe, ``ckpt_path``) for ``data`` (``num_classes``
    classes, configured by ``data_node``): from its file, from the cache, or trained now by its
    recipe (``cache.obtain``)."""

    def fit(untrained: nn.Module, staging: Path, single_process: bool) -> dict[str, Any]:
        return train(untrained, data, num_classes, node.recipe, fitting, role, staging, single_process)

    identity = cache.identity(data_node, node, str(fitting.trainer.precision))
    return cache.obtain(
        model, identity, cache_dir, fitting.trainer, fit, node.get("ckpt_path"), int(node.recipe.max_epochs)
    )


def check_data(data: Any, recipe: DictConfig) -> None:
    """The recipe's data switches need a datamodule that has them; checked before any training."""
    augmentation(data, recipe.get("augment"))
    labels(data, recipe.get("labelled_fraction"))


def augmentation(data: Any, augment: bool | None) -> contextlib.AbstractContextManager:
    """The recipe's augmentation switch (None: as the data says)."""
    if augment is None:
        return contextlib.nullcontext()
    if not hasattr(data, "augmentation"):
        raise ConfigError(
            f"teacher.recipe.augment={augment} needs a datamodule with an augmentation() switch "
            f"(distillab.data.InMemoryDataModule); {type(data).__name__} has none: set it to null"
        )
    return data.augmentation(augment)


def labels(data: Any, fraction: float | None) -> contextlib.AbstractContextManager:
    """The recipe's share of training labels (None: all of them, whatever the student sees)."""
    if hasattr(data, "labelled"):
        return data.labelled(fraction)
    if fraction is None:
        return contextlib.nullcontext()
    raise ConfigError(
        f"teacher.recipe.labelled_fraction={fraction} needs a datamodule with a labelled() switch "
        f"(distillab.data.InMemoryDataModule); {type(data).__name__} has none: set it to null"
    )
