"""Sweeps that train many students at once: ``hydra/launcher=stacked``.

The launcher (``hydra_plugins.distillab_launcher``) groups the jobs of a sweep that differ only in
values that can be stacked (``plan``), trains each group's students together as one vectorised
model (``fit``), then runs every job as the basic launcher would, with its student already
trained: the job evaluates, compresses, measures and writes its own folder. This module is where
the launcher leaves each member's trained student for its job, keyed by the job's output folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch


@dataclasses.dataclass
class Handoff:
    """What a member's job takes over from its group: the run's built parts (``pipeline.Parts``,
    the student not yet loaded with its best weights), the member's ``fit.Trained`` outcome, how
    the group got the teacher's logits, the group's identity, and the teacher the group obtained
    (``teacher.cache.Teacher`` as this job reports it; None when the method reads no teacher)."""

    parts: Any
    trained: Any
    mode: str
    table_seconds: float  # filling the teacher-output table: the group's time for its first job, else 0
    seconds: float  # the member's share of the group's fit
    group: str
    size: int
    teacher: Any = None


_HANDOFFS: dict[Path, Handoff] = {}


def _key(out: str | Path) -> Path:
    return Path(out).absolute()


def hand_over(out: str | Path, handoff: Handoff) -> None:
    _HANDOFFS[_key(out)] = handoff


def handoff(out: str | Path) -> Handoff | None:
    """The handoff waiting for the job of folder ``out``, if its group trained it."""
    return _HANDOFFS.get(_key(out))


def teacher(out: str | Path) -> Any:
    """The teacher that the group of the job of folder ``out`` obtained (``Handoff.teacher``), or None."""
    found = handoff(out)
    return None if found is None else found.teacher


def release(out: str | Path) -> None:
    """Forget ``out``'s handoff (its job has ended): its models and data can be freed."""
    _HANDOFFS.pop(_key(out), None)


def fields(out: str | Path) -> dict[str, Any]:
    """The results.json entries of a stacked job: ``launcher`` and ``stack`` {group, size}; none
    for any other job."""
    found = handoff(out)
    return {} if found is None else {"launcher": "stacked", "stack": {"group": found.group, "size": found.size}}


def complete(out: str | Path, record: dict[str, Any]) -> None:
    """Add a stacked job's ``fields`` to its ``record``, and to ``timing_s.total``, which otherwise
    counts the job's own time only, what its group spent for it before the job started: its share
    of the fit (its ``timing_s.student``) and, for the job that reports them, obtaining the teacher
    and filling its output table (its ``timing_s.teacher``)."""
    found = handoff(out)
    if found is None:
        return
    record.update(fields(out))
    if "timing_s" in record:
        before = found.seconds + found.table_seconds + (found.teacher.seconds if found.teacher is not None else 0.0)
        record["timing_s"]["total"] = round(record["timing_s"]["total"] + before, 3)


def checkpoint(state: dict[str, torch.Tensor], epoch: int, step: int) -> dict[str, Any]:
    """A member's best weights as the basic launcher's ``checkpoints/best.ckpt`` holds them: the
    DistillationModule's state_dict (the student under ``model.``), its epoch and global step."""
    import pytorch_lightning as pl

    return {
        "epoch": int(epoch),
        "global_step": int(step),
        "pytorch-lightning_version": pl.__version__,
        "state_dict": {f"model.{name}": value for name, value in state.items()},
    }
