"""``hydra/sweeper=optuna``: an Optuna study kept in a database, one Hydra job per trial; running
the same command again continues it, and several commands on one study share its trials.
Hydra requires a sweeper to live in the ``hydra_plugins`` package; the work is in
``distillab.study``."""

from __future__ import annotations

import sys
from typing import Any

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from distillab.config import ConfigError

# hydra/sweeper=optuna; every key is documented in docs/tuning.md
SWEEPER = {
    "defaults": [{"sampler": "tpe"}],
    "_target_": "hydra_plugins.distillab_sweeper.optuna_sweeper.OptunaSweeper",
    # the sampler is built for each trial (its seed derived from the trial number), not by Hydra
    "_recursive_": False,
    "direction": "maximize",  # the objective is the student's validation accuracy (cli.objective)
    "storage": None,  # a SQLAlchemy URL; None: the SQLite file <sweep dir>/study.db
    "study_name": None,  # None: distillab
    "n_trials": 20,
    "n_jobs": 1,
    "max_failure_rate": 0.0,
    "params": None,
    "heartbeat_interval": 60,
    "grace_period": None,
}
# hydra/sweeper/sampler=tpe|random
SAMPLERS = {
    "tpe": {"_target_": "optuna.samplers.TPESampler", "seed": None, "n_startup_trials": 10, "n_ei_candidates": 24},
    "random": {"_target_": "optuna.samplers.RandomSampler", "seed": None},
}


def register() -> None:
    """Store the config nodes of ``hydra/sweeper=optuna`` and its samplers. The retired
    hydra-optuna-sweeper package, where still installed, stores nodes of the same names when Hydra
    imports its plugins; storing these again afterwards (``OptunaSweeperNodes``) makes them win."""
    store = ConfigStore.instance()
    store.store(group="hydra/sweeper", name="optuna", node=SWEEPER, provider="distillab")
    for name, node in SAMPLERS.items():
        store.store(group="hydra/sweeper/sampler", name=name, node=node, provider="distillab")


class OptunaSweeperNodes(SearchPathPlugin):
    """Hydra calls this after it has imported every plugin, and before it composes a config: the
    moment to store the sweeper's nodes over any stored by an older plugin of the same name. The
    search path itself is left as it is."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        register()


register()


class OptunaSweeper(Sweeper):
    """The keys of ``hydra/sweeper=optuna`` (``SWEEPER`` above): ``sampler`` (a config node, ``_target_`` an
    Optuna sampler), ``direction``, ``storage`` (a SQLAlchemy URL; null: ``<sweep dir>/study.db``),
    ``study_name``, ``n_trials`` (completed trials of the study in total), ``n_jobs`` (trials
    launched at a time), ``max_failure_rate``, ``params`` (the search space, in Hydra's sweep
    syntax), ``heartbeat_interval`` and ``grace_period`` (seconds: how a dead trial is found)."""

    def __init__(
        self,
        sampler: DictConfig,
        direction: Any,
        storage: str | None,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        params: DictConfig | None,
        heartbeat_interval: int,
        grace_period: int | None,
    ) -> None:
        super().__init__()
        self.sampler, self.params = sampler, params
        self.values = {
            "direction": direction,
            "storage": storage,
            "study_name": study_name,
            "n_trials": n_trials,
            "n_jobs": n_jobs,
            "max_failure_rate": max_failure_rate,
            "heartbeat_interval": heartbeat_interval,
            "grace_period": grace_period,
        }
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    def sweep(self, arguments: list[str]) -> Any:
        from distillab import study

        assert self.config is not None and self.launcher is not None
        try:
            settings = study.study_settings(**self.values)
            return study.run(
                settings, self.sampler, self.params, arguments, self.config.hydra.sweep.dir, self.launcher.launch
            )
        except ConfigError as error:
            # bad input, found before any trial ran: one line, as for every other setting
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
