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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf
from torch import nn

from distillab.io import atomic_save, atomic_write_json, atomic_write_text
from distillab.settings import ConfigError
from distillab.training import one_device, spawns_workers

log = logging.getLogger(__name__)

CHECKPOINT, CONFIG, METRICS = "teacher.pt", "config.yaml", "metrics.json"

# how long a rank > 0 of a distributed job waits for rank 0 to train a missing teacher
WAIT_ENV, WAIT_DEFAULT_S, POLL_S = "DISTILLAB_TEACHER_WAIT_S", 24 * 3600.0, 1.0

#: ``train(model, staging_dir, single_process)``: fit a fresh teacher, return its metrics
TrainFn = Callable[[nn.Module, Path, bool], dict[str, Any]]


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


def arch_name(model: Mapping[str, Any], option: str | None = None) -> str:
    """The name results give an architecture: its ``conf/model`` option (``resnet20``, ``cnn``), or
    without one the builder's name; library models add the model's: ``torchvision:resnet18``."""
    builder = option or str(model.get("_target_", "model")).rsplit(".", 1)[-1].lower().removesuffix("_model")
    return f"{builder}:{model.get('name')}" if model.get("name") else builder


def identity(data: DictConfig, teacher: DictConfig, precision: str) -> dict[str, Any]:
    """What determines the trained teacher: the data and its split, the architecture and its
    training recipe, the numeric precision; display and speed settings are left out."""
    data_values = OmegaConf.to_container(data, resolve=True)
    # the student's share of labels is not the teacher's: that is teacher.recipe.labelled_fraction
    for key in ("eval_batch_size", "labelled_fraction"):
        data_values.pop(key, None)
    teacher_values = OmegaConf.to_container(teacher, resolve=True)
    recipe = teacher_values.get("recipe") or {}
    if "labelled_fraction" in recipe and recipe["labelled_fraction"] is None:
        del recipe["labelled_fraction"]  # all labels, as before the option existed: earlier cache entries still hit
    return {"data": data_values, "teacher": teacher_values, "precision": str(precision), "format": 1}


def cache_key(identity: Mapping[str, Any]) -> str:
    blob = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_folder(cache_dir: str | Path, identity: Mapping[str, Any]) -> Path:
    dataset = str(identity["data"].get("_target_", "data")).rsplit(".", 1)[-1].replace("DataModule", "").lower()
    arch = arch_name(identity["teacher"]).replace(":", "_")
    return Path(cache_dir) / f"{arch}-{dataset}-{cache_key(identity)}"


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (CHECKPOINT, CONFIG, METRICS))


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint_file(model: nn.Module, path: str | Path, key: str = "teacher.ckpt_path") -> None:
    """Fill ``model`` from a state_dict file (``weights_only=True``); a file that is not a state_dict
    of this architecture is a ``ConfigError`` naming ``key``, raised before any training."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}={str(path)!r} is not allowed: the file does not exist")
    try:
        state = load_state_dict(path)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same mistake
        reason = " ".join(str(error).split())[:160]
        raise ConfigError(
            f"{key}={str(path)!r} is not allowed: not a torch.save file readable with "
            f"weights_only=True ({type(error).__name__}: {reason})"
        ) from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]  # a Lightning checkpoint of the model alone
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(
            f"{key}={str(path)!r} is not allowed: a state_dict (a mapping of tensor names to "
            f"tensors) of the teacher's architecture, got {type(state).__name__}"
        )
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [name for name in expected if name in state and state[name].shape != expected[name].shape]
    if missing or unexpected or wrong:
        detail = (
            f"missing {missing[:3]}"
            if missing
            else f"unexpected {unexpected[:3]}"
            if unexpected
            else f"{wrong[0]} has shape {list(state[wrong[0]].shape)}, the model {list(expected[wrong[0]].shape)}"
        )
        raise ConfigError(
            f"{key}={str(path)!r} is not allowed: a state_dict of the teacher's architecture "
            f"({type(model).__name__}); {detail}"
        )
    model.load_state_dict(state)


def obtain(
    model: nn.Module,
    identity: Mapping[str, Any],
    cache_dir: str | Path,
    trainer: DictConfig,
    train: TrainFn,
    ckpt_path: str | None = None,
    max_epochs: int = 0,
) -> Teacher:
    """Fill ``model`` (a fresh teacher) from ``ckpt_path``, from the cache entry of ``identity``,
    or by ``train(model, staging_dir, single_process)``, which fits it (writing logs or
    checkpoints into ``staging_dir`` if it likes) and returns its metrics.

    Under a launcher that runs the whole script once per device (torchrun, ``srun``), or a
    strategy that starts the other ranks by re-running the script, only rank 0 trains a missing
    teacher, in one process (``single_process``); the other ranks wait for its cache entry.
    """
    start = time.perf_counter()
    key = cache_key(identity)
    arch = arch_name(identity["teacher"])
    if ckpt_path:
        load_checkpoint_file(model, ckpt_path)
        log.info("teacher loaded from teacher.ckpt_path=%s (cache not used)", ckpt_path)
        return Teacher(model.eval(), key, "file", Path(ckpt_path), seconds=time.perf_counter() - start)

    folder = cache_folder(cache_dir, identity)
    rank, world = launch_rank()
    if rank != 0 and not is_complete(folder):
        wait_for_rank_zero(folder, key, rank, world)
    if not is_complete(folder):
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):
            if not is_complete(folder):  # another job may have finished it while we waited
                log.info("teacher cache miss: key %s; training %s for %d epochs", key, arch, max_epochs)
                single = not (world <= 1 and (one_device(trainer) or spawns_workers(trainer)))
                if single:
                    log.info(
                        "training the teacher in this process on one device (trainer.strategy=%s runs the "
                        "script once per rank); the other ranks wait for the cache entry",
                        trainer.get("strategy", "auto"),
                    )
                metrics = _train_into(folder, identity, model, lambda m, staging: train(m, staging, single))
                return Teacher(model.eval(), key, "miss", folder, metrics, time.perf_counter() - start)
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
                f"is paths.cache_dir on a filesystem every node shares? ({WAIT_ENV} sets the wait)"
            )
        time.sleep(POLL_S)


def _train_into(
    folder: Path, identity: Mapping[str, Any], model: nn.Module, train: Callable[[nn.Module, Path], dict[str, Any]]
) -> dict[str, Any]:
    staging = folder.with_name(f".{folder.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        metrics = train(model, staging)
        atomic_save(staging / CHECKPOINT, lambda handle: torch.save(model.state_dict(), handle))
        atomic_write_text(staging / CONFIG, OmegaConf.to_yaml(dict(identity)))
        atomic_write_json(staging / METRICS, metrics)
        if folder.exists():  # an incomplete folder from an older layout: never trusted
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return metrics
