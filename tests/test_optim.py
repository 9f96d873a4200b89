"""Learning-rate schedules, and the optim group wired through a real run."""

import csv

import pytest
import torch

from distillab import optim, pipeline


def _lrs(factory, epochs: int, **kwargs) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = factory(opt, max_epochs=epochs, **kwargs)
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


def test_multistep_is_the_cifar_recipe():
    lrs = _lrs(optim.multistep, 240, milestones=[150, 180, 210], gamma=0.1)
    assert lrs[149] == 1.0 and lrs[150] == pytest.approx(0.1) and lrs[180] == pytest.approx(0.01)
    assert lrs[239] == pytest.approx(0.001)


def test_cosine_decays_to_eta_min_over_the_run_after_warmup():
    lrs = _lrs(optim.cosine, 10, warmup_epochs=2, eta_min_ratio=0.1)
    assert lrs[:2] == pytest.approx([0.5, 1.0])
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[6] == pytest.approx(0.1 + 0.9 * 0.5)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


@pytest.mark.parametrize("kwargs", [{"milestones": [20, 10]}, {"warmup_epochs": 10}])
def test_bad_schedules_name_the_argument(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        _lrs(optim.multistep, 10, **kwargs)


def _logged(path, name: str) -> list[float]:
    rows = list(csv.DictReader(path.open()))
    return [float(row[name]) for row in rows if row.get(name)]


@pytest.mark.parametrize(
    "scheduler,args,expected",
    [
        ("multistep", ["optim.scheduler.milestones=[1,2]"], [0.05, 0.005, 0.0005]),
        ("cosine", ["optim.scheduler.warmup_epochs=1"], [0.05, 0.05, 0.025]),
    ],
)
def test_teacher_and_student_each_follow_their_own_recipe(make_cfg, tmp_path, scheduler, args, expected):
    cfg = make_cfg(
        "optim=sgd",
        f"optim/scheduler={scheduler}",
        *args,
        "optim@teacher.recipe.optim=adamw",
        "teacher.recipe.optim.optimizer.lr=0.002",
        "teacher.recipe.max_epochs=2",
        "trainer.max_epochs=3",
        own_cache=True,  # the teacher is trained here: its logged learning rates are checked
    )
    assert pipeline.run(cfg)["status"] == "ok"
    assert _logged(tmp_path / "run" / "csv" / "student" / "metrics.csv", "train/lr") == pytest.approx(expected)
    assert _logged(tmp_path / "run" / "csv" / "teacher" / "metrics.csv", "train/lr") == pytest.approx([0.002] * 2)
