"""The Optuna study behind ``hydra/sweeper=optuna`` (``sweep=tune_kd``), kept in a database.

The study lives in ``hydra.sweeper.storage``, any SQLAlchemy URL, by default the SQLite file
``<sweep dir>/study.db``. Running the same tuning command again continues it: its completed
trials are kept, and a trial that was running when its process died is marked failed and its
parameters are enqueued again. Several tuning commands on one study (two processes here, or
SLURM jobs on several machines with a PostgreSQL URL) share its trials: each asks the database
for the next one. ``n_trials`` counts the study's completed trials, whoever ran them.

A trial is one Hydra job, in the sweep folder's subfolder named by its trial number, so that
processes sharing a study never write into the same folder. A trial whose process died is
found by its heartbeat (written every ``heartbeat_interval`` seconds, stale after
``grace_period``) or, on the same machine, at once by its process id.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob, Override, Transformer
from omegaconf import DictConfig, OmegaConf

from distillab.settings import ConfigError

log = logging.getLogger(__name__)

STUDY_FILE = "study.db"  # the default storage, in the sweep folder
RESULTS_FILE = "optimization_results.yaml"  # the study's best trial, read by the report
MIN_OPTUNA = 4
DIRECTIONS = ("maximize", "minimize")
INSTALL = 'pip install -e ".[tune]"'
CREATE_TRIES = 3
# who runs a trial: a trial of this machine whose process is gone is retried at once
OWNER_HOST, OWNER_PID = "distillab:host", "distillab:pid"
RETRY_OF = "retry_of"


@dataclass(frozen=True)
class StudySettings:
    """The checked ``hydra.sweeper`` keys, apart from the sampler and the search space."""

    direction: str
    study_name: str
    n_trials: int
    n_jobs: int
    max_failure_rate: float
    storage: str | None
    heartbeat_interval: int
    grace_period: int | None


def study_settings(**values: Any) -> StudySettings:
    """``StudySettings`` from the sweeper's keys; ``ConfigError`` (one line) for a bad value."""
    direction = str(getattr(values["direction"], "name", values["direction"]))
    if direction not in DIRECTIONS:
        raise ConfigError(f"hydra.sweeper.direction={direction} is not allowed: use {' or '.join(DIRECTIONS)}")
    for key in ("n_trials", "n_jobs", "heartbeat_interval"):
        if not _is_int(values[key]) or values[key] < 1:
            raise ConfigError(f"hydra.sweeper.{key}={values[key]} is not allowed: a whole number >= 1")
    grace = values["grace_period"]
    if grace is not None and (not _is_int(grace) or grace <= values["heartbeat_interval"]):
        raise ConfigError(
            f"hydra.sweeper.grace_period={grace} is not allowed: null (twice heartbeat_interval) or a whole "
            f"number of seconds above heartbeat_interval={values['heartbeat_interval']}"
        )
    rate = values["max_failure_rate"]
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
        raise ConfigError(f"hydra.sweeper.max_failure_rate={rate} is not allowed: a fraction in [0, 1]")
    name = values["study_name"]
    if name is not None and not str(name).strip():
        raise ConfigError("hydra.sweeper.study_name='' is not allowed: a name, or null for 'distillab'")
    storage = values["storage"]
    return StudySettings(
        direction=direction,
        study_name=str(name) if name is not None else "distillab",
        n_trials=int(values["n_trials"]),
        n_jobs=int(values["n_jobs"]),
        max_failure_rate=float(rate),
        storage=str(storage) if storage not in (None, "") else None,
        heartbeat_interval=int(values["heartbeat_interval"]),
        grace_period=int(grace) if grace is not None else None,
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def require_optuna() -> None:
    """``ConfigError`` unless Optuna 4 or later is installed (the old sweeper pinned optuna < 3)."""
    try:
        version = metadata.version("optuna")
    except metadata.PackageNotFoundError:
        raise ConfigError(f"hydra/sweeper=optuna needs Optuna {MIN_OPTUNA} or later: {INSTALL}") from None
    major = re.match(r"\d+", version)
    if major is None or int(major.group()) < MIN_OPTUNA:
        raise ConfigError(
            f"hydra/sweeper=optuna needs Optuna {MIN_OPTUNA} or later, found {version}: {INSTALL} "
            "(pip uninstall hydra-optuna-sweeper first if an old install pins optuna < 3)"
        )


# -- the database ------------------------------------------------------------------------------
def storage_url(storage: str | None, sweep_dir: str | os.PathLike) -> str:
    """The study's SQLAlchemy URL: ``storage``, or the SQLite file ``<sweep_dir>/study.db``."""
    if storage:
        return storage
    return f"sqlite:///{Path(sweep_dir).resolve() / STUDY_FILE}"


def shown(url: str) -> str:
    """``url`` with its password hidden."""
    return re.sub(r"^([^:/]+://[^:/@]*):[^@]*@", r"\1:***@", url)


def open_storage(url: str, settings: StudySettings):
    """An ``optuna.storages.RDBStorage`` on ``url``, connected once to prove it works; a URL that
    cannot be opened is a ``ConfigError`` naming it (password hidden) and what to check."""
    from optuna.storages import RDBStorage

    engine: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(
                f"hydra.sweeper.storage={shown(url)}: cannot create the folder of the study's database: "
                f"{error.strerror or error}"
            ) from None
        # processes sharing the file wait for each other's writes instead of failing
        engine = {"connect_args": {"timeout": 60}}
    elif url.startswith("postgresql"):
        engine = {"connect_args": {"connect_timeout": 10}}
    attempt = 0
    while True:
        attempt += 1
        try:
            with warnings.catch_warnings(), asking(url):
                warnings.filterwarnings("ignore", message=".*experimental feature.*")  # the heartbeat, since 2.9
                return RDBStorage(
                    url,
                    engine_kwargs=engine,
                    heartbeat_interval=settings.heartbeat_interval,
                    grace_period=settings.grace_period,
                )
        except Exception as error:  # noqa: BLE001 - any failure to open the database is the same one line
            # two commands that create the study's tables at once: the later one finds them made
            if type(error).__name__ == "IntegrityError" and attempt < CREATE_TRIES:
                time.sleep(attempt)
                continue
            raise ConfigError(f"hydra.sweeper.storage={shown(url)} cannot be opened: {_why(error, url)}") from None


def _why(error: BaseException, url: str) -> str:
    """What went wrong opening the database, and what to check, in one line without the password."""
    cause = getattr(error, "orig", None) or error
    text = " ".join(str(cause).split()) or type(cause).__name__
    password = re.match(r"^[^:/]+://[^:/@]*:([^@]*)@", url)
    if password and password.group(1):
        text = text.replace(password.group(1), "***")
    if type(error).__name__ == "ArgumentError":
        return f"{text}; a SQLAlchemy URL is dialect[+driver]://user:password@host:port/database or sqlite:///path"
    if isinstance(error, ImportError):
        return (
            f"{text}; its driver is not installed: psycopg (3) for postgresql:// URLs, {INSTALL} installs it, "
            "or name another driver, e.g. postgresql+psycopg2://"
        )
    return (
        f"{type(cause).__name__}: {text}; check that the database server is running and reachable from this "
        "machine, that the database exists and that the user and password are right"
    )


# -- the search space --------------------------------------------------------------------------
def search_space(params: DictConfig | dict | None, arguments: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The distributions of the searched keys and the fixed ``key -> value`` overrides, from
    ``hydra.sweeper.params`` then the command line (a later value of a key replaces an earlier
    one: ``distill.temperature=4`` on the command line fixes a key the preset searches)."""
    given = OmegaConf.to_container(params) if isinstance(params, DictConfig) else dict(params or {})
    texts = [f"{key}={value}" for key, value in given.items()] + list(arguments)
    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override, text in zip(OverridesParser.create().parse_overrides(texts), texts):
        key = override.get_key_element()
        if override.is_sweep_override():
            space[key] = distribution(override, text)
            fixed.pop(key, None)
        else:
            fixed[key] = override.get_value_element_as_str()
            space.pop(key, None)
    return space, fixed


def distribution(override: Override, text: str):
    """The Optuna distribution of one sweep: ``choice``, ``range`` (its own values: the stop is
    left out, as in Python and as ``cli.check`` checked them), ``interval`` and
    ``tag(log, interval(...))``."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    sweep = override.value()
    if override.is_choice_sweep() and not isinstance(sweep, Glob):  # a glob chooses among config files
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        values = list(override.sweep_iterator(transformer=Transformer.encode))
        if not values:
            raise ConfigError(f"{text} is not allowed: the range has no value")
        whole = all(_is_int(v) for v in values) and _is_int(sweep.step) and sweep.step > 0
        if whole and not sweep.shuffle:
            return IntDistribution(values[0], values[-1], step=sweep.step)
        return CategoricalDistribution(values)
    if override.is_interval_sweep():  # Hydra reads both ends as floats: an interval gives floats
        return FloatDistribution(float(sweep.start), float(sweep.end), log="log" in sweep.tags)
    raise ConfigError(  # a glob, or a sweep kind Hydra may add
        f"{text} is not allowed for hydra/sweeper=optuna: use interval(a,b), tag(log,interval(a,b)), "
        "choice(a,b,...) or range(a,b[,step])"
    )


def suggest(trial, space: dict[str, Any], fixed: dict[str, str]) -> list[str]:
    """The overrides of one trial: its searched values (drawn now, or those it was enqueued
    with), then the fixed ones."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    chosen = []
    for name, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            value = trial.suggest_categorical(name, dist.choices)
        elif isinstance(dist, IntDistribution):
            value = trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            value = trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
        chosen.append(f"{name}={value}")
    return chosen + [f"{name}={value}" for name, value in fixed.items()]


def trial_sampler(sampler: DictConfig | dict, number: int):
    """The sampler of trial ``number``. With ``seed`` set, each trial draws from its own seed,
    derived from the seed and the trial number: the same study proposes the same values again,
    a continued study does not repeat the values of its first trials, and two processes sharing a
    study do not propose the same ones."""
    from hydra.utils import instantiate

    node = OmegaConf.create(sampler) if isinstance(sampler, dict) else sampler
    seed = node.get("seed")
    if seed is None:
        return instantiate(node)
    import numpy as np

    derived = int(np.random.SeedSequence([int(seed), number]).generate_state(1)[0])
    return instantiate(node, seed=derived)


# -- the trials --------------------------------------------------------------------------------
def counts(study) -> dict[str, int]:
    """The study's trials by state name (COMPLETE, RUNNING, FAIL, WAITING, ...)."""
    tally: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        tally[trial.state.name] = tally.get(trial.state.name, 0) + 1
    return tally


def retry_dead_trials(study, storage) -> list[int]:
    """Mark failed the running trials whose process is gone (stale heartbeat, or a process id of
    this machine that no longer exists) and enqueue their parameters again; returns their numbers.
    Of several processes doing this at once, only the one that changes a trial's state retries it."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(study.study_name)
    stale = set(storage._get_stale_trial_ids(study_id))  # noqa: SLF001 - Optuna's own heartbeat check
    host, retried = socket.gethostname(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        attrs = trial.system_attrs
        dead = attrs.get(OWNER_HOST) == host and not _alive(attrs.get(OWNER_PID))
        if trial_id not in stale and not dead:
            continue
        try:
            changed = storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue
        if changed:
            study.enqueue_trial(dict(trial.params), user_attrs={**trial.user_attrs, RETRY_OF: trial.number})
            retried.append(trial.number)
    if retried:
        log.info(
            "trials %s were running when their process died: marked failed, their parameters enqueued again", retried
        )
    return retried


def _alive(pid: Any) -> bool:
    if not _is_int(pid) or pid <= 0:
        return True  # not ours to judge: the heartbeat decides
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ask(study, storage, count: int) -> list:
    """``count`` new trials (enqueued ones first), each marked with this process as its owner."""
    study_id = storage.get_study_id_from_name(study.study_name)
    trials = []
    for _ in range(count):
        with warnings.catch_warnings():
            # the heartbeat is written by ``heartbeat`` below, not by Study.optimize
            warnings.filterwarnings("ignore", message=".*Heartbeat of storage.*")
            trial = study.ask()
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_system_attr(trial_id, OWNER_HOST, socket.gethostname())
        storage.set_trial_system_attr(trial_id, OWNER_PID, os.getpid())
        storage.record_heartbeat(trial_id)
        trials.append(trial)
    return trials


@contextmanager
def asking(url: str) -> Iterator[None]:
    """Processes sharing a SQLite study create its tables, count its trials and ask for new ones one
    at a time, so that together they start no more than ``n_trials``. (On a database server, two
    processes asking at the same instant may each start the last trial: the study then ends with
    one more.)"""
    if not url.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    with FileLock(url.removeprefix("sqlite:///") + ".lock"):
        yield


@contextmanager
def heartbeat(study, storage, trials: Sequence, interval: int) -> Iterator[None]:
    """Write the trials' heartbeat every ``interval`` seconds while they run."""
    study_id = storage.get_study_id_from_name(study.study_name)
    ids = [storage.get_trial_id_from_study_id_trial_number(study_id, t.number) for t in trials]
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            for trial_id in ids:
                try:
                    storage.record_heartbeat(trial_id)
                except Exception as error:  # noqa: BLE001 - a missed beat is retried at the next one
                    log.warning("could not write the heartbeat of trial id %s: %s", trial_id, error)

    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def consecutive(numbers: Sequence[int]) -> list[tuple[int, int]]:
    """``(start index, end index)`` of each run of consecutive numbers: a launcher numbers the jobs
    of one launch from its first index on, and a trial's folder is its number."""
    runs, start = [], 0
    for i in range(1, len(numbers) + 1):
        if i == len(numbers) or numbers[i] != numbers[i - 1] + 1:
            runs.append((start, i))
            start = i
    return runs


def best(study) -> dict[str, Any] | None:
    """``optimization_results.yaml``'s content: the study's best trial; None before any completes."""
    try:
        trial = study.best_trial
    except ValueError:
        return None
    return {"name": "optuna", "best_params": dict(trial.params), "best_value": trial.value}


# -- the study ---------------------------------------------------------------------------------
def run(
    settings: StudySettings,
    sampler: DictConfig | dict,
    params: DictConfig | dict | None,
    arguments: Sequence[str],
    sweep_dir: str | os.PathLike,
    launch,
) -> dict[str, Any] | None:
    """Run the study's trials until ``n_trials`` of them are complete; ``launch(overrides,
    initial_job_idx)`` runs a batch of jobs (a Hydra launcher's ``launch``). Returns the best
    trial, also written to ``<sweep_dir>/optimization_results.yaml``. Every check (Optuna's
    version, the search space, the database) is done before the first trial."""
    require_optuna()
    import optuna

    space, fixed = search_space(params, arguments)
    url = storage_url(settings.storage, sweep_dir)
    storage = open_storage(url, settings)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=settings.study_name,
        storage=storage,
        sampler=trial_sampler(sampler, 0),
        direction=settings.direction,
        load_if_exists=True,
    )
    if study.direction.name.lower() != settings.direction:
        raise ConfigError(
            f"hydra.sweeper.direction={settings.direction} is not allowed: study {settings.study_name} in "
            f"{shown(url)} was created to {study.direction.name.lower()}"
        )
    done = counts(study)
    log.info(
        "study %s in %s: %d of %d trials complete",
        settings.study_name,
        shown(url),
        done.get("COMPLETE", 0),
        settings.n_trials,
    )
    launched = 0
    while launched < settings.n_trials:  # the bound keeps a study whose every trial crashes from going on forever
        with asking(url):
            retry_dead_trials(study, storage)
            done = counts(study)
            to_go = settings.n_trials - done.get("COMPLETE", 0) - done.get("RUNNING", 0)
            if to_go <= 0:
                break
            trials = ask(study, storage, min(settings.n_jobs, to_go, settings.n_trials - launched))
        overrides = []
        for trial in trials:
            study.sampler = trial_sampler(sampler, trial.number)
            overrides.append(suggest(trial, space, fixed))
        with heartbeat(study, storage, trials, settings.heartbeat_interval):
            returns = []
            for start, end in consecutive([t.number for t in trials]):
                returns += list(launch(overrides[start:end], trials[start].number))
        tell(study, trials, returns, settings.max_failure_rate)
        launched += len(trials)
    result = best(study)
    done = counts(study)
    log.info(
        "study %s: %d trials complete, %d failed, %d running elsewhere",
        settings.study_name,
        done.get("COMPLETE", 0),
        done.get("FAIL", 0),
        done.get("RUNNING", 0),
    )
    if result is None:
        log.warning("study %s: no trial is complete yet, so there is no best trial", settings.study_name)
    else:
        OmegaConf.save(OmegaConf.create(result), Path(sweep_dir) / RESULTS_FILE)
    return result


def tell(study, trials: Sequence, returns: Sequence, max_failure_rate: float) -> None:
    """Tell the study each trial's objective; a job that raised is a failed trial. More failures in
    the batch than ``max_failure_rate`` allows raise the first job's error."""
    from optuna.trial import TrialState

    failures = 0
    for trial, ret in zip(trials, returns, strict=True):
        try:
            value = float(ret.return_value)
        except Exception as error:  # noqa: BLE001 - a failed job is a failed trial, the study goes on
            study.tell(trial, state=TrialState.FAIL)
            log.warning("trial %d failed: %s", trial.number, " ".join(str(error).split()))
            failures += 1
        else:
            study.tell(trial, value)
    if failures and failures / len(returns) > max_failure_rate:
        log.error(
            "%d of %d trials failed, more than max_failure_rate=%s allows", failures, len(returns), max_failure_rate
        )
        for ret in returns:
            ret.return_value  # noqa: B018 - raises the job's own error
