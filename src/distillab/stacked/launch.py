"""The stacked launcher's work: compose the sweep's jobs, group them, train each group together,
then run every job as the basic launcher does, its student handed over by its group.

A job that cannot join a group (it is alone with its configuration, its config is invalid, its
result is already complete, or its group cannot be stacked) runs exactly as under the basic
launcher, and the log says why. With ``n_jobs`` > 1 several groups train at once in worker
processes, each on its own GPU slot (``distillab.slots``), like the joblib launcher's jobs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from distillab.stacked import plan

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Job:
    """One job of the sweep: its number, its overrides and its composed config (with ``hydra``)."""

    num: int
    overrides: list[str]
    config: DictConfig
    task: DictConfig  # the config without ``hydra``, as the job's task function receives it

    @property
    def out(self) -> str:
        return str(self.config.hydra.runtime.output_dir)


def compose(context: HydraContext, config: DictConfig, overrides: Sequence[str], num: int) -> Job:
    """The job's config as the basic launcher composes it, with its output folder set."""
    job = context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(job):
        job.hydra.job.id = num
        job.hydra.job.num = num
    folder = os.path.join(
        str(OmegaConf.select(job, "hydra.sweep.dir")), str(OmegaConf.select(job, "hydra.sweep.subdir"))
    )
    with read_write(job.hydra.runtime), open_dict(job.hydra.runtime):
        job.hydra.runtime.output_dir = os.path.abspath(folder)
    task = copy.deepcopy(job)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return Job(num, list(overrides), job, task)


@contextlib.contextmanager
def as_job(job: Job) -> Iterator[DictConfig]:
    """Act as the running ``job`` (Hydra's view of it set, as ``run_job`` sets it) and yield its
    task config (the config without ``hydra``)."""
    saved = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(job.config)
    try:
        yield job.task
    finally:
        HydraConfig.instance().cfg = saved


def launch(
    context: HydraContext,
    task_function: TaskFunction,
    config: DictConfig,
    job_overrides: Sequence[Sequence[str]],
    initial_job_idx: int,
    max_stack: int,
    n_jobs: int,
) -> list[JobReturn]:
    setup_globals()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    jobs = [compose(context, config, overrides, initial_job_idx + k) for k, overrides in enumerate(job_overrides)]
    keys = []
    for job in jobs:
        with as_job(job) as task:
            try:
                keys.append(plan.stacking_key(task))
            except Exception as error:  # noqa: BLE001 - a config that does not resolve runs (and fails) alone
                keys.append(f"alone-{job.num}: {error}")
    grouped = [[jobs[k] for k in positions] for positions in plan.groups(keys, max_stack)]
    log.info(
        "Launching %d jobs in %d group(s), stacked (hydra.launcher.max_stack=%d)", len(jobs), len(grouped), max_stack
    )
    if n_jobs == 1 or len(grouped) == 1:
        returns = [ret for group in grouped for ret in run_group(context, task_function, config, group)]
    else:
        returns = _in_workers(context, task_function, config, grouped, n_jobs)
    return sorted(returns, key=lambda ret: int(ret.hydra_cfg.hydra.job.num))


def run_group(
    context: HydraContext, task_function: TaskFunction, config: DictConfig, group: list[Job]
) -> list[JobReturn]:
    """Train ``group``'s students together when it can be stacked, then run each of its jobs: a job
    its group trained by ``cli.run_job`` with its handoff, the others by ``task_function``."""
    from distillab import cli, measure
    from distillab.stacked import group as training

    for job in group:
        log.info("\t#%d : %s", job.num, " ".join(filter_overrides(job.overrides)))
    handoffs = {}
    if len(group) > 1:
        handoffs = {member.job.out: member.handoff for member in training.train(group, as_job)}
    else:
        log.info(
            "stacked: job #%d runs on its own: no other job shares its configuration (within max_stack)", group[0].num
        )
    runs = []
    with measure.shared_profiles():  # what depends on the architecture only is measured once per group
        for job in group:
            handoff = handoffs.pop(job.out, None)  # the job's models and data are freed when it ends
            ret = run_job(
                hydra_context=context,
                task_function=task_function if handoff is None else functools.partial(cli.run_job, handoff=handoff),
                config=job.config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
            del handoff
            runs.append(ret)
            configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    return runs


def _in_workers(
    context: HydraContext, task_function: TaskFunction, config: DictConfig, grouped: list[list[Job]], n_jobs: int
) -> list[JobReturn]:
    """Groups trained ``n_jobs`` at a time in worker processes (joblib's loky backend, as the joblib
    launcher runs jobs); each worker takes a GPU slot at its first group and keeps it."""
    from joblib import Parallel, delayed

    state = Singleton.get_state()
    batches = Parallel(n_jobs=n_jobs, backend="loky", prefer="processes")(
        delayed(_worker)(context, task_function, config, group, state) for group in grouped
    )
    return [ret for batch in batches for ret in batch]


def _worker(
    context: HydraContext, task_function: TaskFunction, config: DictConfig, group: list[Job], state: Any
) -> list[JobReturn]:
    setup_globals()
    Singleton.set_state(state)
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)  # the group's own lines, as in the sweep's process
    return run_group(context, task_function, config, group)
