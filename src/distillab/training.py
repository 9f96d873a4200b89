"""The Lightning Trainer of a run, built from the ``trainer`` and ``callbacks`` nodes.

One function builds every Trainer of a run (teacher, student, compression fine-tuning) so they
share the accelerator, precision and callbacks, and each keeps the checkpoint with the best
validation accuracy. Nothing here edits the config it is given: a trainer that must run in one
process (a teacher trained while the other ranks wait, a fine-tuning whose closures cannot be
sent to spawned workers) is asked for with ``single_process=True``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from distillab.settings import Count, NonNegativeCount, Range

ACCELERATORS = Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"]
PRECISIONS = Literal[
    "64",
    "32",
    "16",
    "bf16",
    "64-true",
    "32-true",
    "16-mixed",
    "bf16-mixed",
    "16-true",
    "bf16-true",
    "transformer-engine",
    64,
    32,
    16,
]
# the Trainer arguments that make a distributed trainer a single-process one
SINGLE_PROCESS = {"devices": 1, "num_nodes": 1, "strategy": "auto", "sync_batchnorm": False}


@dataclasses.dataclass(frozen=True)
class TrainerSettings:
    """The Lightning Trainer arguments a run may set (``conf/trainer/``); others are rejected.
    ``sync_batchnorm`` needs GPUs (torch has no CPU kernel for SyncBatchNorm)."""

    _target_: str
    accelerator: ACCELERATORS
    devices: Any
    strategy: Any
    num_nodes: Count
    precision: PRECISIONS
    sync_batchnorm: bool
    max_epochs: Count
    min_epochs: NonNegativeCount | None
    max_steps: int
    max_time: str | None
    limit_train_batches: Any
    limit_val_batches: Any
    check_val_every_n_epoch: Count | None
    val_check_interval: Any
    log_every_n_steps: Count
    enable_progress_bar: bool
    enable_model_summary: bool
    num_sanity_val_steps: int
    accumulate_grad_batches: Count
    gradient_clip_val: Annotated[float, Range(0)] | None
    gradient_clip_algorithm: Literal["norm", "value"] | None
    deterministic: Any
    benchmark: bool | None
    detect_anomaly: bool
    fast_dev_run: Any
    inference_mode: bool
    profiler: str | None


def make_trainer(
    trainer: DictConfig,
    callbacks: DictConfig | None,
    loggers: list,
    checkpoint_dir: Path | None,
    max_epochs: int,
    root_dir: Path,
    extra: list | None = None,
    single_process: bool = False,
) -> pl.Trainer:
    """A Trainer from the ``trainer`` node that keeps the checkpoint with the best validation
    accuracy in ``checkpoint_dir`` (None: no checkpoint, the last epoch is the result), with the
    ``callbacks`` node's callbacks plus ``extra``; ``single_process``: on one device whatever
    the configured strategy."""
    show_progress = bool(trainer.get("enable_progress_bar", True))
    built = [
        instantiate(conf)
        for conf in (callbacks or {}).values()
        if conf is not None and (show_progress or not str(conf._target_).endswith("ProgressBar"))
    ] + list(extra or [])
    if checkpoint_dir is not None:
        # ties keep the earlier epoch; the file is written through a temporary file (fsspec)
        built.append(
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
    arguments = OmegaConf.to_container(trainer, resolve=True)
    arguments.update(SINGLE_PROCESS if single_process else {})
    return instantiate(
        arguments,
        max_epochs=int(max_epochs),
        callbacks=built,
        logger=loggers or False,
        enable_checkpointing=checkpoint_dir is not None,
        default_root_dir=str(root_dir),
        _convert_="all",
    )


@dataclasses.dataclass(frozen=True)
class Fitting:
    """How a run fits a model (its teacher, its student, a compressed model): the ``trainer`` and
    ``callbacks`` nodes, the run's folder, and ``loggers(role)``, the loggers of one role."""

    trainer: DictConfig
    callbacks: DictConfig | None
    root_dir: Path
    loggers: Callable[[str], list] = lambda role: []

    def trainer_for(
        self,
        role: str | None,
        checkpoint_dir: Path | None,
        max_epochs: int,
        extra: list | None = None,
        single_process: bool = False,
    ) -> tuple[pl.Trainer, list]:
        """A Trainer for ``role`` (None: no loggers) and the loggers it logs to."""
        run_loggers = self.loggers(role) if role is not None else []
        trainer = make_trainer(
            self.trainer,
            self.callbacks,
            run_loggers,
            checkpoint_dir,
            max_epochs,
            self.root_dir,
            extra=extra,
            single_process=single_process,
        )
        return trainer, run_loggers


def restore_best(module: pl.LightningModule, trainer: pl.Trainer) -> int:
    """Load the best-on-validation weights into ``module`` (``weights_only=True``); return that epoch."""
    callback = trainer.checkpoint_callback
    path = callback.best_model_path if callback is not None else ""
    if not path:
        return int(trainer.current_epoch)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict(checkpoint["state_dict"])
    return int(checkpoint["epoch"])


def one_device(trainer: DictConfig) -> bool:
    """Whether the trainer node runs on a single device of a single node."""
    return str(trainer.get("devices", "auto")) == "1" and int(trainer.get("num_nodes", 1)) == 1


def spawns_workers(trainer: DictConfig) -> bool:
    """Whether the strategy starts its processes inside ``fit`` (ddp_spawn, ddp_fork) instead of
    re-running the script, which would run the whole job once more in every new process."""
    return any(word in str(trainer.get("strategy", "auto")) for word in ("spawn", "fork", "notebook"))
