"""A real multirun from the command line, and two jobs racing for the same missing teacher."""

import csv
import multiprocessing
import time
from pathlib import Path

import pytest
import torch

from distillab import results
from distillab.steps.teacher import cache as teacher_cache
from tests.conftest import FAST, compose_cfg, run_train


def test_multirun_trains_the_teacher_once_and_writes_the_report(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_train(
        [
            "-m",
            "distill=none,kd",
            "seed=0,1",
            *FAST,
            f"hydra.sweep.dir={sweep}",
            f"paths.cache_dir={tmp_path / 'cache'}",
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    records = [results.read(job) for job in sorted(sweep.glob("[0-9]*"))]
    assert len(records) == 4 and all(r["status"] == "ok" for r in records)
    assert sorted(r["teacher"]["cache"] for r in records) == ["hit", "hit", "hit", "miss"]
    assert len({r["teacher"]["cache_key"] for r in records}) == 1
    assert len({r["group"] for r in records}) == 2 and all("distill=" in r["group"] for r in records)
    logs = "".join((job / "train.log").read_text() for job in sweep.glob("[0-9]*"))
    assert logs.count("teacher cache miss") == 1 and logs.count("teacher cache hit") == 3
    for name in ("summary.csv", "summary.md", "accuracy_vs_params.png"):
        assert (sweep / name).stat().st_size > 0, name
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    students = [row for row in rows if row["role"] == "student"]
    assert {row["setting"] for row in students} == {"distill=none", "distill=kd"}
    assert all(row["n_seeds"] == "2" for row in students)
    assert any(row["role"] == "teacher" for row in rows)
    # the two methods, paired by seed, in the comparisons the callback wrote
    assert {r["split_seed"] for r in records} == {0} and {r["test_samples"] for r in records} == {270}
    assert len({r["setting_hashes"]["without_distill"] for r in records}) == 1
    (compared,) = list(csv.DictReader((sweep / "comparisons.csv").open()))
    assert (compared["baseline"], compared["candidate"], compared["n_pairs"]) == ("distill=none", "distill=kd", "2")
    by_setting = {row["setting"]: float(row["acc_mean"]) for row in students}
    assert float(compared["diff_mean"]) == pytest.approx(by_setting["distill=kd"] - by_setting["distill=none"])
    assert (sweep / "comparisons.md").read_text().count("one sample is 0.0037 accuracy") == 1
    assert (sweep / "comparisons_forest.png").stat().st_size > 0


def _obtain(out: str, cache: str, marker: str) -> str:
    cfg = compose_cfg(FAST, Path(out), Path(cache))

    def slow_train(model, staging, single_process):
        with open(marker, "a") as handle:
            handle.write("trained\n")
        time.sleep(1.0)  # the other job arrives while this one trains
        return {"val": {"acc": 1.0}}

    identity = teacher_cache.identity(cfg.data, cfg.teacher, cfg.trainer.precision)
    return teacher_cache.obtain(torch.nn.Linear(64, 10), identity, cfg.paths.cache_dir, cfg.trainer, slow_train).cache


def test_two_jobs_missing_the_same_teacher_train_it_once(tmp_path):
    marker = tmp_path / "trained.txt"
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        caches = pool.starmap(
            _obtain, [(str(tmp_path / f"job{i}"), str(tmp_path / "cache"), str(marker)) for i in range(2)]
        )
    assert sorted(caches) == ["hit", "miss"]
    assert marker.read_text().count("trained") == 1
