"""Every experiment file composes and runs a handful of steps on fixture data in the real
on-disk formats; the paper recipes are what their comments say."""

import pytest

from distillab import pipeline
from tests.conftest import CONF
from tests.fixtures_vision import WRITERS, trust_cifar_fixtures

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
# a handful of steps: one epoch of two small batches for teacher and student, quick timing
TINY = [
    "trainer.max_epochs=1",
    "teacher.recipe.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.enable_progress_bar=false",
    "data.batch_size=8",
    "measure.warmup=0",
    "measure.repeats=1",
]


def _dataset(name: str) -> str | None:
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    for line in text.splitlines():
        if line.strip().startswith("- override /data:"):
            return line.split(":", 1)[1].strip()
    return None


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs_a_few_steps(name, make_cfg, tmp_path, monkeypatch):
    overrides = [f"experiment={name}", *TINY]
    dataset = _dataset(name)
    if dataset is not None:
        root = tmp_path / "data"
        WRITERS[dataset](root)
        trust_cifar_fixtures(monkeypatch)
        overrides += [f"data.root={root}", "data.val_size=20", "data.download=false"]
    record = pipeline.run(make_cfg(*overrides, fast=False))
    assert record["status"] == "ok", record
    assert record["dataset"] == (dataset or "digits")


def test_the_cifar100_recipes_are_the_benchmark_recipe(make_cfg):
    names = [n for n in EXPERIMENTS if n.startswith("cifar100_kd_")]
    assert len(names) == 4
    for name in names:
        cfg = make_cfg(f"experiment={name}", fast=False)
        for recipe in (cfg.optim, cfg.teacher.recipe.optim):
            assert recipe.optimizer._target_ == "torch.optim.SGD"
            assert (recipe.optimizer.lr, recipe.optimizer.momentum, recipe.optimizer.weight_decay) == (0.05, 0.9, 5e-4)
            assert list(recipe.scheduler.milestones) == [150, 180, 210] and recipe.scheduler.gamma == 0.1
        assert cfg.trainer.max_epochs == cfg.teacher.recipe.max_epochs == 240
        assert (cfg.distill.lam, cfg.distill.temperature) == (0.9, 4.0)
        assert cfg.data.batch_size == 64 and cfg.data.augment and cfg.data.max_shift == 4


def test_hinton_mnist_is_the_papers_setup(make_cfg):
    cfg = make_cfg("experiment=hinton_mnist", fast=False)
    assert list(cfg.teacher.hidden) == [1200, 1200] and cfg.teacher.dropout == 0.5
    assert cfg.teacher.recipe.augment is True and cfg.data.augment is False and cfg.data.max_shift == 2
    assert list(cfg.student.hidden) == [800, 800] and cfg.student.dropout == 0.0
    assert cfg.distill.temperature == 20.0
