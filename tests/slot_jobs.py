"""A stand-in for a job of a joblib sweep, for tests/test_launchers.py. It lives apart from the
test module so that each worker process imports only ``distillab.slots``, not Lightning."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

from distillab import slots


def hold_gpus(lock_dir: str, gpus: int, per_job: int, jobs: int, seconds: float) -> dict:
    """Pin this process to a slot as a job does, then hold its GPUs for ``seconds`` as if training."""
    claim = slots.pin_gpus(Path(lock_dir), gpus, per_job, jobs, jobs)
    began = time.monotonic()
    time.sleep(seconds)
    return {
        "pid": os.getpid(),
        "slot": claim.slot,
        "visible": os.environ["CUDA_VISIBLE_DEVICES"],
        "began": began,
        "ended": time.monotonic(),
    }


def start_a_child(prepare: bool) -> int:
    """Exit code of a process started with "spawn" from here, after ``slots.spawnable_processes()``
    when ``prepare``: what Lightning's ddp_spawn does inside a job."""
    if prepare:
        slots.spawnable_processes()
    child = multiprocessing.get_context("spawn").Process(target=os.getpid)
    child.start()
    child.join(timeout=60)
    return child.exitcode
