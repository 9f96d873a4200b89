"""The content-addressed teacher cache.

A teacher is trained once per key (dataset and split, architecture, training recipe, seed)
and stored as ``<cache_dir>/<arch>-<dataset>-<key>/`` with ``teacher.pt`` (state_dict),
``config.yaml`` and ``metrics.json``. It is trained in a private staging folder that is
renamed into place only when complete, under a file lock, so two sweep jobs that miss the
same teacher train it once and a killed job never leaves a folder a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf
from torch import nn

from distillab.io import atomic_save, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

CHECKPOINT, CONFIG, METRICS = "teacher.pt", "config.yaml", "metrics.json"

# keys of the teacher node that describe the role, not the architecture
ROLE_KEYS = ("recipe", "ckpt_path")


@dataclass
class Teacher:
    model: nn.Module
    key: str
    cache: str  # "hit", "miss" or "file"
    path: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    members: list[Teacher] = field(default_factory=list)  # the teachers of an ensemble
    arch: str = ""  # the name results and logs give it; set for ensembles


def arch_name(model_cfg: DictConfig) -> str:
    """``resnet20``, ``cnn``; library models by their name: ``torchvision:resnet18``."""
    builder = str(model_cfg.get("_target_", "model")).rsplit(".", 1)[-1].lower()
    if model_cfg.get("name"):
        return f"{builder.removesuffix('_model')}:{model_cfg.name}"
    return builder


def identity(cfg: DictConfig) -> dict[str, Any]:
    """What determines the trained teacher; display and speed settings are left out."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    for key in ("eval_batch_size",):
        data.pop(key, None)
    return {
        "data": data,
        "teacher": OmegaConf.to_container(cfg.teacher, resolve=True),
        "precision": str(cfg.trainer.precision),
        "format": 1,
    }


def cache_key(cfg: DictConfig) -> str:
    blob = json.dumps(identity(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_folder(cfg: DictConfig) -> Path:
    dataset = str(cfg.data._target_).rsplit(".", 1)[-1].replace("DataModule", "").lower()
    arch = arch_name(cfg.teacher).replace(":", "_")
    return Path(cfg.paths.cache_dir) / f"{arch}-{dataset}-{cache_key(cfg)}"


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (CHECKPOINT, CONFIG, METRICS))


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def obtain(cfg: DictConfig, model: nn.Module, train: Callable[[nn.Module, Path], dict[str, Any]]) -> Teacher:
    """Fill ``model`` (a fresh teacher of ``cfg``) from ``teacher.ckpt_path``, from the cache,
    or by ``train(model, staging_dir)``, which fits it (writing logs or checkpoints into
    ``staging_dir`` if it likes) and returns its metrics.
    """
    start = time.perf_counter()
    if cfg.teacher.get("ckpt_path"):
        path = Path(cfg.teacher.ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"teacher.ckpt_path={path} does not exist")
        model.load_state_dict(load_state_dict(path))
        log.info("teacher loaded from teacher.ckpt_path=%s (cache not used)", path)
        return Teacher(model.eval(), cache_key(cfg), "file", path, seconds=time.perf_counter() - start)

    folder = cache_folder(cfg)
    key = cache_key(cfg)
    if not is_complete(folder):
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):
            if not is_complete(folder):  # another job may have finished it while we waited
                log.info("teacher cache miss: key %s; training %s for %d epochs",
                         key, arch_name(cfg.teacher), cfg.teacher.recipe.max_epochs)
                metrics = _train_into(folder, cfg, model, train)
                teacher = Teacher(model.eval(), key, "miss", folder, metrics)
                teacher.seconds = time.perf_counter() - start
                return teacher
    model.load_state_dict(load_state_dict(folder / CHECKPOINT))
    metrics = json.loads((folder / METRICS).read_text())
    log.info("teacher cache hit: key %s (%s)", key, folder)
    return Teacher(model.eval(), key, "hit", folder, metrics, time.perf_counter() - start)


def _train_into(
    folder: Path, cfg: DictConfig, model: nn.Module, train: Callable[[nn.Module, Path], dict[str, Any]]
) -> dict[str, Any]:
    staging = folder.with_name(f".{folder.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        metrics = train(model, staging)
        atomic_save(staging / CHECKPOINT, lambda handle: torch.save(model.state_dict(), handle))
        atomic_write_text(staging / CONFIG, OmegaConf.to_yaml(identity(cfg)))
        atomic_write_json(staging / METRICS, metrics)
        if folder.exists():  # an incomplete folder from an older layout: never trusted
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return metrics
