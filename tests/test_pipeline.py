"""End to end on digits with few epochs: results.json, the teacher cache, failures."""

import json
from pathlib import Path

import pytest
import torch

from distillab import pipeline, results
from distillab.steps.teacher import cache
from tests.conftest import teacher_folder, teacher_key


def test_run_writes_a_complete_results_json(make_cfg, tmp_path):
    cfg = make_cfg("distill=kd", "distill.lam=0.5", "distill.temperature=2", own_cache=True)
    record = pipeline.run(cfg)
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk == record
    results.check(on_disk)
    assert on_disk["status"] == "ok" and on_disk["method"] == "kd" and on_disk["compress"] == "none"
    assert on_disk["dataset"] == "digits" and on_disk["seed"] == 0
    teacher, student = on_disk["teacher"], on_disk["student"]
    assert teacher["cache"] == "miss" and len(teacher["cache_key"]) == 16
    assert teacher["arch"] == "cnn" and student["arch"] == "mlp"
    assert teacher["params"] >= 10 * student["params"]
    assert student["params"] == 64 * 32 + 32 + 32 * 10 + 10
    for block in (teacher["test"], student["test"]):
        assert all(0.0 <= v <= 1.0 for v in block.values())
    assert {"acc", "f1", "precision", "recall", "agreement"} <= set(student["test"])
    assert student["test"]["acc"] > 0.5  # three epochs already learn digits
    assert on_disk["ratios"]["params"] == pytest.approx(student["params"] / teacher["params"])
    assert on_disk["ratios"]["acc_retention"] == pytest.approx(student["test"]["acc"] / teacher["test"]["acc"])
    assert set(on_disk["timing_s"]) == {"teacher", "student", "compress", "total"}
    assert set(on_disk["env"]) == {"git_commit", "python", "torch", "lightning", "hydra", "device"}
    # the student checkpoint holds the student only
    state = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    assert all(key.startswith("model.") for key in state)
    # per-epoch metric logs for both models, with each loss term named
    header = (tmp_path / "run" / "csv" / "student" / "metrics.csv").read_text().splitlines()[0]
    assert {"train/ce", "train/kd", "train/loss", "val/acc"} <= set(header.split(","))


def test_second_run_hits_the_teacher_cache(make_cfg, tmp_path, caplog):
    first = pipeline.run(make_cfg(out=tmp_path / "a", own_cache=True))
    caplog.clear()
    with caplog.at_level("INFO", logger="distillab.steps.teacher.cache"):
        second = pipeline.run(make_cfg("distill=none", "seed=1", out=tmp_path / "b", own_cache=True))
    assert first["teacher"]["cache"] == "miss" and second["teacher"]["cache"] == "hit"
    assert second["teacher"]["cache_key"] == first["teacher"]["cache_key"]
    assert second["teacher"]["test"] == first["teacher"]["test"]
    assert any(f"teacher cache hit: key {first['teacher']['cache_key']}" in m for m in caplog.messages)
    assert second["timing_s"]["teacher"] < first["timing_s"]["teacher"]
    # a different teacher recipe is another teacher
    third = pipeline.run(make_cfg("teacher.recipe.max_epochs=2", out=tmp_path / "c", own_cache=True))
    assert third["teacher"]["cache"] == "miss"
    assert third["teacher"]["cache_key"] != first["teacher"]["cache_key"]


def test_cache_key_ignores_the_run_seed_and_display_settings(make_cfg):
    base = teacher_key(make_cfg())
    assert teacher_key(make_cfg("seed=7", "trainer.enable_progress_bar=true", "data.eval_batch_size=64")) == base
    assert teacher_key(make_cfg("teacher.width=8")) != base
    assert teacher_key(make_cfg("teacher.recipe.seed=1")) != base
    assert teacher_key(make_cfg("data.split_seed=1")) != base


def test_a_killed_teacher_training_leaves_nothing_trusted(make_cfg, tmp_path):
    cfg = make_cfg(own_cache=True)

    def crash(model, staging, single_process):
        (staging / "partial").write_text("half a teacher")
        raise KeyboardInterrupt

    identity = cache.identity(cfg.data, cfg.teacher, cfg.trainer.precision)
    with pytest.raises(KeyboardInterrupt):
        cache.obtain(torch.nn.Linear(64, 10), identity, cfg.paths.cache_dir, cfg.trainer, crash)
    folder = Path(cfg.paths.cache_dir)
    assert not cache.is_complete(teacher_folder(cfg))
    assert not [p for p in folder.iterdir() if not p.name.endswith(".lock")]


def test_teacher_from_a_state_dict_file(make_cfg, tmp_path):
    cfg = make_cfg()
    path = tmp_path / "teacher.pt"
    torch.save(pipeline.prepare(cfg).teacher.state_dict(), path)
    file_cfg = make_cfg(f"teacher.ckpt_path={path}", out=tmp_path / "file", own_cache=True)
    record = pipeline.run(file_cfg)
    assert record["teacher"]["cache"] == "file"
    assert not Path(file_cfg.paths.cache_dir).exists()


def test_nan_loss_is_a_failed_run_with_one_line(make_cfg, tmp_path):
    cfg = make_cfg("optim.optimizer.lr=1e30", "distill=none", "data.normalize=false")
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        pipeline.run(cfg, raise_on_failure=True)
    record = results.read(tmp_path / "run")
    assert record["status"] == "failed" and "\n" not in record["error"]
    assert "FloatingPointError" in record["error"]


def test_in_a_sweep_a_failure_is_recorded_and_the_run_returns(make_cfg, tmp_path):
    record = pipeline.run(
        make_cfg("optim.optimizer.lr=1e30", "distill=none", "data.normalize=false"), raise_on_failure=False
    )
    assert record["status"] == "failed"
    assert results.read(tmp_path / "run")["status"] == "failed"


def test_same_seed_same_student_whether_the_teacher_was_cached_or_not(make_cfg, tmp_path):
    cold = pipeline.run(make_cfg("seed=3", out=tmp_path / "cold", own_cache=True))
    warm = pipeline.run(make_cfg("seed=3", out=tmp_path / "warm", own_cache=True))
    pipeline.run(make_cfg("seed=4", out=tmp_path / "other"))
    assert (cold["teacher"]["cache"], warm["teacher"]["cache"]) == ("miss", "hit")
    assert cold["student"]["test"] == warm["student"]["test"]
    a = torch.load(tmp_path / "cold" / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "warm" / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    c = torch.load(tmp_path / "other" / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not all(torch.equal(a[key], c[key]) for key in a)


def test_a_failed_run_from_the_command_line_is_one_line_and_a_failed_result(tmp_path, teacher_cache):
    from tests.conftest import FAST, run_train

    result = run_train(
        [
            *FAST,
            "optim.optimizer.lr=1e30",
            "distill=none",
            "data.normalize=false",
            f"hydra.run.dir={tmp_path / 'run'}",
            f"paths.cache_dir={teacher_cache}",
        ]
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "FloatingPointError" in result.stderr and "Traceback" not in result.stderr
    assert results.read(tmp_path / "run")["status"] == "failed"


def test_the_teacher_does_not_depend_on_the_run_seed(make_cfg, tmp_path):
    a = pipeline.prepare(make_cfg("seed=0"))
    b = pipeline.prepare(make_cfg("seed=1"))
    c = pipeline.prepare(make_cfg("seed=0", "teacher.recipe.seed=1"))
    first = next(iter(a.teacher.state_dict()))
    assert torch.equal(a.teacher.state_dict()[first], b.teacher.state_dict()[first])
    assert not torch.equal(a.teacher.state_dict()[first], c.teacher.state_dict()[first])
    assert not torch.equal(a.student.state_dict()["features.1.weight"], b.student.state_dict()["features.1.weight"])


def test_teacher_only_augmentation_needs_a_datamodule_that_can_switch_it(make_cfg, monkeypatch):
    from distillab.config import ConfigError
    from distillab.data.base import AugmentationSwitch

    cfg = make_cfg("teacher.recipe.augment=true")
    pipeline.prepare(cfg)  # digits (an InMemoryDataModule) has the switch
    monkeypatch.delattr(AugmentationSwitch, "augmentation")
    with pytest.raises(ConfigError, match="teacher.recipe.augment"):
        pipeline.prepare(cfg)
