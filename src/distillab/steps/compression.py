"""Step 6 of a run: compress the trained student (or the teacher), fine-tuning with distillation.

``dry_run`` applies the method to a copy of the untrained model with one calibration batch and
no fine-tuning, so a method that cannot apply (a budget larger than the model, a layer pruned
away, nothing to quantize) fails before any training. ``run`` compresses the trained model:
fine-tuning uses the run's own distillation loss with the uncompressed model as the teacher.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from distillab import compress, training
from distillab.compress import plots
from distillab.data import adapter
from distillab.distill.methods.base import is_feature_method, needs_index, needs_teacher
from distillab.distill.module import DistillationModule
from distillab.io import atomic_write_text
from distillab.settings import ConfigError, under

log = logging.getLogger(__name__)


@dataclasses.dataclass
class CompressedRun:
    """The compressed model and what the results need of it."""

    result: compress.Compressed
    float_model: nn.Module  # the last floating-point model of the chain (its MACs)
    artifact: Path
    role: str  # "student" or "teacher"
    arch: str


@dataclasses.dataclass(frozen=True)
class Finetuning:
    """What fine-tuning after compression trains with: the run's method, optimizer and fitting."""

    build_method: Callable[[], nn.Module]
    optim: DictConfig
    fitting: training.Fitting


def dry_run(node: DictConfig, name: str, model: nn.Module, data: Any, input_shape: tuple[int, ...]) -> None:
    """Apply ``node`` to a CPU copy of the untrained ``model`` with one batch and no fine-tuning."""

    def one_batch() -> list:
        return [next(iter(data.train_dataloader()))]

    def one_val_batch() -> list:
        data.setup("validate")
        return [next(iter(data.val_dataloader()))]

    context = compress.Context(
        input_shape=tuple(input_shape),
        train_batches=one_batch,
        finetune_epochs=int(node.finetune_epochs),
        finetune=lambda *args, **kwargs: None,
        val_batches=one_val_batch,
        reference_val_acc=1.0,
        dry_run=True,
    )
    with torch.random.fork_rng(devices=[]):
        try:
            compress.apply(node, copy.deepcopy(model).cpu(), context, name)
        except ConfigError as error:  # a compressor names its own argument; the run names the key
            raise ConfigError(under("compress", str(error))) from None


def run(
    node: DictConfig,
    name: str,
    role: str,
    arch: str,
    model: nn.Module,
    data: Any,
    input_shape: tuple[int, ...],
    finetuning: Finetuning,
    out: Path,
    how: dict[str, Any] | None = None,
) -> CompressedRun:
    """Compress a CPU copy of ``model`` by ``node``, fine-tuning with ``finetuning`` and ``model`` as
    the teacher, and save the artifact to ``out/compressed/model<suffix>`` atomically, with the
    result's tables beside it (``compressed/<name>.csv``, and ``<name>.png`` for those ``compress.plots`` draws);
    ``how``: the run's measure settings."""
    uncompressed = copy.deepcopy(model).cpu().eval()
    epochs = int(node.finetune_epochs)

    def val_batches() -> Any:
        data.setup("validate")
        return data.val_dataloader()

    def finetune(target: nn.Module, n_epochs: int, on_epoch_start: Callable[[int], None] | None = None) -> None:
        finetune_with_teacher(finetuning, data, target, uncompressed, n_epochs, on_epoch_start)

    context = compress.Context(
        input_shape=tuple(input_shape),
        train_batches=data.train_dataloader,
        finetune_epochs=epochs,
        finetune=finetune if epochs > 0 else None,
        val_batches=val_batches,
        measure=dict(how or {}),
    )
    context.reference_val_acc = compress.val_accuracy(uncompressed, context)
    log.info("compress: %s of the %s (fine-tune %d epochs)", name, role, epochs)
    result, float_model = compress.apply(node, uncompressed, context, name)
    artifact = out / "compressed" / f"model{result.suffix}"
    artifact.parent.mkdir(parents=True, exist_ok=True)
    staging = artifact.with_name(f".{artifact.name}.tmp")
    result.save(staging)
    os.replace(staging, artifact)
    for table, rows in result.tables.items():
        csv_path = write_table(artifact.parent / f"{table}.csv", rows)
        plots.save_figure(table, rows, csv_path.with_suffix(".png"), result.details)
    return CompressedRun(result, float_model, artifact, role, arch)


def write_table(path: Path, rows: list[dict[str, Any]]) -> Path:
    """``rows`` (dicts with the same keys) as a CSV file, written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())


def finetune_with_teacher(
    finetuning: Finetuning,
    data: Any,
    model: nn.Module,
    teacher: nn.Module,
    epochs: int,
    on_epoch_start: Callable[[int], None] | None = None,
) -> None:
    """Train ``model`` in place for ``epochs`` with the run's method, ``teacher`` frozen; the last
    epoch is the result (a pruning schedule changes the model from epoch to epoch)."""
    method = finetuning.build_method()
    teacher = copy.deepcopy(teacher) if needs_teacher(method) else None
    if is_feature_method(method):
        example = next(iter(data.train_dataloader()))[0][:8]
        size = adapter.train_size(data) if needs_index(method) else None
        method.bind(
            model, teacher, example.to(next(model.parameters()).device), same_architecture=True, train_size=size
        )
    module = DistillationModule(model, teacher, method, optimizer=instantiate(finetuning.optim.optimizer))
    hooks = [_EpochStart(on_epoch_start)] if on_epoch_start is not None else []
    # in one process: a pruning schedule's closure and QAT observers cannot be sent to spawned
    # DDP workers, and fine-tuning is short
    trainer, _ = finetuning.fitting.trainer_for(None, None, epochs, extra=hooks, single_process=True)
    module.train()  # Lightning keeps the mode it is given; the model arrives in eval mode
    trainer.fit(module, **adapter.fit_arguments(data, indexed=needs_index(method)))
    model.cpu().eval()


class _EpochStart(pl.Callback):
    def __init__(self, hook: Callable[[int], None]) -> None:
        self.hook = hook

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.hook(trainer.current_epoch)
