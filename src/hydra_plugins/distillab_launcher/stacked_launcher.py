"""``hydra/launcher=stacked``: the jobs of a sweep that can train together do, as one vectorised
model; every job then ends in its own folder as under the basic launcher (``distillab.stacked``).
Hydra requires a launcher to live in the ``hydra_plugins`` package; the work is in
``distillab.stacked.launch``."""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from distillab.settings import Count, checked


@checked
class StackedLauncher(Launcher):
    """``max_stack``: the most jobs trained together (larger groups are split); ``n_jobs``: groups
    trained at once, one per GPU slot (or sharing the CPU's cores)."""

    def __init__(self, max_stack: Count, n_jobs: Count) -> None:
        super().__init__()
        self.max_stack, self.n_jobs = int(max_stack), int(n_jobs)
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from distillab.stacked import launch

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        return launch.launch(
            self.hydra_context,
            self.task_function,
            self.config,
            job_overrides,
            initial_job_idx,
            self.max_stack,
            self.n_jobs,
        )
