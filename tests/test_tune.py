"""Tuning λ and T with Optuna (``sweep=tune_kd``): the preset, the objective a trial returns, the
best trial and the trials table, checks of the search-space syntax, and real studies."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hydra.errors import MissingConfigException
from hydra.types import RunMode
from omegaconf import OmegaConf

from distillab import cli, pipeline, report, results
from distillab.config import ConfigError
from distillab.io import atomic_write_json
from tests.conftest import FAST, compose_hydra, run_train

SEARCHED = ("distill.lam", "distill.temperature")
# optuna 2.10 imports a name SQLAlchemy 2 has moved; the in-memory study never uses it
pytestmark = pytest.mark.filterwarnings("ignore:.*declarative_base.*")


def test_the_preset_is_a_seeded_tpe_study_of_lam_and_temperature() -> None:
    cfg = compose_hydra("sweep=tune_kd", "hydra.sweeper.n_trials=7")
    sweeper = cfg.hydra.sweeper
    assert cfg.hydra.mode == RunMode.MULTIRUN  # no -m needed
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
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
    monkeypatch.setattr(pipeline, "run", lambda cfg: record)
    assert cli.run_job(OmegaConf.create({})) == 0.61


def test_a_failed_trial_returns_minus_infinity_which_optuna_records_as_the_worst(monkeypatch) -> None:
    monkeypatch.setattr(pipeline, "run", lambda cfg: {"status": "failed", "error": "FloatingPointError: nan"})
    value = cli.run_job(OmegaConf.create({}))
    assert value == -math.inf
    import optuna  # here, so that the warning filter above applies to its import

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for told in (value, 0.5):
        study.tell(study.ask(), told)  # NaN here would raise, and end the sweeper's study
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert study.best_value == 0.5


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
    sweeper: str = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
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
def tune(sweep: Path, cache: Path, *extra: str):
    result = run_train(["sweep=tune_kd", *FAST, f"hydra.sweep.dir={sweep}", f"paths.cache_dir={cache}", *extra])
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def proposals(sweep: Path) -> list[list[str]]:
    """The searched overrides of each trial, in trial order."""
    jobs = sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    return [[o for o in results.read(job)["overrides"] if o.split("=")[0] in SEARCHED] for job in jobs]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    sweep = root / "a"
    result = tune(sweep, root / "cache", "hydra.sweeper.n_trials=3")
    return root, sweep, result


def test_a_real_study_names_the_trial_with_the_best_validation_accuracy(study) -> None:
    _, sweep, result = study
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


def test_the_sampler_seed_proposes_the_same_settings_again(study) -> None:
    root, sweep, _ = study
    first = proposals(sweep)
    assert len({tuple(p) for p in first}) == 3 and all(len(p) == 2 for p in first)  # not one setting
    # one epoch is enough: during its startup trials TPE samples at random from the seed alone
    again = root / "b"
    tune(again, root / "cache", "hydra.sweeper.n_trials=2", "trainer.max_epochs=1")
    assert proposals(again) == first[:2]


@pytest.mark.slow  # the fast variant: test_a_failed_trial_returns_minus_infinity_which_optuna_records_as_the_worst
def test_a_failed_trial_does_not_stop_the_study(study, tmp_path) -> None:
    root, _, _ = study
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
            f"paths.cache_dir={root / 'cache'}",
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    statuses = [results.read(sweep / str(job))["status"] for job in range(2)]
    assert statuses == ["failed", "ok"]
    best = OmegaConf.load(sweep / "best_trial.yaml")
    assert best.trial == 1 and best.params["distill.lam"] == 0.3
    assert json.loads((sweep / "1" / "results.json").read_text())["student"]["val"]["acc"] == best.val_acc
