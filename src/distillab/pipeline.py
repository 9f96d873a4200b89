"""One run: data → teacher → student → distillation → compression → measurement → results.json.

``run(cfg)`` reads top to bottom as the steps of a run. Everything that can be checked
without training (config values, model construction) is checked first, so bad input fails
with one line and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from distillab import loggers, measure, results, teachers
from distillab.config import ConfigError, validate
from distillab.data.base import InMemoryDataModule
from distillab.distill.losses import CrossEntropy
from distillab.distill.module import ClassifierModule, DistillationModule
from distillab.evaluate import agreement, classification_metrics, predict

log = logging.getLogger(__name__)

# Lightning's start-up banner ("GPU available: …", tips) is noise in a sweep's logs
for _name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# metrics are logged once per epoch, and in-memory batches need no worker processes
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


@dataclass
class Parts:
    """What a run is made of, all built (and so checked) before any training."""

    data: InMemoryDataModule
    student: nn.Module
    teacher: nn.Module  # untrained: the cache or training fills it
    loss: nn.Module
    out: Path


# -- the run -----------------------------------------------------------------------------------
def run(cfg: DictConfig, raise_on_failure: bool | None = None) -> dict[str, Any]:
    """Run one experiment and return its results (also written to results.json).

    A bad configuration raises ``ConfigError`` before anything is written. A failure later
    (NaN loss, a crash) is recorded as ``status: failed`` with a one-line error; it is then
    re-raised for a single run, and swallowed in a sweep so the other jobs go on.
    """
    if raise_on_failure is None:
        raise_on_failure = not _is_multirun()
    start = time.perf_counter()
    out = Path(cfg.paths.output_dir)
    try:
        validate(cfg)
        if cfg.get("num_threads"):
            torch.set_num_threads(int(cfg.num_threads))
        # before any model is built: the student's initial weights depend on the seed only
        pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
        parts = prepare(cfg)
        record = execute(cfg, parts, start)
    except Exception as error:  # noqa: BLE001 - every failure is recorded, then re-raised or logged
        # bad input of a single run leaves nothing behind; in a sweep the report lists it
        if raise_on_failure and isinstance(error, ConfigError):
            raise
        record = failure(cfg, error)
        if _is_rank_zero():
            results.write(out, record)
        if raise_on_failure:
            raise
        log.error("run failed: %s", record["error"])
    return record


def prepare(cfg: DictConfig) -> Parts:
    data = _build("data", cfg.data)
    data.setup()
    data.shuffle_seed = int(cfg.seed)
    log.info("data %s", data.describe())
    _teacher_augmentation(data, cfg.teacher.recipe.get("augment"))
    student = build_model("student", cfg.student, data)
    # the teacher's initial weights depend on its own seed, never on the run's: the cache
    # key leaves the run seed out, so whichever sweep job trains it must get the same teacher
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.teacher.recipe.seed))
        teacher = build_model("teacher", cfg.teacher, data)
    loss = _build("distill", cfg.distill)
    return Parts(data, student, teacher, loss, Path(cfg.paths.output_dir))


def execute(cfg: DictConfig, parts: Parts, start: float) -> dict[str, Any]:
    data, student, loss, out = parts.data, parts.student, parts.loss, parts.out
    teacher = teachers.obtain(
        cfg, parts.teacher, train=lambda model, staging: train_teacher(cfg, model, data, staging)
    )

    # training a teacher (cache miss) consumed random numbers; a hit did not
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    student_start = time.perf_counter()
    module = DistillationModule(
        student,
        teacher.model if loss.needs_teacher else None,
        loss,
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=_scheduler(cfg.optim),
    )
    run_loggers = loggers.build(cfg, "student", _sweep_group())
    trainer = make_trainer(cfg, run_loggers, out / "checkpoints", cfg.trainer.max_epochs)
    trainer.fit(module, datamodule=data)
    best_epoch = restore_best(module, trainer)
    student_seconds = time.perf_counter() - student_start

    device = trainer.strategy.root_device
    record = assemble(cfg, data, teacher, student, best_epoch, loss.method, device)
    record["timing_s"] = {
        "teacher": round(teacher.seconds, 3),
        "student": round(student_seconds, 3),
        "compress": 0.0,
        "total": round(time.perf_counter() - start, 3),
    }
    if _is_rank_zero():
        path = results.write(out, record)
        log.info("\n%s", summary_table(record))
        log.info("results written to %s", path)
    loggers.finish(run_loggers, _flatten(record))
    return record


# -- building blocks -----------------------------------------------------------------------------
def _build(key: str, node: DictConfig, **kwargs: Any) -> Any:
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__ or error
        message = str(cause).splitlines()[0]
        # a message "<argument>=<value>: ..." names its key relative to the node
        if re.match(r"^\w+=", message):
            raise ConfigError(f"{key}.{message}") from None
        raise ConfigError(f"{key}: {type(cause).__name__}: {message}") from None


def build_model(role: str, node: DictConfig, data: InMemoryDataModule) -> nn.Module:
    """Instantiate an architecture with the input shape and class count of ``data``."""
    role_keys = teachers.ROLE_KEYS if role == "teacher" else ()
    arch = OmegaConf.create({k: v for k, v in node.items() if k not in role_keys})
    return _build(role, arch, input_shape=data.input_shape, num_classes=data.num_classes)


def _scheduler(optim: DictConfig) -> Any:
    """The scheduler factory of an ``optim`` node; ``optim/scheduler=none`` has no target."""
    node = optim.get("scheduler")
    return instantiate(node) if node is not None and node.get("_target_") else None


def make_trainer(cfg: DictConfig, run_loggers: list, checkpoint_dir: Path, max_epochs: int) -> pl.Trainer:
    """A Trainer from ``cfg.trainer`` that keeps the checkpoint with the best validation accuracy."""
    show_progress = bool(cfg.trainer.enable_progress_bar)
    callbacks = [
        instantiate(conf)
        for conf in (cfg.get("callbacks") or {}).values()
        if conf is not None and (show_progress or not conf._target_.endswith("ProgressBar"))
    ]
    # ties keep the earlier epoch; the file is written through a temporary file (fsspec)
    callbacks.append(
        ModelCheckpoint(
            dirpath=checkpoint_dir,
            filename="best",
            monitor="val/acc",
            mode="max",
            save_top_k=1,
            save_weights_only=True,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        )
    )
    return instantiate(
        cfg.trainer,
        max_epochs=int(max_epochs),
        callbacks=callbacks,
        logger=run_loggers or False,
        default_root_dir=str(cfg.paths.output_dir),
        _convert_="all",
    )


def restore_best(module: pl.LightningModule, trainer: pl.Trainer) -> int:
    """Load the best-on-validation weights into ``module``; return that epoch."""
    path = trainer.checkpoint_callback.best_model_path
    if not path:
        return int(trainer.current_epoch)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict(checkpoint["state_dict"])
    return int(checkpoint["epoch"])


def train_teacher(cfg: DictConfig, model: nn.Module, data: InMemoryDataModule, staging: Path) -> dict[str, Any]:
    recipe = cfg.teacher.recipe
    pl.seed_everything(int(recipe.seed), workers=True, verbose=False)
    module = ClassifierModule(
        model, CrossEntropy(), optimizer=instantiate(recipe.optim.optimizer), scheduler=_scheduler(recipe.optim)
    )
    run_loggers = loggers.build(cfg, "teacher", _sweep_group())
    trainer = make_trainer(cfg, run_loggers, staging / "checkpoints", recipe.max_epochs)
    with _teacher_augmentation(data, recipe.get("augment")):
        trainer.fit(module, datamodule=data)
    best_epoch = restore_best(module, trainer)
    shutil.rmtree(staging / "checkpoints", ignore_errors=True)
    val_preds, val_targets = predict(model, data.val_dataloader(), module.device)
    metrics = {
        "best_epoch": best_epoch,
        "val": classification_metrics(val_preds, val_targets, data.num_classes),
    }
    loggers.finish(run_loggers, {"teacher/val_acc": metrics["val"]["acc"]})
    return metrics


def _teacher_augmentation(data: Any, augment: bool | None) -> contextlib.AbstractContextManager:
    """The teacher recipe's augmentation switch, checked in ``prepare`` before any training."""
    if augment is None:
        return contextlib.nullcontext()
    if not hasattr(data, "augmentation"):
        raise ConfigError(f"teacher.recipe.augment={augment} needs a datamodule with an augmentation() switch "
                          f"(distillab.data.InMemoryDataModule); {type(data).__name__} has none: set it to null")
    return data.augmentation(augment)


# -- results ----------------------------------------------------------------------------------
def assemble(
    cfg: DictConfig,
    data: InMemoryDataModule,
    teacher: teachers.Teacher,
    student: nn.Module,
    best_epoch: int,
    method: str,
    device: torch.device,
) -> dict[str, Any]:
    """Evaluate teacher and student on the test split (once) and measure both."""
    classes = data.num_classes
    teacher_preds, targets = predict(teacher.model.to(device), data.test_dataloader(), device)
    student_preds, _ = predict(student.to(device), data.test_dataloader(), device)
    val_preds, val_targets = predict(student, data.val_dataloader(), device)
    teacher_test = classification_metrics(teacher_preds, targets, classes)
    student_test = classification_metrics(student_preds, targets, classes)
    student_test["agreement"] = agreement(student_preds, teacher_preds)
    how = {"threads": cfg.measure.threads, "warmup": cfg.measure.warmup, "repeats": cfg.measure.repeats}
    teacher_profile = measure.profile(teacher.model, data.input_shape, **how)
    student_profile = measure.profile(student, data.input_shape, **how)
    overrides = _overrides()
    return {
        "status": "ok",
        "config_hash": results.config_hash(cfg),
        "group": results.group_of(overrides),
        "overrides": overrides,
        "seed": int(cfg.seed),
        "dataset": data.name,
        "method": method,
        "compress": str(cfg.compress.method),
        "teacher": {
            "arch": teachers.arch_name(cfg.teacher),
            "params": teacher_profile["params"],
            "size_bytes": teacher_profile["size_bytes"],
            "macs": teacher_profile["macs"],
            "latency_ms": teacher_profile["latency_ms"],
            "cache": teacher.cache,
            "cache_key": teacher.key,
            "test": teacher_test,
        },
        "student": {
            "arch": teachers.arch_name(cfg.student),
            **student_profile,
            "best_epoch": best_epoch,
            "test": student_test,
            "val": {"acc": classification_metrics(val_preds, val_targets, classes)["acc"]},
        },
        "ratios": {
            "params": student_profile["params"] / teacher_profile["params"],
            "size": student_profile["size_bytes"] / teacher_profile["size_bytes"],
            "acc_retention": student_test["acc"] / max(teacher_test["acc"], 1e-12),
        },
        "env": results.environment(Path(cfg.paths.root_dir), str(device)),
    }


def failure(cfg: DictConfig, error: BaseException) -> dict[str, Any]:
    message = " ".join(str(error).split()) or type(error).__name__
    overrides = _overrides()
    return {
        "status": "failed",
        "error": f"{type(error).__name__}: {message}"[:500],
        "group": results.group_of(overrides),
        "overrides": overrides,
        "seed": int(cfg.seed),
    }


def summary_table(record: dict[str, Any]) -> str:
    teacher, student, ratios = record["teacher"], record["student"], record["ratios"]
    rows = [
        ("", f"teacher ({teacher['arch']})", f"student ({student['arch']})"),
        ("test accuracy", f"{teacher['test']['acc']:.4f}", f"{student['test']['acc']:.4f}"),
        ("test macro F1", f"{teacher['test']['f1']:.4f}", f"{student['test']['f1']:.4f}"),
        ("parameters", f"{teacher['params']:,}", f"{student['params']:,}"),
        ("size (bytes)", f"{teacher['size_bytes']:,}", f"{student['size_bytes']:,}"),
        ("compression (params)", "", f"{1 / ratios['params']:.1f}x smaller"),
        ("accuracy retention", "", f"{100 * ratios['acc_retention']:.1f} %"),
        ("agreement with teacher", "", f"{100 * student['test']['agreement']:.1f} %"),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}" for r in rows)


# -- Hydra context ----------------------------------------------------------------------------
def _hydra() -> Any:
    return HydraConfig.get() if HydraConfig.initialized() else None


def _is_multirun() -> bool:
    hydra_cfg = _hydra()
    return hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN


def _overrides() -> list[str]:
    hydra_cfg = _hydra()
    return list(hydra_cfg.overrides.task) if hydra_cfg is not None else []


def _sweep_group() -> str | None:
    hydra_cfg = _hydra()
    if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return Path(hydra_cfg.sweep.dir).as_posix().replace("/", "-").strip("-.")


def _is_rank_zero() -> bool:
    from pytorch_lightning.utilities import rank_zero_only

    return rank_zero_only.rank == 0


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}/"))
        elif not isinstance(value, list):
            flat[name] = value
    return flat
