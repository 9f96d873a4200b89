"""One group of the stacked launcher: its members prepared as their own jobs would prepare them,
checked, trained together, each with what its job takes over (``steps.handoff.Handoff``).

Each member is prepared under its own job's context, after seeding with its seed, by the same
``pipeline.prepare`` as a basic job: so its student starts from the weights its basic job would
draw, and every check a job makes before training is made. A member whose result is already
complete, or whose configuration fails a check, is left to its own job (which skips it, or
records the failure); the rest train together when the group can be stacked.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

from distillab import pipeline, results, slots
from distillab.config import validate
from distillab.data.base import InMemoryDataModule
from distillab.distill.methods.base import cotrains, is_feature_method, needs_index, needs_teacher
from distillab.results import config_hash
from distillab.stacked import fit, model, optim, plan
from distillab.steps import resume
from distillab.steps.handoff import Handoff
from distillab.steps.plan import run_settings
from distillab.steps.teacher import outputs
from distillab.steps.teacher.training import scheduler_factory

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Prepared:
    job: Any  # launch.Job
    task: Any  # its task config
    parts: Any  # pipeline.Parts
    handoff: Handoff | None = None  # what its job takes over, once the group has trained


def train(group: list, as_job: Callable) -> list[Prepared]:
    """Train the members of ``group`` (``launch.Job``s) that can train together; return the members
    trained, each with its ``handoff`` for its job."""
    members: list[Prepared] = []
    for job in group:
        # the group's jobs share one data config: it is built once, each member reads its own copy
        # (its own shuffle_seed, the same tensors)
        member = _prepare(job, as_job, copy.copy(members[0].parts.data) if members else None)
        if member is not None:
            members.append(member)
    if len(members) < 2:
        if members:
            log.info(
                "stacked: job #%d runs on its own: the rest of its group is complete or failed a check",
                members[0].job.num,
            )
        return []
    reason = why_not(members)
    if reason is not None:
        log.info("stacked: jobs %s run one after another: %s", _numbers(members), reason)
        return []
    try:
        with as_job(members[0].job) as cfg:
            shared = _shared(cfg, members[0].parts)
        example = next(iter(members[0].parts.data.train_dataloader()))[0]
        cap = model.members_that_fit(members[0].parts.student, example, shared.device) or len(members)
        if cap < len(members):
            log.info("stacked: %d jobs fit in %s's free memory at once: the group trains in parts", cap, shared.device)
        for start in range(0, len(members), cap):
            _fit(members[start : start + cap], shared)
    except Exception as error:  # noqa: BLE001 - the jobs still run, one after another, and report their own errors
        for member in members:
            member.handoff = None
        first = str(error).splitlines()[0] if str(error) else ""
        log.warning(
            "stacked: jobs %s could not train together (%s: %s); they run one after another",
            _numbers(members),
            type(error).__name__,
            first,
        )
        return []
    return members


@dataclasses.dataclass
class Shared:
    """What the members of a group share: the teacher (as obtained, and live or as its table of
    outputs), where they train, the schedule and the number of epochs."""

    teacher: Any  # teacher.cache.Teacher, None when the method reads no teacher
    given: Any  # teacher.outputs.TeacherOutputs
    live: Any
    device: torch.device
    scheduler: Any
    epochs: int
    reported: bool = False  # whether a job already reports the time spent obtaining the teacher


def _shared(cfg: Any, parts: Any) -> Shared:
    """The teacher obtained (from the cache, or trained now) and its outputs, as the first member's
    job would obtain them."""
    teaching, schedule = parts.plan.teaching, parts.plan.schedule
    teacher = None
    if needs_teacher(parts.method):
        teacher = pipeline.obtain_teacher(cfg, parts)
        given = outputs.for_run(teaching.outputs, teaching.accelerator, teacher, parts.data, parts.method)
        device = outputs.compute_device(teaching.accelerator, teacher.model)
        live = teacher.model if given.table is None else None
    else:
        given, live = outputs.TeacherOutputs("none", "the method reads no teacher"), None
        device = outputs.compute_device(teaching.accelerator, parts.student)
    return Shared(teacher, given, live, device, scheduler_factory(schedule.optim), schedule.max_epochs)


def _fit(members: list[Prepared], shared: Shared) -> None:
    """Train ``members`` together and give each its handoff."""
    group_id = hashlib.sha256(" ".join(m.job.out for m in members).encode()).hexdigest()[:12]
    log.info(
        "stacked: group %s trains %d jobs together (%s): %s differ",
        group_id,
        len(members),
        _numbers(members),
        ", ".join(plan.differing([m.task for m in members])) or "nothing",
    )
    stack = [
        fit.Member(m.parts.student, m.parts.method, instantiate(m.task.optim.optimizer), m.parts.plan.run.seed)
        for m in members
    ]
    given = shared.given
    trained, seconds = fit.GroupFit(
        stack, members[0].parts.data, shared.live, given.table, shared.scheduler, shared.epochs, shared.device
    ).run()
    log.info("stacked: group %s trained in %.1f s (%.2f s per job)", group_id, seconds, seconds / len(members))
    for index, (member, outcome) in enumerate(zip(members, trained)):
        first = index == 0 and not shared.reported
        member.handoff = Handoff(
            member.parts,
            outcome,
            given.mode,
            given.seconds if first else 0.0,
            seconds / len(members),
            group_id,
            len(members),
            _teacher_as_reported(shared.teacher, first),
        )
    shared.reported = True  # a later part of a group split by memory reuses what this part obtained


def _teacher_as_reported(teacher: Any, first: bool) -> Any:
    """The group's teacher as a member's job reports it. The first job reports it as the group
    obtained it (a teacher trained now is a cache ``miss``), with the time spent on it; the others
    as a basic job after it would (a ``hit``), with no time: they share what the group obtained
    (an ensemble's members likewise)."""
    if teacher is None or first:
        return teacher
    members = [_teacher_as_reported(member, False) for member in teacher.members]
    cache = "hit" if teacher.cache == "miss" else teacher.cache
    return dataclasses.replace(teacher, cache=cache, seconds=0.0, members=members)


def _prepare(job: Any, as_job: Callable, data: Any) -> Prepared | None:
    """A member prepared as its job would prepare it, or None when its job runs on its own: its
    result is complete (the job skips it) or its configuration fails a check (the job records it)."""
    with as_job(job) as task:
        try:
            validate(task)
            settings = run_settings(task)
            slots.configure_job(task.trainer, settings.num_threads)
            key = config_hash(task)
            if not settings.rerun and results.completed(job.out, key) is not None:
                return None  # its own job skips it, and says so
            resume.start(Path(job.out), key, settings.rerun, task.get("logger"), sweep=True)  # clears an attempt
            if settings.num_threads:
                torch.set_num_threads(settings.num_threads)
            pl.seed_everything(settings.seed, workers=True, verbose=False)
            return Prepared(job, task, pipeline.prepare(task, settings, data))
        except Exception as error:  # noqa: BLE001 - the job runs on its own and reports the error itself
            log.info(
                "stacked: job #%d runs on its own: %s", job.num, str(error).splitlines()[0] if str(error) else error
            )
            return None


def why_not(members: list[Prepared]) -> str | None:
    """None when the members' fits can be stacked, else the first reason they cannot."""
    task, parts = members[0].task, members[0].parts
    reason = plan.why_not_trainer(task.trainer, task.get("callbacks"))
    if reason is not None:
        return reason
    if not isinstance(parts.data, InMemoryDataModule):
        return f"data {type(parts.data).__name__} is not an in-memory datamodule (distillab.data.InMemoryDataModule)"
    method = parts.method
    if is_feature_method(method) or cotrains(method) or needs_index(method) or any(True for _ in method.parameters()):
        return f"distill={parts.names['distill']} trains more than the student (features, peers or its own parameters)"
    if parts.assistant is not None:
        return "a teacher assistant is distilled first"
    if parts.plan.student.init:
        return "student.init transfers the teacher's weights per job"
    if parts.plan.target == "teacher":
        return "compress.target=teacher trains no student"
    return model.why_not_stackable([m.parts.student for m in members]) or optim.why_not_stackable(
        [instantiate(m.task.optim.optimizer) for m in members]
    )


def _numbers(members: list[Prepared]) -> str:
    return ", ".join(f"#{m.job.num}" for m in members)
