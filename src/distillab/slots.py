"""Threads and GPUs of one job when a sweep runs several jobs at once on one machine.

Only the joblib launcher (``hydra/launcher=joblib``) runs jobs side by side on the machine that
started the sweep; with the basic launcher jobs run one after another, and SLURM gives each job
its own allocation. Under joblib, with ``n_jobs`` jobs at once:

- **Threads.** torch starts one thread per core in every job, so ``n_jobs`` jobs would run
  ``n_jobs × cores`` threads on ``cores`` cores and slow each other down. Each job gets
  ``cores // n_jobs`` threads instead (at least one), unless ``num_threads`` is set.
- **GPUs.** With G visible GPUs and ``trainer.devices=d`` GPUs per job there are G // d slots;
  slot k is GPUs k·d … k·d + d − 1. A job claims a free slot with a file lock under the sweep
  folder (``<hydra.sweep.dir>/.gpu_slots/slot-<k>.lock``) and sees only that slot's GPUs
  (``CUDA_VISIBLE_DEVICES``), so two jobs never train on the same GPU at once. More parallel
  jobs than slots is a ``ConfigError`` before any training.

Why a slot belongs to a worker process rather than to a job: joblib (its loky backend) runs the
jobs of a sweep in ``n_jobs`` worker processes and reuses each worker for job after job. CUDA
reads ``CUDA_VISIBLE_DEVICES`` once, when it initialises in a process, so after its first job a
worker can no longer be moved to other GPUs; handing its slot to another job would leave it
training on GPUs it no longer owns. A worker therefore claims a slot at its first job and holds
the lock until it exits (the operating system drops the lock of a process that ends, also on a
crash). Its later jobs run on the same GPUs, so with more jobs than slots each slot is reused as
its worker's jobs finish, and as a worker runs one job at a time no GPU ever has two jobs.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import torch
from filelock import FileLock, Timeout
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from distillab.settings import ConfigError

log = logging.getLogger(__name__)

LOCK_DIR = ".gpu_slots"
# accelerators under which a job may take GPUs; "cpu", "mps", ... never do
GPU_ACCELERATORS = ("auto", "gpu", "cuda")
# a worker that finds every slot taken waits for one this long: a worker that loky replaced may
# still be exiting, or another sweep writing to the same folder may be finishing a job
CLAIM_WAIT_S, CLAIM_POLL_S = 300.0, 0.2


# -- the arithmetic ---------------------------------------------------------------------------
def parallel_jobs(n_jobs: int, cores: int) -> int:
    """Jobs joblib runs at once for ``n_jobs`` on ``cores`` cores: -1 is one per core, -2 all
    cores but one, and so on (joblib's own rule)."""
    if n_jobs == 0:
        raise ConfigError("hydra.launcher.n_jobs=0 is not allowed: jobs at once >= 1, or -1 for one per core")
    return n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)


def thread_count(cores: int, jobs: int) -> int:
    """torch threads of each of ``jobs`` jobs sharing ``cores`` cores."""
    return max(1, cores // max(1, jobs))


def slot_count(gpus: int, per_job: int) -> int:
    """Jobs that can train at once on ``gpus`` GPUs with ``per_job`` GPUs each."""
    if per_job < 1:
        raise ValueError(f"per_job={per_job}: a job takes at least one GPU")
    return max(0, gpus) // per_job


def slot_devices(slot: int, gpus: int, per_job: int) -> list[int]:
    """Indexes (among the visible GPUs) of slot ``slot``: consecutive, so a job's GPUs are
    neighbours (on most machines the pairs that share a switch or NVLink)."""
    if not 0 <= slot < slot_count(gpus, per_job):
        raise ValueError(
            f"slot {slot} does not exist: {gpus} GPUs with {per_job} per job give {slot_count(gpus, per_job)} slots"
        )
    return list(range(slot * per_job, (slot + 1) * per_job))


def gpus_per_job(trainer: Any, gpus: int) -> int | None:
    """GPUs one job trains on, or None when its GPUs are not for the slots to place: no GPU,
    a CPU accelerator, or ``trainer.devices`` naming GPU ids (``[0, 2]``, ``"0,2"``), which the
    user has pinned. ``devices=auto`` or -1 takes every visible GPU."""
    accelerator = str(trainer.get("accelerator", "auto")).lower()
    if gpus < 1 or accelerator not in GPU_ACCELERATORS:
        return None
    devices = trainer.get("devices", "auto")
    if isinstance(devices, bool):
        return None
    if devices in ("auto", -1, "-1"):
        return gpus
    if isinstance(devices, int):
        return devices if devices >= 1 else None
    if isinstance(devices, str) and devices.strip().isdigit():
        return int(devices) if int(devices) >= 1 else None
    return None


def visible_ids(cuda_visible_devices: str | None, gpus: int) -> list[str]:
    """The ``CUDA_VISIBLE_DEVICES`` entries of the ``gpus`` visible GPUs, in CUDA's order, so a
    slot of a machine already restricted (``CUDA_VISIBLE_DEVICES=4,5,6,7``) names 4..7, not 0..3."""
    if cuda_visible_devices is None:
        return [str(i) for i in range(gpus)]
    return [entry.strip() for entry in cuda_visible_devices.split(",") if entry.strip()][:gpus]


# -- claiming a slot --------------------------------------------------------------------------
def claim(
    lock_dir: Path, slots: int, wait_s: float = CLAIM_WAIT_S, poll_s: float = CLAIM_POLL_S
) -> tuple[int, FileLock]:
    """The first free of ``slots`` slots and its held lock: a non-blocking try of each slot's
    lock, repeated every ``poll_s`` seconds for up to ``wait_s`` while all are taken."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    waiting = False
    while True:
        for slot in range(slots):
            lock = FileLock(str(lock_dir / f"slot-{slot}.lock"), thread_local=False)
            try:
                lock.acquire(blocking=False)
            except Timeout:
                continue
            return slot, lock
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"all {slots} GPU slots in {lock_dir} stayed taken for {wait_s:g} s; "
                "is another sweep using the same hydra.sweep.dir?"
            )
        if not waiting:
            log.info("all %d GPU slots in %s are taken; waiting for one", slots, lock_dir)
            waiting = True
        time.sleep(poll_s)


@dataclass
class Claim:
    """This process's slot, held until the process exits."""

    lock_dir: Path
    per_job: int
    gpus: int  # GPUs the process could see before it was pinned
    slot: int
    devices: list[str]  # its CUDA_VISIBLE_DEVICES entries
    lock: FileLock
    parent_visible: str | None  # CUDA_VISIBLE_DEVICES before pinning


_claim: Claim | None = None


def held() -> Claim | None:
    """The slot this process holds, if any."""
    return _claim


def release() -> None:
    """Give the slot back and restore ``CUDA_VISIBLE_DEVICES``. Only safe while CUDA is not
    initialised in this process; a sweep worker never calls it (its exit releases the lock)."""
    global _claim
    if _claim is None:
        return
    _claim.lock.release()
    if _claim.parent_visible is None:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = _claim.parent_visible
    _claim = None


def pin_gpus(lock_dir: Path, gpus: int, per_job: int, jobs: int, n_jobs: int) -> Claim:
    """Claim a slot for this process (or keep the one it holds) and make only its GPUs visible.

    ``jobs`` is how many jobs run at once (``n_jobs`` resolved); more than there are slots is a
    ``ConfigError``, raised before any claim.
    """
    global _claim
    if _claim is not None and (_claim.lock_dir, _claim.per_job) == (lock_dir, per_job):
        return _claim
    slots = slot_count(gpus, per_job)
    if slots == 0:
        raise ConfigError(f"trainer.devices={per_job} is not allowed: this machine has {gpus} GPU(s)")
    if jobs > slots:
        raise ConfigError(
            f"hydra.launcher.n_jobs={n_jobs} is not allowed: it runs {jobs} jobs at once but {gpus} GPU(s) "
            f"with trainer.devices={per_job} give {slots} GPU slot(s); use hydra.launcher.n_jobs={slots} or fewer"
        )
    if _claim is not None:
        if torch.cuda.is_initialized():
            raise ConfigError(
                f"trainer.devices={per_job} is not allowed: this worker process already runs CUDA on GPUs "
                f"{','.join(_claim.devices)} (trainer.devices={_claim.per_job}), which it cannot leave; keep "
                "trainer.devices the same in every job of a parallel sweep"
            )
        release()
    parent_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    slot, lock = claim(lock_dir, slots)
    ids = visible_ids(parent_visible, gpus)
    devices = [ids[i] for i in slot_devices(slot, gpus, per_job)]
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    _claim = Claim(lock_dir, per_job, gpus, slot, devices, lock, parent_visible)
    return _claim


def visible_gpu_count() -> int:
    """GPUs this process can see, counted without initialising CUDA: while CUDA is not
    initialised, ``torch.cuda.device_count`` asks NVML (part of every NVIDIA driver), so
    ``CUDA_VISIBLE_DEVICES`` can still be changed afterwards."""
    return torch.cuda.device_count()


# -- the hook of pipeline.run -----------------------------------------------------------------
def joblib_launcher(hydra_cfg: Any) -> Any:
    """The launcher node when the job runs under a launcher that runs ``n_jobs`` at once on this
    machine (joblib's jobs, or the stacked launcher's groups), else None."""
    launcher = hydra_cfg.get("launcher") if hydra_cfg is not None else None
    target = str(launcher.get("_target_", "")) if launcher is not None else ""
    if not target.endswith("JoblibLauncher") and not (target.endswith("StackedLauncher") and launcher.n_jobs > 1):
        return None
    return launcher


def spawnable_processes() -> None:
    """Let a job start processes of its own (``trainer=ddp``: Lightning's ddp_spawn) inside a loky
    worker. loky makes "loky" the worker's default start method, and a child started with "spawn"
    is told to switch to its parent's default, which exists only where loky is imported: it dies
    with "cannot find context for 'loky'". "spawn" as the worker's default keeps such children
    alive; the worker itself never starts processes."""
    if multiprocessing.get_start_method(allow_none=True) == "loky":
        multiprocessing.set_start_method("spawn", force=True)


def configure_job(
    trainer: DictConfig,
    num_threads: int | None,
    hydra_cfg: Any = None,
    gpus: int | None = None,
    cores: int | None = None,
) -> Claim | None:
    """Threads and GPUs of this job when it is one of several running at once (joblib
    launcher); nothing under any other launcher. Returns the GPU slot held, if any.
    ``trainer`` is the job's trainer node, ``num_threads`` its setting (None: one share of the cores).

    ``hydra_cfg`` (default: the running job's), ``gpus`` and ``cores`` (default: this machine's)
    are parameters so the placement can be tested without a sweep or a GPU.
    """
    if hydra_cfg is None and HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
    launcher = joblib_launcher(hydra_cfg)
    if launcher is None:
        return None
    spawnable_processes()
    cores = cores or joblib.cpu_count()
    n_jobs = int(launcher.get("n_jobs", -1))
    jobs = parallel_jobs(n_jobs, cores)
    if num_threads is None:
        threads = thread_count(cores, jobs)
        torch.set_num_threads(threads)
        log.info(
            "parallel sweep: %d jobs at once (hydra.launcher.n_jobs=%d) on %d cores: %d torch thread(s) "
            "per job (num_threads=N sets it)",
            jobs,
            n_jobs,
            cores,
            threads,
        )
    if _claim is not None:
        gpus = _claim.gpus  # once pinned, this process sees only its slot; the machine's count was kept
    elif gpus is None:
        gpus = visible_gpu_count()
    per_job = gpus_per_job(trainer, gpus)
    if per_job is None:
        return None
    claimed = pin_gpus(Path(str(hydra_cfg.sweep.dir)) / LOCK_DIR, gpus, per_job, jobs, n_jobs)
    log.info(
        "GPU slot %d of %d: CUDA_VISIBLE_DEVICES=%s (this worker keeps the slot until it exits)",
        claimed.slot,
        slot_count(gpus, per_job),
        ",".join(claimed.devices),
    )
    return claimed
