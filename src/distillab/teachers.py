"""The content-addressed teacher cache.

A teacher is trained once per key (dataset and split, architecture, training recipe, seed)
and stored as ``<cache_dir>/<arch>-<dataset>-<key>/`` with ``teacher.pt`` (state_dict),
``config.yaml`` and ``metrics.json``. It is trained in a private staging folder that is
renamed into place only when complete, under a file lock, so two sweep jobs that miss the
same teacher train it once and a killed job never leaves a folder a later run would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from distillab.io import atomic_save, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

CHECKPOINT, CONFIG, METRICS = "teacher.pt", "config.yaml", "metrics.json"

# keys of the teacher node that describe the role, not the architecture
ROLE_KEYS = ("recipe", "ckpt_path")

# how long a rank > 0 of a distributed job waits for rank 0 to train a missing teacher
WAIT_ENV, WAIT_DEFAULT_S, POLL_S = "DISTILLAB_TEACHER_WAIT_S", 24 * 3600.0, 1.0
# the Trainer arguments that make a distributed trainer a single-process one
SINGLE_PROCESS = {"devices": 1, "num_nodes": 1, "strategy": "auto", "sync_batchnorm": False}


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
    # the student's share of labels is not the teacher's: that is teacher.recipe.labelled_fraction
    for key in ("eval_batch_size", "labelled_fraction"):
        data.pop(key, None)
    teacher = OmegaConf.to_container(cfg.teacher, resolve=True)
    recipe = teacher.get("recipe") or {}
    if "labelled_fraction" in recipe and recipe["labelled_fraction"] is None:
        del recipe["labelled_fraction"]  # all labels, as before the option existed: earlier cache entries still hit
    return {
        "data": data,
        "teacher": teacher,
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
    ``staging_dir`` if it likes) with the Trainer settings of ``cfg.trainer`` and returns its metrics.

    Under a launcher that runs the whole script once per device (torchrun, ``srun``) only rank 0
    trains a missing teacher, in one process; the other ranks wait for its cache entry.
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
    rank, world = launch_rank()
    if rank != 0 and not is_complete(folder):
        wait_for_rank_zero(folder, key, rank, world)
    if not is_complete(folder):
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):
            if not is_complete(folder):  # another job may have finished it while we waited
                log.info("teacher cache miss: key %s; training %s for %d epochs",
                         key, arch_name(cfg.teacher), cfg.teacher.recipe.max_epochs)
                with single_process_trainer(cfg, world):
                    metrics = _train_into(folder, cfg, model, train)
                teacher = Teacher(model.eval(), key, "miss", folder, metrics)
                teacher.seconds = time.perf_counter() - start
                return teacher
    model.load_state_dict(load_state_dict(folder / CHECKPOINT))
    metrics = json.loads((folder / METRICS).read_text())
    log.info("teacher cache hit: key %s (%s)", key, folder)
    return Teacher(model.eval(), key, "hit", folder, metrics, time.perf_counter() - start)


def launch_rank(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(rank, world size)`` when a launcher started this process as one of several that each run
    the whole script: torchrun (``RANK``, ``WORLD_SIZE``), SLURM ``srun`` (``SLURM_PROCID``,
    ``SLURM_NTASKS``) or Lightning's own ``ddp`` launcher (``LOCAL_RANK``, ``NODE_RANK``,
    ``WORLD_SIZE``); ``(0, 1)`` otherwise. Spawned DDP workers (ddp_spawn) never get here."""
    env = os.environ if env is None else env
    slurm = "SLURM_PROCID" in env and "SLURM_NTASKS" in env
    world = int(env.get("WORLD_SIZE") or (env["SLURM_NTASKS"] if slurm else 1))
    if world <= 1:
        return 0, 1
    if "RANK" in env:
        return int(env["RANK"]), world
    if slurm:
        return int(env["SLURM_PROCID"]), world
    node = int(env.get("NODE_RANK") or env.get("GROUP_RANK") or 0)
    local = int(env.get("LOCAL_RANK") or 0)
    return node * int(env.get("LOCAL_WORLD_SIZE") or world) + local, world


def wait_for_rank_zero(folder: Path, key: str, rank: int, world: int) -> None:
    """Block until rank 0 has put the teacher into ``folder``. Taking the file lock instead would
    deadlock: rank 0 may hold it while its trainer waits for every rank to join."""
    timeout = float(os.environ.get(WAIT_ENV) or WAIT_DEFAULT_S)
    log.info("rank %d of %d: waiting for rank 0 to train teacher %s into %s", rank, world, key, folder)
    deadline = time.monotonic() + timeout
    while not is_complete(folder):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"rank {rank} of {world} waited {timeout:g} s for rank 0 to train teacher {key} into {folder}: "
                f"is paths.cache_dir on a filesystem every node shares? ({WAIT_ENV} sets the wait)")
        time.sleep(POLL_S)


def spawns_workers(trainer: DictConfig) -> bool:
    """Whether the strategy starts its processes inside ``fit`` (ddp_spawn, ddp_fork) instead of
    re-running the script, which would run ``obtain`` once more in every new process."""
    return any(word in str(trainer.get("strategy", "auto")) for word in ("spawn", "fork", "notebook"))


@contextlib.contextmanager
def single_process_trainer(cfg: DictConfig, world: int) -> Iterator[None]:
    """``cfg.trainer`` on one device for the duration, when the teacher cannot be trained by the
    run's distributed trainer: the job was started once per device (``world`` > 1), or its
    strategy would start the other ranks by re-running the script, where they would wait for
    this very teacher. Spawned workers (ddp_spawn) and one-device runs keep their settings."""
    trainer = cfg.trainer
    one_device = str(trainer.get("devices", "auto")) == "1" and int(trainer.get("num_nodes", 1)) == 1
    if world <= 1 and (one_device or spawns_workers(trainer)):
        yield
        return
    saved = {key: trainer._get_node(key)._value() for key in SINGLE_PROCESS if key in trainer}
    log.info("training the teacher in this process on one device (trainer.strategy=%s runs the script once "
             "per rank); the other ranks wait for the cache entry", trainer.get("strategy", "auto"))
    with open_dict(trainer):
        trainer.merge_with(SINGLE_PROCESS)
    try:
        yield
    finally:
        with open_dict(trainer):
            for key in SINGLE_PROCESS:
                if key in saved:
                    trainer[key] = saved[key]
                else:
                    del trainer[key]


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
