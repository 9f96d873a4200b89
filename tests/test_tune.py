"""Tuning λ and T with Optuna (``sweep=tune_kd``): the preset, the objective a trial returns, the
best trial and the trials table, checks of the search-space syntax, and real studies kept in a
database: continued by the same command, a killed trial retried, two processes sharing one
study, an unreachable database, and a study on a real PostgreSQL server."""

from __future__ import annotations

import json
import math
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import pytest
from hydra.core.config_store import ConfigStore
from hydra.errors import MissingConfigException
from hydra.types import RunMode
from omegaconf import OmegaConf

from distillab import cli, pipeline, report, results, study
from distillab.config import ConfigError
from distillab.io import atomic_write_json
from tests.conftest import FAST, ROOT, compose_hydra, run_train

SEARCHED = ("distill.lam", "distill.temperature")


def optuna_major() -> int:
    try:
        return int(metadata.version("optuna").split(".")[0])
    except metadata.PackageNotFoundError:
        return 0


needs_optuna = pytest.mark.skipif(optuna_major() < 4, reason='the sweeper needs optuna>=4: pip install -e ".[tune]"')
# the jobs see the packages these tests see
PATHS = [str(ROOT / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
ENV = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(PATHS))}


def test_the_preset_is_a_seeded_tpe_study_of_lam_and_temperature() -> None:
    cfg = compose_hydra("sweep=tune_kd", "hydra.sweeper.n_trials=7")
    sweeper = cfg.hydra.sweeper
    assert cfg.hydra.mode == RunMode.MULTIRUN  # no -m needed
    assert sweeper._target_ == "hydra_plugins.distillab_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper.direction == "maximize" and sweeper.storage is None  # None: <sweep dir>/study.db
    assert sweeper.n_trials == 7 and compose_hydra("sweep=tune_kd").hydra.sweeper.n_trials == 20
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 0
    assert dict(sweeper.params) == {"distill.lam": "interval(0, 1)", "distill.temperature": "interval(1, 8)"}
    assert sweeper.max_failure_rate == 1.0  # one failed trial never ends the study
    assert cfg.distill._target_.endswith(".KD")


def test_a_trial_returns_the_students_validation_accuracy_never_its_test_accuracy(monkeypatch) -> None:
    record = {
        "status": "ok",
        "student": {"val": {"acc": 0.61}, "test": {"acc": 0.93}},
        "teacher": {"test": {"acc": 0.99}},
    }
    monkeypatch.setattr(pipeline, "run", lambda cfg, **_: record)
    assert cli.run_job(OmegaConf.create({})) == 0.61


@needs_optuna
def test_a_failed_trial_returns_minus_infinity_which_optuna_records_as_the_worst(monkeypatch) -> None:
    monkeypatch.setattr(pipeline, "run", lambda cfg, **_: {"status": "failed", "error": "FloatingPointError: nan"})
    value = cli.run_job(OmegaConf.create({}))
    assert value == -math.inf
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    memory = optuna.create_study(direction="maximize")
    for told in (value, 0.5):
        memory.tell(memory.ask(), told)  # NaN here would be a failed trial, not counted in n_trials
    assert [t.state for t in memory.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert memory.best_value == 0.5


def test_search_space_syntax_is_checked_by_its_values_and_both_ends_of_intervals() -> None:
    good = [
        "sweep=tune_kd",
        "distill.lam=interval(0,1)",
        "distill.temperature=choice(1,2,4)",
        "optim.optimizer.lr=tag(log,interval(1e-4,1e-2))",
    ]
    cli.check(good)  # raises on any problem
    variants = list(cli.override_variants(["distill.lam=interval(0.2,0.9)", "seed=3"]))
    assert variants == [["distill.lam=0.2", "seed=3"], ["distill.lam=0.9", "seed=3"]]
    with pytest.raises(ConfigError, match=r"^distill\.lam=1\.5 is not allowed"):
        cli.check(["sweep=tune_kd", "distill.lam=interval(0,1.5)"])
    with pytest.raises(ConfigError, match=r"^distill\.temperature=0\.0 is not allowed"):
        cli.check(["sweep=tune_kd", "distill.temperature=tag(log,interval(0,8))"])


def test_a_missing_optuna_plugin_is_one_line_with_the_install_command() -> None:
    error = MissingConfigException(
        "In 'sweep/tune_kd': Could not find 'hydra/sweeper/optuna'",
        missing_cfg_file="hydra/sweeper/optuna",
        options=["basic"],
    )
    assert cli.explain(error) == (
        'hydra/sweeper=optuna is not an option; allowed: basic; the Optuna sweeper comes with pip install -e ".[tune]"'
    )


# -- the report of a tuning sweep, from job folders written by hand ------------------------------
def fake_trial(
    root: Path,
    job: int,
    lam: float,
    temperature: float,
    val: float | None,
    test: float,
    sweeper: str = "hydra_plugins.distillab_sweeper.optuna_sweeper.OptunaSweeper",
) -> None:
    folder = root / str(job)
    (folder / ".hydra").mkdir(parents=True)
    params = {"distill.lam": "interval(0, 1)", "distill.temperature": "interval(1, 8)", "seed": "0"}
    OmegaConf.save(
        {"hydra": {"sweeper": {"_target_": sweeper, "direction": "maximize", "params": params}}},
        folder / ".hydra" / "hydra.yaml",
    )
    overrides = [f"distill.lam={lam}", f"distill.temperature={temperature}", "sweep=tune_kd"]
    if val is None:
        record = {"status": "failed", "error": "FloatingPointError: nan", "overrides": overrides}
    else:
        record = {
            "status": "ok",
            "overrides": overrides,
            "group": " ".join(overrides[:2]),
            "method": "kd",
            "student": {"arch": "mlp", "params": 10 + job, "val": {"acc": val}, "test": {"acc": test}},
        }
    atomic_write_json(folder / "results.json", record)  # only what the report reads


def test_the_best_trial_is_chosen_by_validation_accuracy_and_the_report_lists_every_trial(tmp_path) -> None:
    fake_trial(tmp_path, 0, 0.1, 2.0, val=0.80, test=0.99)  # the best test accuracy: must not win
    fake_trial(tmp_path, 1, 0.7, 4.5, val=0.90, test=0.85)
    fake_trial(tmp_path, 2, 0.3, 7.0, val=None, test=0.0)
    fake_trial(tmp_path, 3, 0.9, 1.5, val=0.90, test=0.95)  # ties with trial 1, later: Optuna keeps 1
    paths = report.write_report(tmp_path)
    best = OmegaConf.load(paths["best_trial"])
    assert best.trial == 1 and best.val_acc == 0.90 and best.test_acc == 0.85
    assert dict(best.params) == {"distill.lam": 0.7, "distill.temperature": 4.5}  # seed is not searched
    assert best.job_dir == str((tmp_path / "1").resolve())
    assert best.command == "python train.py distill.lam=0.7 distill.temperature=4.5"
    markdown = paths["markdown"].read_text()
    table = markdown.split("## Tuning trials", 1)[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2:3] in ("*", " ")]
    assert [row.split(" | ")[1] for row in rows] == ["0", "1", "2", "3"]
    assert [row.startswith("| **best** |") for row in rows] == [False, True, False, False]
    assert "| 0.3 | 7 | failed | n/a |" in rows[2]
    assert "| 0.9000 | 0.8500 |" in rows[1]


def test_a_trial_killed_while_hydra_wrote_its_config_does_not_hide_the_others(tmp_path) -> None:
    fake_trial(tmp_path, 0, 0.1, 2.0, val=0.80, test=0.9)
    fake_trial(tmp_path, 1, 0.7, 4.5, val=0.85, test=0.9)
    (tmp_path / "0" / "results.json").unlink()
    (tmp_path / "0" / ".hydra" / "hydra.yaml").write_text("hydra:\n  sweeper: {_target_: hydra_plugins.distillab_")
    paths = report.write_report(tmp_path)
    assert OmegaConf.load(paths["best_trial"]).trial == 1
    table = paths["markdown"].read_text().split("## Tuning trials", 1)[1]
    assert [row.split(" | ")[4] for row in table.splitlines() if row.startswith("|  | 0 |")] == ["missing"]


def test_a_sweep_that_is_not_a_tuning_has_no_trials_table(tmp_path) -> None:
    for job in range(2):
        fake_trial(
            tmp_path,
            job,
            0.1 * job,
            2.0,
            val=0.8,
            test=0.9,
            sweeper="hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
        )
    paths = report.write_report(tmp_path)
    assert "best_trial" not in paths and not (tmp_path / report.BEST_TRIAL_FILE).exists()
    assert "## Tuning trials" not in paths["markdown"].read_text()


# -- real studies from the command line ----------------------------------------------------------
def tune_args(sweep: Path, cache: Path, *extra: str) -> list[str]:
    return ["sweep=tune_kd", *FAST, f"hydra.sweep.dir={sweep}", f"paths.cache_dir={cache}", *extra]


def tune(sweep: Path, cache: Path, *extra: str):
    result = run_train(tune_args(sweep, cache, *extra), env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def start_tune(log: Path, sweep: Path, cache: Path, *extra: str) -> subprocess.Popen:
    """A tuning command running in the background, in its own process group, its output in ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *tune_args(sweep, cache, *extra)],
            cwd=ROOT,
            env={**os.environ, **ENV},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def finish(process: subprocess.Popen, log: Path, timeout: int = 300) -> str:
    assert process.wait(timeout=timeout) == 0, log.read_text()[-2000:]
    return log.read_text()


def trials(storage: str, name: str = "tune_kd") -> list:
    """The study's trials, as its database holds them."""
    import optuna

    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def job_numbers(sweep: Path) -> list[int]:
    return sorted(int(p.name) for p in sweep.iterdir() if p.name.isdigit())


def searched(job: Path) -> dict[str, float]:
    """The searched values a job ran with, from its results.json."""
    pairs = (o.split("=", 1) for o in results.read(job)["overrides"])
    return {key: float(value) for key, value in pairs if key in SEARCHED}


def proposals(sweep: Path) -> list[list[str]]:
    """The searched overrides of each trial, in trial order."""
    jobs = sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    return [[o for o in results.read(job)["overrides"] if o.split("=")[0] in SEARCHED] for job in jobs]


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory) -> Path:
    """The teacher cache of this module's studies: the first trial to run trains the teacher."""
    return tmp_path_factory.mktemp("tune_cache")


@pytest.fixture(scope="module")
def real_study(tmp_path_factory, teacher_cache):
    root = tmp_path_factory.mktemp("tune")
    sweep = root / "a"
    result = tune(sweep, teacher_cache, "hydra.sweeper.n_trials=3")
    return root, sweep, result


@needs_optuna
def test_a_real_study_names_the_trial_with_the_best_validation_accuracy(real_study) -> None:
    _, sweep, result = real_study
    jobs = {int(p.name): results.read(p) for p in sweep.iterdir() if p.name.isdigit()}
    assert sorted(jobs) == [0, 1, 2] and all(r["status"] == "ok" for r in jobs.values())
    val = {job: r["student"]["val"]["acc"] for job, r in jobs.items()}
    winner = max(sorted(val), key=val.get)
    best = OmegaConf.load(sweep / "best_trial.yaml")
    assert best.trial == winner and best.val_acc == val[winner]
    assert best.test_acc == jobs[winner]["student"]["test"]["acc"]
    assert [f"{k}={v}" for k, v in best.params.items()] == proposals(sweep)[winner]
    # the sweeper itself was told the validation accuracy: its best value is the winner's
    optuna_results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert optuna_results.best_value == val[winner] and dict(optuna_results.best_params) == dict(best.params)
    assert f"best trial {winner}: val acc {val[winner]:.4f}" in result.stdout
    table = (sweep / "summary.md").read_text().split("## Tuning trials", 1)[1]
    assert table.count("| **best** |") == 1 and f"| **best** | {winner} |" in table
    for job, searched in enumerate(proposals(sweep)):
        lam = float(searched[0].split("=")[1])
        assert f"| {job} | {lam:.4g} |" in table and f"| ok | {val[job]:.4f} |" in table


@needs_optuna
def test_the_sampler_seed_proposes_the_same_settings_again(real_study, teacher_cache) -> None:
    root, sweep, _ = real_study
    first = proposals(sweep)
    assert len({tuple(p) for p in first}) == 3 and all(len(p) == 2 for p in first)  # not one setting
    # one epoch is enough: during its startup trials TPE samples at random from the seed alone
    again = root / "b"
    tune(again, teacher_cache, "hydra.sweeper.n_trials=2", "trainer.max_epochs=1")
    assert proposals(again) == first[:2]


@needs_optuna
@pytest.mark.slow  # the fast variant: test_a_failed_trial_returns_minus_infinity_which_optuna_records_as_the_worst
def test_a_failed_trial_does_not_stop_the_study(teacher_cache, tmp_path) -> None:
    presets = tmp_path / "conf" / "sweep"
    presets.mkdir(parents=True)
    # λ = 2 is out of range: with seed 0 the first trial draws it and fails, the second draws 0.3
    (presets / "tune_bad.yaml").write_text(
        "# @package _global_\ndefaults:\n  - tune_kd\nhydra:\n  sweeper:\n    params:\n"
        "      distill.lam: choice(0.3, 2.0)\n"
    )
    sweep = tmp_path / "bad"
    result = run_train(
        [
            "--config-dir",
            str(tmp_path / "conf"),
            "sweep=tune_bad",
            *FAST,
            "trainer.max_epochs=1",
            "hydra.sweeper.n_trials=2",
            f"hydra.sweep.dir={sweep}",
            f"paths.cache_dir={teacher_cache}",
        ],
        env=ENV,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    statuses = [results.read(sweep / str(job))["status"] for job in range(2)]
    assert statuses == ["failed", "ok"]
    best = OmegaConf.load(sweep / "best_trial.yaml")
    assert best.trial == 1 and best.params["distill.lam"] == 0.3
    assert json.loads((sweep / "1" / "results.json").read_text())["student"]["val"]["acc"] == best.val_acc
    assert OmegaConf.load(sweep / "optimization_results.yaml").best_value == best.val_acc


# -- the sweeper's parts, in-process -------------------------------------------------------------
def test_this_sweepers_config_wins_over_an_older_plugins_of_the_same_name() -> None:
    """hydra-optuna-sweeper, still installed after an upgrade, stores hydra/sweeper=optuna when Hydra
    imports its plugins; this sweeper's node must be the one composed."""
    old = {"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper", "n_trials": 20}
    ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=old, provider="optuna_sweeper")
    try:
        sweeper = compose_hydra("sweep=tune_kd").hydra.sweeper
    finally:
        from hydra_plugins.distillab_sweeper.optuna_sweeper import register

        register()
    assert sweeper._target_.startswith("hydra_plugins.distillab_sweeper.") and "heartbeat_interval" in sweeper


@needs_optuna
def test_the_search_space_follows_hydras_sweep_syntax_and_the_command_line_wins() -> None:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    preset = {"distill.lam": "interval(0, 1)", "distill.temperature": "interval(1, 8)", "seed": "0"}
    command_line = [
        "distill.temperature=4",  # fixes a key the preset searches
        "optim.optimizer.lr=tag(log,interval(1e-4,1e-2))",
        "trainer.max_epochs=range(2,8,2)",
        "data=choice(digits,cifar10)",
    ]
    space, fixed = study.search_space(preset, command_line)
    assert list(space) == ["distill.lam", "optim.optimizer.lr", "trainer.max_epochs", "data"]
    assert fixed == {"seed": "0", "distill.temperature": "4"}
    assert space["distill.lam"] == FloatDistribution(0.0, 1.0)
    assert space["optim.optimizer.lr"] == FloatDistribution(1e-4, 1e-2, log=True)
    # a range proposes its own values, the stop left out: those cli.check checked
    assert space["trainer.max_epochs"] == IntDistribution(2, 6, step=2)
    assert list(cli.override_variants(["trainer.max_epochs=range(2,8,2)"]))[-1] == ["trainer.max_epochs=6"]
    assert space["data"] == CategoricalDistribution(["digits", "cifar10"])
    with pytest.raises(ConfigError, match=r"^distill\.lam=glob\(\*\) is not allowed for hydra/sweeper=optuna"):
        study.search_space({}, ["distill.lam=glob(*)"])


@needs_optuna
def test_each_trial_draws_from_a_seed_of_its_own_derived_from_the_sampler_seed_and_its_number() -> None:
    import optuna

    def first_draw(sampler: dict, number: int) -> float:
        memory = optuna.create_study(sampler=study.trial_sampler(sampler, number))
        return memory.ask().suggest_float("x", 0, 1)

    tpe = {"_target_": "optuna.samplers.TPESampler", "seed": 0, "n_startup_trials": 10}
    assert first_draw(tpe, 3) == first_draw(tpe, 3)  # the same study proposes the same values again
    draws = {first_draw(tpe, number) for number in range(4)}
    assert len(draws) == 4  # a continued study, or a second process, does not repeat earlier trials
    assert first_draw({**tpe, "seed": 1}, 3) != first_draw(tpe, 3)
    assert isinstance(study.trial_sampler({"_target_": "optuna.samplers.RandomSampler", "seed": None}, 0), object)


def test_a_launch_covers_consecutive_trial_numbers_only() -> None:
    # a launcher numbers a batch's jobs from its first index on, and a trial's folder is its number
    assert study.consecutive([4, 5, 7, 8, 9, 12]) == [(0, 2), (2, 5), (5, 6)]
    assert study.consecutive([3]) == [(0, 1)]


def test_a_storage_url_is_shown_without_its_password() -> None:
    assert study.shown("postgresql://tuner:s3cr:et@db.example.org:5432/tuning") == (
        "postgresql://tuner:***@db.example.org:5432/tuning"
    )
    assert study.shown("sqlite:////data/sweep/study.db") == "sqlite:////data/sweep/study.db"
    assert study.storage_url(None, "/data/sweep") == "sqlite:////data/sweep/study.db"


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("direction", "up", "use maximize or minimize"),
        ("n_trials", 0, "a whole number >= 1"),
        ("n_jobs", 1.5, "a whole number >= 1"),
        ("max_failure_rate", 2.0, "a fraction in [0, 1]"),
        ("grace_period", 30, "above heartbeat_interval=60"),
    ],
)
def test_a_bad_sweeper_setting_is_one_line_naming_the_key_and_what_is_allowed(key, value, allowed) -> None:
    values = {
        "direction": "maximize",
        "storage": None,
        "study_name": "tune_kd",
        "n_trials": 20,
        "n_jobs": 1,
        "max_failure_rate": 0.0,
        "heartbeat_interval": 60,
        "grace_period": None,
    }
    assert study.study_settings(**values).n_trials == 20
    with pytest.raises(ConfigError) as error:
        study.study_settings(**{**values, key: value})
    message = str(error.value)
    assert message.startswith(f"hydra.sweeper.{key}={value} is not allowed") and allowed in message
    assert "\n" not in message


# -- a study kept in a database ------------------------------------------------------------------
@needs_optuna
def test_the_study_is_kept_in_the_sweep_folder_and_the_same_command_continues_it(
    real_study, teacher_cache, tmp_path
) -> None:
    _, sweep, _ = real_study
    stored = trials(f"sqlite:///{sweep / 'study.db'}")
    assert [t.number for t in stored] == job_numbers(sweep) == [0, 1, 2]
    for trial in stored:  # the database holds what each job's results.json says
        record = results.read(sweep / str(trial.number))
        assert trial.state.name == "COMPLETE" and trial.value == record["student"]["val"]["acc"]
        assert trial.params == searched(sweep / str(trial.number))
    again = tmp_path / "again"
    shutil.copytree(sweep, again)
    result = tune(again, teacher_cache, "hydra.sweeper.n_trials=3")  # complete already: no trial runs
    assert "3 of 3 trials complete" in result.stdout + result.stderr and job_numbers(again) == [0, 1, 2]
    tune(again, teacher_cache, "hydra.sweeper.n_trials=4", "trainer.max_epochs=1")
    continued = trials(f"sqlite:///{again / 'study.db'}")
    assert [t.state.name for t in continued] == ["COMPLETE"] * 4 and job_numbers(again) == [0, 1, 2, 3]
    assert [t.params for t in continued[:3]] == [t.params for t in stored]  # the first three are kept
    assert continued[3].params not in [t.params for t in stored]  # a new setting, not trial 0's again
    best = OmegaConf.load(again / "optimization_results.yaml")
    assert best.best_value == max(t.value for t in continued)


@needs_optuna
def test_a_trial_killed_while_running_is_retried_by_the_same_command(teacher_cache, tmp_path) -> None:
    sweep, extra = tmp_path / "killed", ("hydra.sweeper.n_trials=1", "trainer.max_epochs=1")
    process = start_tune(tmp_path / "first.log", sweep, teacher_cache, *extra)
    deadline = time.monotonic() + 120
    while not (sweep / "0" / ".hydra").is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the whole command, as a kill of a job on a cluster
    process.wait()
    assert not (sweep / "0" / "results.json").exists(), "trial 0 ended before it could be killed"
    tune(sweep, teacher_cache, *extra)
    killed, retried = trials(f"sqlite:///{sweep / 'study.db'}")
    assert (killed.state.name, retried.state.name) == ("FAIL", "COMPLETE")
    assert retried.params == killed.params == searched(sweep / "1") and retried.user_attrs["retry_of"] == 0
    assert OmegaConf.load(sweep / "best_trial.yaml").trial == 1


@needs_optuna
def test_two_commands_on_one_study_share_its_trials(teacher_cache, tmp_path) -> None:
    sweep, extra = tmp_path / "shared", ("hydra.sweeper.n_trials=2", "trainer.max_epochs=1")
    processes = [start_tune(tmp_path / f"{i}.log", sweep, teacher_cache, *extra) for i in range(2)]
    for i, process in enumerate(processes):
        finish(process, tmp_path / f"{i}.log")
    stored = trials(f"sqlite:///{sweep / 'study.db'}")
    assert [t.state.name for t in stored] == ["COMPLETE"] * 2 and job_numbers(sweep) == [0, 1]
    assert stored[0].params != stored[1].params
    assert [searched(sweep / str(t.number)) for t in stored] == [t.params for t in stored]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@needs_optuna
def test_a_database_that_cannot_be_reached_fails_in_one_line_before_any_trial(tmp_path) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql://tuner:s3cret@127.0.0.1:{port}/tuning"
    result = run_train(["sweep=tune_kd", f"hydra.sweep.dir={tmp_path / 'a'}", f"hydra.sweeper.storage={url}"], env=ENV)
    shown = f"postgresql://tuner:***@127.0.0.1:{port}/tuning"
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"error: hydra.sweeper.storage={shown} cannot be opened: ")
    assert "s3cret" not in result.stdout + result.stderr and not (tmp_path / "a").exists()
    # the default SQLite file in a sweep folder that cannot be created
    result = run_train(["sweep=tune_kd", "hydra.sweep.dir=/proc/nope"], env=ENV)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: hydra.sweeper.storage=sqlite:////proc/nope/study.db: cannot create the folder of the "
        "study's database: No such file or directory"
    )


# -- a study on a PostgreSQL server, shared by two machines ---------------------------------------
def postgres_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found and Path(found).resolve().with_name("initdb").exists():
        return Path(found).resolve().parent
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):  # Debian's layout
        if (folder / "pg_ctl").exists() and (folder / "initdb").exists():
            return folder
    return None


@pytest.fixture(scope="session")
def postgres():
    """The URL of a database on a private PostgreSQL server, started for these tests as an
    unprivileged user in a temporary folder on a free port, and stopped afterwards."""
    binaries = postgres_bin()
    if binaries is None:
        pytest.skip("PostgreSQL is not installed (no initdb, pg_ctl): apt-get install -y postgresql")
    try:
        import psycopg
    except ImportError:
        pytest.skip('no PostgreSQL driver (psycopg): pip install -e ".[tune]"')
    folder = Path(tempfile.mkdtemp(prefix="distillab-postgres-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and there is no 'postgres' user to run the PostgreSQL server as")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port, data = free_port(), folder / "data"

    def pg(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)

    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    started = pg(str(binaries / "initdb"), "-D", str(data), "-U", "tuner", "--auth=trust", "--no-sync")
    if started.returncode == 0:
        started = pg(str(binaries / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "-o", options, "start")
    if started.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        lines = (started.stderr or started.stdout).strip().splitlines() or ["no output"]
        pytest.skip(f"the PostgreSQL server did not start: {lines[-1]}")
    try:
        with psycopg.connect(host="127.0.0.1", port=port, user="tuner", dbname="postgres", autocommit=True) as db:
            db.execute("CREATE DATABASE tuning")
        yield f"postgresql://tuner:unused@127.0.0.1:{port}/tuning"  # trust: the password is not checked
    finally:
        pg(str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@needs_optuna
def test_a_study_on_postgresql_is_shared_by_two_machines_and_continued(teacher_cache, postgres, tmp_path) -> None:
    extra = (f"hydra.sweeper.storage={postgres}", "hydra.sweeper.n_trials=2", "trainer.max_epochs=1")
    # two machines: each its own sweep folder, one study in the database
    sweeps = [tmp_path / "machine_a", tmp_path / "machine_b"]
    processes = [start_tune(tmp_path / f"{i}.log", sweep, teacher_cache, *extra) for i, sweep in enumerate(sweeps)]
    logs = [finish(process, tmp_path / f"{i}.log") for i, process in enumerate(processes)]
    assert all("unused" not in log and "tuner:***@" in log for log in logs)  # the password is never shown
    stored = trials(postgres)
    complete = [t for t in stored if t.state.name == "COMPLETE"]
    # two processes asking at the same instant may each start the last trial
    assert len(complete) in (2, 3) and len(complete) == len(stored)
    folders = [job_numbers(sweep) for sweep in sweeps]
    assert not set(folders[0]) & set(folders[1]) and sorted(folders[0] + folders[1]) == [t.number for t in stored]
    for trial in stored:  # each trial ran once, in the folder of its number on one machine
        (job,) = [sweep / str(trial.number) for sweep in sweeps if (sweep / str(trial.number)).is_dir()]
        assert searched(job) == trial.params
    tune(sweeps[0], teacher_cache, *extra[:1], f"hydra.sweeper.n_trials={len(complete) + 1}", *extra[2:])
    assert [t.state.name for t in trials(postgres)] == ["COMPLETE"] * (len(complete) + 1)


@needs_optuna
def test_a_trial_whose_process_is_gone_is_failed_and_enqueued_again(tmp_path) -> None:
    """By its heartbeat (another machine's trial) or, on this machine, by its process id at once;
    a trial whose process still runs is left alone while its heartbeat is fresh."""
    import optuna

    settings = study.study_settings(
        direction="maximize",
        storage=None,
        study_name="s",
        n_trials=3,
        n_jobs=1,
        max_failure_rate=0.0,
        heartbeat_interval=1,
        grace_period=2,
    )
    url = study.storage_url(None, tmp_path)
    storage = study.open_storage(url, settings)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    shared = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    remote, gone, alive = study.ask(shared, storage, 3)
    for trial in (remote, gone, alive):
        trial.suggest_float("distill.lam", 0, 1)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    study_id = storage.get_study_id_from_name("s")
    owners = {remote: ("elsewhere", 1), gone: (socket.gethostname(), int(finished.stdout)), alive: None}
    for trial, owner in owners.items():
        if owner is not None:
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            storage.set_trial_system_attr(trial_id, study.OWNER_HOST, owner[0])
            storage.set_trial_system_attr(trial_id, study.OWNER_PID, owner[1])
    assert study.retry_dead_trials(shared, storage) == [gone.number]  # the remote one still has a fresh heartbeat
    # SQLite's clock counts whole seconds: a heartbeat 2.5 s old can read as 2 s, which is not stale
    time.sleep(3.5)
    assert study.retry_dead_trials(shared, storage) == [remote.number, alive.number]  # no heartbeat for 2 s
    by_number = {t.number: t for t in shared.get_trials(deepcopy=False)}
    assert [by_number[t.number].state.name for t in (remote, gone, alive)] == ["FAIL"] * 3
    waiting = [t for t in by_number.values() if t.state.name == "WAITING"]
    assert [t.user_attrs[study.RETRY_OF] for t in waiting] == [gone.number, remote.number, alive.number]
    enqueued = [by_number[t.number].params for t in (gone, remote, alive)]
    assert [t.system_attrs["fixed_params"] for t in waiting] == enqueued


def test_an_optuna_older_than_4_is_one_line_with_the_install_command(monkeypatch) -> None:
    monkeypatch.setattr(study.metadata, "version", lambda name: "2.10.1")
    with pytest.raises(ConfigError, match=r"^hydra/sweeper=optuna needs Optuna 4 or later, found 2\.10\.1: pip"):
        study.require_optuna()


def test_the_sweepers_keys_pass_the_command_line_check_with_another_launcher() -> None:
    # the preset chooses the sweeper: its keys are known when the launcher's are checked
    cli.check_command_line(["sweep=tune_kd", "hydra/launcher=joblib", "hydra.sweeper.n_jobs=2"])  # no exit
