"""The same sweep under the basic and the stacked launcher: every job's folder, results and
learning curves agree; a second run resumes; what cannot stack says why and runs as usual."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from distillab import results
from tests.conftest import FAST, run_train

# 8 jobs: 2 students × 2 λ × 2 seeds. Stacked kernels (a grouped convolution for M students) round
# differently from one student's; a max-pool or a ReLU near a tie then routes a gradient elsewhere,
# and the runs drift apart (in parameters by about 1e-3 after 20 CNN steps). The cosine schedule
# settles both before the checkpoint is chosen, as a real recipe does.
SWEEP = ["student=mlp,cnn", "distill.lam=0.1,0.9", "seed=0,1", "optim/scheduler=cosine", "trainer.max_epochs=6"]
ONE_IMAGE = 1 / 270  # digits: 270 test images


def _sweep(folder: Path, cache: Path, *extra: str) -> str:
    result = run_train(["-m", *FAST, *SWEEP, f"hydra.sweep.dir={folder}", f"paths.cache_dir={cache}", *extra])
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def _curve(job: Path) -> list[float]:
    with open(job / "csv" / "student" / "metrics.csv") as handle:
        return [float(row["val/acc"]) for row in csv.DictReader(handle) if row["val/acc"]]


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("stacked")
    cache = root / "cache"
    basic = _sweep(root / "basic", cache)
    # groups of at most 3: each student's 4 jobs make a group of 3 and a job alone; 2 groups at once
    stacked_log = _sweep(
        root / "stacked", cache, "hydra/launcher=stacked", "hydra.launcher.max_stack=3", "hydra.launcher.n_jobs=2"
    )
    return {"root": root, "cache": cache, "basic": basic, "stacked": stacked_log}


def test_every_job_agrees_with_its_basic_run(sweeps) -> None:
    """The launcher promises the basic job's fit up to floating-point rounding: every epoch's
    validation accuracy within two images, and the checkpoint chosen by the same rule (the first
    epoch of the job's own best validation accuracy). Where the curve is flat, rounding may move
    that epoch (another CPU's kernels round differently), so the chosen epochs are not compared."""
    root = sweeps["root"]
    stacked_jobs = 0
    for k in range(8):
        basic, stacked = results.read(root / "basic" / str(k)), results.read(root / "stacked" / str(k))
        assert stacked["status"] == "ok" and stacked["overrides"] == basic["overrides"]
        curves = _curve(root / "basic" / str(k)), _curve(root / "stacked" / str(k))
        assert len(curves[0]) == len(curves[1]) == 6
        assert max(abs(a - b) for a, b in zip(*curves)) <= 2 * ONE_IMAGE + 1e-9
        for record, curve in zip((basic, stacked), curves):
            assert record["student"]["best_epoch"] == curve.index(max(curve))
        if basic["student"]["best_epoch"] == stacked["student"]["best_epoch"]:  # the same epoch's student
            assert abs(stacked["student"]["test"]["acc"] - basic["student"]["test"]["acc"]) <= 2 * ONE_IMAGE + 1e-9
        assert stacked["config_hash"] == basic["config_hash"]
        extra = set(stacked) - set(basic)
        if stacked.get("launcher") == "stacked":
            stacked_jobs += 1
            assert extra == {"launcher", "stack"} and stacked["stack"]["size"] == 3
            assert stacked["student"]["params"] == basic["student"]["params"]
            ckpt = torch.load(root / "stacked" / str(k) / "checkpoints" / "best.ckpt", weights_only=True)
            assert ckpt["epoch"] == stacked["student"]["best_epoch"]
            assert set(ckpt["state_dict"]) == set(
                torch.load(root / "basic" / str(k) / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
            )
        else:
            assert extra == set()  # the job alone ran as under the basic launcher
    assert stacked_jobs == 6
    groups = {results.read(root / "stacked" / str(k)).get("stack", {}).get("group") for k in range(8)}
    assert len(groups - {None}) == 2
    assert (root / "stacked" / "summary.md").stat().st_size > 0


def test_the_log_names_each_group_and_what_differs(sweeps) -> None:
    log = sweeps["stacked"]
    assert log.count("trains 3 jobs together") == 2
    assert "seed, distill.lam differ" in log


def test_a_second_run_skips_every_complete_job(sweeps) -> None:
    root = sweeps["root"]
    before = {k: (root / "stacked" / str(k) / "results.json").stat().st_mtime_ns for k in range(8)}
    (root / "stacked" / "7" / "results.json").unlink()  # as if job 7 had been killed
    log = _sweep(root / "stacked", sweeps["cache"], "hydra/launcher=stacked", "hydra.launcher.max_stack=3")
    assert "jobs together" not in log and log.count("skip:") == 7, log[-3000:]
    assert "job #7 runs on its own" in log
    after = {k: (root / "stacked" / str(k) / "results.json").stat().st_mtime_ns for k in range(7)}
    assert after == {k: before[k] for k in range(7)}
    assert results.read(root / "stacked" / "7")["status"] == "ok"


@pytest.mark.parametrize("key", ["max_stack", "n_jobs"])
def test_a_launcher_count_below_one_is_one_line(tmp_path: Path, key: str) -> None:
    result = run_train(
        ["-m", "hydra/launcher=stacked", f"hydra.launcher.{key}=0", "seed=0,1", f"hydra.sweep.dir={tmp_path / 's'}"]
    )
    assert (
        result.returncode == 2
        and result.stderr.strip() == f"error: hydra.launcher.{key}=0 is not allowed: an integer >= 1"
    )
    assert not list((tmp_path / "s").glob("*/results.json"))
