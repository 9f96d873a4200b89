"""Every option of every group composes; every bad input fails with one line, before work."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distillab import cli, conf, settings
from distillab.config import ConfigError, validate
from tests.conftest import CONF, ROOT, compose_cfg, run_train

# groups whose options are files; teacher= and student= take the options of model/
GROUPS = sorted(
    p.name for p in CONF.iterdir() if p.is_dir() and conf.options(p.name) and p.name not in ("hydra", "local")
)
ROLE_OPTIONS = [f"{role}={name}" for role in ("teacher", "student") for name in conf.options("model")]


@pytest.mark.parametrize(
    "override",
    [f"{group}={option}" for group in GROUPS if group != "model" for option in conf.options(group)] + ROLE_OPTIONS,
)
def test_every_option_composes_and_validates(override, tmp_path):
    cfg = compose_cfg([override], tmp_path)
    validate(cfg)


def test_one_file_per_architecture_serves_both_roles(tmp_path):
    assert not conf.options("teacher") and not conf.options("student")  # no template copies per role
    cfg = compose_cfg(["teacher=resnet8", "student=resnet8"], tmp_path)
    model = conf.load("model", "resnet8")
    for role in ("teacher", "student"):
        assert {k: cfg[role][k] for k in model} == dict(model)
    assert cfg.teacher.recipe.max_epochs >= 1 and "init" in cfg.student and "recipe" not in cfg.student


BAD = {
    "distill.lam=1.5": "distill.lam",
    "distill.temperature=0": "distill.temperature",
    "trainer.max_epochs=-1": "trainer.max_epochs",
    "data.val_fraction=2": "data.val_fraction",
    "distill.lamb=0.3": "distill.lamb",
    "+distill.lamb=0.3": "distill.lamb",
    "trainer.max_epoch=3": "trainer.max_epoch",
    "distill=kdd": "distill=kdd",
    "seeed=1": "seeed",
    "distill.lam=abc": "distill.lam",
    "trainer.accelerator=gpux": "trainer.accelerator",
    "teacher.recipe.max_epochs=-1": "teacher.recipe.max_epochs",
    # the values of a second list, with the whole message
    "seed=abc": "seed='abc' is not allowed: an integer in [0, 4294967295]",
    "seed=-1": "seed=-1 is not allowed: an integer in [0, 4294967295]",
    "distill.temperature=inf": "distill.temperature=inf is not allowed: a temperature > 0",
    "distill.lam=nan": "distill.lam=nan is not allowed",
    "+sed=1": "sed is not a known key; allowed top-level keys:",
    "student=nosuchnet": "student=nosuchnet is not an option; allowed: bilstm, cnn,",
    "trainer.max_epochs=1.5": "trainer.max_epochs=1.5 is not allowed: an integer >= 1",
    "data.labelled_fraction=0": "data.labelled_fraction=0",
}


@pytest.mark.parametrize("override,expected", BAD.items())
def test_bad_input_is_one_line_naming_the_key(override, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.check_command_line([override])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert expected in err, err


HEAVY = ("torch", "pytorch_lightning", "torchvision", "torchmetrics")
MY_METHOD = ROOT / "examples" / "my_method"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["distill.temperature=-1"], "error: distill.temperature=-1 is not allowed: a temperature > 0"),
        (  # a user's part, from outside the package, as examples/my_method/README.md runs it
            ["--config-dir", str(MY_METHOD / "conf"), "distill=logit_matching", "distill.weight=-1"],
            "error: distill.weight=-1 is not allowed: a weight >= 0",
        ),
    ],
    ids=["built-in", "example"],
)
def test_a_warm_check_answers_without_importing_torch(args, expected, tmp_path, monkeypatch):
    """The declarations read once (here, in this process) are what a later command's check reads:
    a fresh interpreter with the same path reports the bad value in one line, torch never imported."""
    monkeypatch.setenv(settings.CACHE_ENV, str(tmp_path / "declarations"))
    monkeypatch.syspath_prepend(str(MY_METHOD))
    settings.declaration.cache_clear()
    with pytest.raises(SystemExit):
        cli.check_command_line(args)  # reads and caches every declaration the check needs
    settings.declaration.cache_clear()
    code = (
        f"import sys; sys.path[:] = {sys.path!r}\n"
        "from distillab import cli\n"
        f"try:\n    cli.check_command_line({args!r})\nexcept SystemExit as e:\n    code = e.code\n"
        f"print(code, [m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "2 []", out.stdout + out.stderr
    assert out.stderr.strip() == expected


def test_a_teacher_file_that_is_not_a_state_dict_fails_before_training(tmp_path, capsys):
    bad = tmp_path / "not_a_state_dict.pt"
    torch.save([1, 2, 3], bad)
    wrong = tmp_path / "other_arch.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), wrong)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    for n, (path, message) in enumerate(
        (
            (bad, "a state_dict"),
            (wrong, "of the teacher's architecture"),
            (text, "not a torch.save file"),
            (tmp_path / "missing.pt", "does not exist"),
        )
    ):
        args = [f"teacher.ckpt_path={path}", "trainer.enable_progress_bar=false"]
        if n == 0:  # through train.py once; the others take the job's own path in this process
            result = run_train([*args, f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"])
            code, stderr = result.returncode, result.stderr
        else:
            with pytest.raises(SystemExit) as exit_info:
                cli.run_job(compose_cfg(args, tmp_path / "run", tmp_path / "cache"))
            code, stderr = exit_info.value.code, capsys.readouterr().err
        errors = [line for line in stderr.splitlines() if line.startswith("error")]
        assert code == 2 and len(errors) == 1, stderr
        assert "teacher.ckpt_path=" in errors[0] and message in errors[0], errors[0]
        assert "Traceback" not in stderr
        assert not list(tmp_path.rglob("results.json")) and not (tmp_path / "cache").exists()


def test_allowed_values_are_named(capsys):
    with pytest.raises(SystemExit):
        cli.check_command_line(["distill=kdd"])
    assert "allowed: " + ", ".join(conf.options("distill")) in capsys.readouterr().err
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
    result = run_train(
        [
            override,
            f"hydra.run.dir={run_dir}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            "trainer.enable_progress_bar=false",
        ]
    )
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
    assert help_out.returncode == 0 and "distill: " + ", ".join(conf.options("distill")) in help_out.stdout
    for role in ("teacher", "student"):
        assert f"{role}: " + ", ".join(conf.options("model")) in help_out.stdout
    assert "python train.py -m" in help_out.stdout
    cfg_out = run_train(["--cfg", "job", "distill.lam=0.9", "student=cnn"], cwd=tmp_path)
    assert cfg_out.returncode == 0
    assert "lam: 0.9" in cfg_out.stdout and "_target_: distillab.models.CNN" in cfg_out.stdout
    assert not list(tmp_path.rglob("results.json")) and not (tmp_path / "outputs").exists()


def test_a_rule_across_trainer_keys_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.check_command_line(["trainer=ddp", "trainer.sync_batchnorm=true", "trainer.accelerator=cpu"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: trainer.sync_batchnorm=True is not allowed: false with "
        "accelerator=cpu (torch's SyncBatchNorm runs on GPUs only)"
    )


@pytest.mark.parametrize(
    ("given", "read"),
    [
        ("teacher_assistant=null", "teacher_assistant=none"),
        ("teacher_assistant=null,cnn", "teacher_assistant=none,cnn"),
        ("teacher_assistant=cnn", "teacher_assistant=cnn"),
        ("teacher=null", "teacher=null"),
    ],
)
def test_the_old_null_of_a_key_that_became_a_group_still_means_none(given, read, monkeypatch):
    from distillab import cli

    monkeypatch.setattr(sys, "argv", ["train.py", given, "--cfg", "job"])
    assert cli.null_as_none(given) == read
    if given.startswith("teacher_assistant"):
        cli.check_command_line()  # no error: the spelling Hydra refuses for a group is read as none
        assert sys.argv[1] == read
