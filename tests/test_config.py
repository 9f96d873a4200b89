"""Every option of every group composes; every bad input fails with one line, before work."""

from pathlib import Path

import pytest

from distillab import cli
from distillab.config import ConfigError, validate
from tests.conftest import CONF, compose_cfg, run_train

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "local", "model"))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "override", [f"{group}={option}" for group in GROUPS for option in _options(group)]
)
def test_every_option_composes_and_validates(override, tmp_path):
    cfg = compose_cfg([override], tmp_path)
    validate(cfg)


def test_every_model_is_usable_as_teacher_and_student():
    models = set(_options("model"))
    assert models == set(_options("teacher")) == set(_options("student"))


BAD = {
    "distill.lam=1.5": "distill.lam",
    "distill.temperature=0": "distill.temperature",
    "trainer.max_epochs=-1": "trainer.max_epochs",
    "data.val_fraction=2": "data.val_fraction",
    "distill.lamb=0.3": "distill.lamb",
    "+distill.lamb=0.3": "distill.lamb",
    "trainer.max_epoch=3": "trainer.max_epoch",
    "distill=kdd": "distill=kdd",
    "student=nosuchnet": "student=nosuchnet",
    "seeed=1": "seeed",
    "distill.lam=abc": "distill.lam",
    "trainer.accelerator=gpux": "trainer.accelerator",
    "teacher.recipe.max_epochs=0": "teacher.recipe.max_epochs",
}


@pytest.mark.parametrize("override,key", BAD.items())
def test_bad_input_is_one_line_naming_the_key(override, key, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.check_command_line([override])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert key in err, err


def test_allowed_values_are_named(capsys):
    with pytest.raises(SystemExit):
        cli.check_command_line(["distill=kdd"])
    assert "allowed: at, dkd, fitnet, kd, none, pkt, rkd, sp" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.check_command_line(["distill.lamb=1"])
    assert "allowed keys of distill: lam, temperature" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.check_command_line(["distill.lam=2"])
    assert "[0, 1]" in capsys.readouterr().err


def test_every_value_of_a_sweep_is_checked(capsys):
    with pytest.raises(SystemExit):
        cli.check_command_line(["-m", "distill.lam=0.1,0.5,1.5", "seed=0,1"])
    assert "distill.lam=1.5" in capsys.readouterr().err
    cli.check_command_line(["-m", "distill.lam=0.1,0.5", "seed=0,1"])  # valid: no exit


def test_help_and_cfg_are_left_to_hydra():
    cli.check_command_line(["--help"])
    cli.check_command_line(["--cfg", "job", "distill=kdd"])


@pytest.mark.parametrize("override", ["distill.lam=1.5", "student.hidden=[0]"])
def test_bad_input_from_the_command_line_writes_nothing(override, tmp_path):
    run_dir = tmp_path / "run"
    result = run_train([override, f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}",
                        "trainer.enable_progress_bar=false"])
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and override.split("=")[0] in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not list(Path(tmp_path).rglob("results.json"))
    assert not (tmp_path / "cache").exists()


def test_validate_rejects_a_key_appended_to_a_schema(tmp_path):
    cfg = compose_cfg(["+distill.lamda=0.2"], tmp_path)  # Hydra lets `+` through
    with pytest.raises(ConfigError, match="distill.lamda is not a known key"):
        validate(cfg)


def test_interpolated_values_are_left_to_the_job(tmp_path):
    cfg = compose_cfg(["data=synthetic", "data.batch_size=${seed}"], tmp_path)
    validate(cfg)  # ${seed} is resolved inside the job, not by the up-front check


def test_help_and_cfg_job_from_the_command_line(tmp_path):
    help_out = run_train(["--help"], cwd=tmp_path)
    assert help_out.returncode == 0 and "distill: at, dkd, fitnet, kd, none, pkt, rkd, sp" in help_out.stdout
    assert "python train.py -m" in help_out.stdout
    cfg_out = run_train(["--cfg", "job", "distill.lam=0.9", "student=cnn"], cwd=tmp_path)
    assert cfg_out.returncode == 0
    assert "lam: 0.9" in cfg_out.stdout and "_target_: distillab.models.CNN" in cfg_out.stdout
    assert not list(tmp_path.rglob("results.json")) and not (tmp_path / "outputs").exists()
