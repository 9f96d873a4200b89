"""Sweep presets (``sweep=<name>``, conf/sweep/): each composes into a multirun, every job of its
grid is a valid run, the command line replaces a preset's sweep of a key, and one really runs."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import Container, OmegaConf

from distillab import cli, conf, results
from distillab.config import ConfigError, validate
from tests.conftest import CONF, FAST, compose_hydra, run_train

# the grid of every basic-sweeper preset; sweep=tune_kd (Optuna) is tested in test_tune.py
PRESETS = {
    "lambda_T": {"distill.lam": 3, "distill.temperature": 4, "seed": 3},
    "student_size": {"student.hidden": 6, "distill": 2, "seed": 3},
    "student_size_cnn": {"student.width": 3, "student.blocks": 2, "distill": 2, "seed": 3},
    "compression": {"compress": 5, "compress.amount": 3, "seed": 3},
}
DISTILL_LOSSES = {"none": "CrossEntropy", "kd": "KD"}


def grid(params: dict[str, str]) -> dict[str, list[str]]:
    """Each swept key of a preset and its values as ``key=value`` overrides, read with Hydra's
    own override parser (as the basic sweeper reads ``hydra.sweeper.params``)."""
    parsed = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in params.items()])
    return {o.get_key_element(): [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in parsed}


def jobs_of(axes: dict[str, list[str]]) -> list[list[str]]:
    """Every job of the grid except that seeds, which only seed the random generators, are dealt
    round-robin over the other keys' combinations (every seed value is still composed): the full
    product would compose each configuration once per seed for nothing."""
    seeds = axes.get("seed", [])
    others = [values for key, values in axes.items() if key != "seed"]
    combos = [list(combo) for combo in itertools.product(*others)]
    return [combo + ([seeds[i % len(seeds)]] if seeds else []) for i, combo in enumerate(combos)]


def test_every_grid_preset_is_tested_here() -> None:
    grids = {
        path.stem
        for path in (CONF / "sweep").glob("*.yaml")
        if compose_hydra(f"sweep={path.stem}").hydra.sweeper._target_.endswith("BasicSweeper")
    }
    assert grids == set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_is_a_multirun_of_its_grid(name: str) -> None:
    text = (CONF / "sweep" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    assert f"python train.py sweep={name}" in text  # the command, in the file's comment
    cfg = compose_hydra(f"sweep={name}")
    assert cfg.hydra.mode == RunMode.MULTIRUN
    assert cfg.hydra.sweeper._target_.endswith("BasicSweeper")
    axes = grid(OmegaConf.to_container(cfg.hydra.sweeper.params))
    assert {key: len(values) for key, values in axes.items()} == PRESETS[name]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_job_of_a_preset_composes_and_validates(name: str) -> None:
    axes = grid(OmegaConf.to_container(compose_hydra(f"sweep={name}").hydra.sweeper.params))
    jobs = jobs_of(axes)
    assert {value for job in jobs for value in job} == {value for values in axes.values() for value in values}
    parser = OverridesParser.create()
    for job in jobs:
        cfg = cli._compose([f"sweep={name}", *job])  # the composition cli.check uses before a run
        validate(cfg)
        for override in parser.parse_overrides(job):  # and the job got the values it was given
            key = override.get_key_element()
            if key == "distill":  # a group whose config carries no name: its loss class tells
                assert cfg.distill._target_.endswith(DISTILL_LOSSES[override.value()]), override.input_line
                continue
            if key == "compress":  # likewise: the option's file, whatever amount the job sweeps
                assert _is_option(cfg.compress, "compress", override.value()), override.input_line
                continue
            actual = OmegaConf.select(cfg, key)
            actual = OmegaConf.to_container(actual) if isinstance(actual, Container) else actual
            assert actual == override.value(), override.input_line


def test_the_compression_grid_pairs_each_method_with_its_own_amount() -> None:
    for method in ("prune_unstructured", "prune_structured", "prune_structured+quant_static"):
        cfg = cli._compose(["sweep=compression", f"compress={method}", "compress.amount=0.7"])
        assert _is_option(cfg.compress, "compress", method) and cfg.compress.amount == 0.7
    with pytest.raises(ConfigError, match=r"compress\.amount=1\.5 is not allowed"):
        validate(cli._compose(["sweep=compression", "compress=prune_structured", "compress.amount=1.5"]))


def test_the_preset_changes_the_groups() -> None:
    assert compose_hydra("sweep=lambda_T", "distill=none").distill._target_.endswith("CrossEntropy")
    assert compose_hydra("sweep=lambda_T").distill._target_.endswith(".KD")
    assert compose_hydra("sweep=student_size_cnn").student._target_.endswith("CNN")


def test_the_pre_hydra_check_passes_a_preset_and_rejects_a_bad_value_swept_on_top(capsys) -> None:
    cli.check_command_line(["sweep=lambda_T", "seed=0,1"])
    cli.check_command_line(["sweep=compression", "compress.amount=0.2,0.9", "hydra/launcher=joblib"])
    with pytest.raises(SystemExit) as exit_info:
        cli.check_command_line(["sweep=lambda_T", "distill.lam=0.5,1.5"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "distill.lam=1.5 is not allowed" in err


def test_a_preset_runs_from_the_command_line_and_a_key_given_there_replaces_its_sweep(
    tmp_path: Path, teacher_cache: Path
) -> None:
    sweep = tmp_path / "sweep"
    result = run_train(
        [
            "sweep=lambda_T",
            "distill.lam=0.5",
            "distill.temperature=2",
            "seed=0,1",
            *FAST,
            f"hydra.sweep.dir={sweep}",
            f"paths.cache_dir={teacher_cache}",
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = sorted(path.parent for path in sweep.glob("*/results.json"))
    assert len(jobs) == 2  # not the preset's 3 × 4 × 3 grid
    records = [results.read(job) for job in jobs]
    assert all(r["status"] == "ok" and r["method"] == "kd" for r in records)
    assert sorted(r["seed"] for r in records) == [0, 1]
    assert all({"distill.lam=0.5", "distill.temperature=2"} <= set(r["overrides"]) for r in records)
    for name in ("summary.csv", "summary.md", "accuracy_vs_params.png"):
        assert (sweep / name).stat().st_size > 0, name


def _is_option(node, group: str, option: str) -> bool:
    """Whether ``node`` is ``conf/<group>/<option>.yaml`` (apart from the swept ``amount``)."""
    expected = OmegaConf.to_container(conf.load(group, option))
    actual = OmegaConf.to_container(node)
    return {k: v for k, v in actual.items() if k != "amount"} == {k: v for k, v in expected.items() if k != "amount"}
