"""Data-parallel training of one job (``trainer=ddp``: ddp_spawn, gloo on the CPU here), and a
teacher cache that stays safe when a launcher runs the whole script once per device."""

from __future__ import annotations

import csv
import math
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch

from distillab import conf, results
from distillab.steps.teacher import cache as teachers
from tests.conftest import FAST, ROOT, compose_cfg, run_train

DDP = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]


# -- which process trains a missing teacher -------------------------------------------------------
@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, (0, 1)),
        ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, (3, 4)),  # torchrun
        ({"RANK": "0", "WORLD_SIZE": "1"}, (0, 1)),  # torchrun with one process: not distributed
        ({"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0"}, (2, 4)),  # srun, one task per GPU
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, (0, 1)),  # one task that spawns its own workers
        ({"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "2"}, (1, 2)),  # Lightning's ddp launcher
        ({"LOCAL_RANK": "0", "NODE_RANK": "1", "WORLD_SIZE": "4"}, (4, 4)),  # its second node: not rank 0
    ],
)
def test_launch_rank_reads_the_launchers_variables(env, expected):
    assert teachers.launch_rank(env) == expected


def _obtain_as_rank(rank: int, out: str, cache: str, marker: str) -> tuple[str, dict, float]:
    """One rank of a torchrun-style job (each rank runs the whole script) asking for the teacher."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", DISTILLAB_TEACHER_WAIT_S="60")
    teachers.POLL_S = 0.1
    if rank == 0:
        time.sleep(1.0)  # rank 1 asks first: it must wait for rank 0 rather than train the teacher itself
    cfg = compose_cfg([*FAST, *DDP, "trainer.strategy=ddp"], Path(out), Path(cache))
    seen: dict = {}

    def train(model: torch.nn.Module, staging: Path, single_process: bool) -> dict:
        seen.update(single_process=single_process)
        with open(marker, "a") as handle:
            handle.write(f"trained by rank {rank}\n")
        time.sleep(0.5)
        with torch.no_grad():
            model.weight.fill_(0.25)
        return {"val": {"acc": 1.0}}

    torch.manual_seed(rank)
    model = torch.nn.Linear(64, 10)
    cache_state = _obtain_teacher(cfg, model, train).cache
    return cache_state, seen, float(model.weight.detach().sum())


def test_rank_zero_trains_a_missing_teacher_alone_and_the_other_rank_waits(tmp_path):
    marker = tmp_path / "trained.txt"
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        answers = pool.starmap(
            _obtain_as_rank,
            [(rank, str(tmp_path / f"rank{rank}"), str(tmp_path / "cache"), str(marker)) for rank in (1, 0)],
        )
    (cache1, seen1, weights1), (cache0, seen0, weights0) = answers
    assert marker.read_text() == "trained by rank 0\n"
    assert (cache0, cache1) == ("miss", "hit")
    # rank 0 trained on one device, without the others: they are busy waiting, not joining a process group
    assert seen0 == {"single_process": True} and seen1 == {}
    assert weights0 == weights1 == pytest.approx(0.25 * 640)


def test_a_rank_that_waits_in_vain_fails_with_one_line(make_cfg, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(teachers.WAIT_ENV, "0.3")
    monkeypatch.setattr(teachers, "POLL_S", 0.05)
    cfg = make_cfg(own_cache=True)

    def train(model, staging, single_process):
        raise AssertionError("a rank other than 0 must not train the teacher")

    with pytest.raises(TimeoutError) as error:
        _obtain_teacher(cfg, torch.nn.Linear(64, 10), train)
    message = str(error.value)
    assert "\n" not in message and "rank 1 of 2" in message and "paths.cache_dir" in message


@pytest.mark.parametrize(
    "overrides, single",
    [
        ([], False),  # one device: left as it is
        (DDP, False),  # spawned workers: the teacher trains with them
        ([*DDP, "trainer.strategy=ddp"], True),  # would re-run the script: one device, this process
    ],
)
def test_the_teacher_trains_on_one_device_only_when_the_strategy_reruns_the_script(make_cfg, overrides, single):
    cfg = make_cfg(*overrides, own_cache=True)
    before = dict(cfg.trainer)
    seen = {}

    def train(model, staging, single_process):
        seen.update(single_process=single_process)
        return {"val": {"acc": 1.0}}

    assert _obtain_teacher(cfg, torch.nn.Linear(64, 10), train).cache == "miss"
    assert seen == {"single_process": single}
    assert dict(cfg.trainer) == before  # the config is never edited
    if single:  # the Trainer built for it runs in one process on one device
        from distillab import training

        trainer = training.make_trainer(
            cfg.trainer, None, [], None, 1, root_dir=Path(cfg.paths.output_dir), single_process=True
        )
        assert trainer.num_devices == 1 and trainer.world_size == 1


def _obtain_teacher(cfg, model, train):
    identity = teachers.identity(cfg.data, cfg.teacher, cfg.trainer.precision)
    return teachers.obtain(model, identity, cfg.paths.cache_dir, cfg.trainer, train)


def test_training_batches_are_sharded_per_rank_and_evaluation_batches_are_not():
    class Rank:
        def __init__(self, rank: int) -> None:
            self.global_rank, self.world_size = rank, 2

    data = conf.build("data", "digits", batch_size=64, eval_batch_size=100)
    data.setup()
    seen = []
    for rank in (0, 1):
        data.trainer = Rank(rank)
        seen.append(torch.cat([index for _, _, index in data.train_dataloader()]))
        for split in ("val", "test"):
            loader = getattr(data, f"{split}_dataloader")()
            assert sum(len(y) for _, y, _ in loader) == data.split_sizes[split]
    n_train = data.split_sizes["train"]
    assert [len(s) for s in seen] == [math.ceil(n_train / 2)] * 2
    assert set(seen[0].tolist()) | set(seen[1].tolist()) == set(range(n_train))


# -- real runs: python train.py trainer=ddp trainer.devices=2 ----------------------------------------
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    started = time.perf_counter()
    result = run_train([*DDP, *FAST, f"hydra.run.dir={root / 'run'}", f"paths.cache_dir={root / 'cache'}"])
    return root, result, time.perf_counter() - started


def _members(output: str) -> list[str]:
    return [line.split("MEMBER: ")[1].strip() for line in output.splitlines() if "MEMBER: " in line]


def test_a_ddp_run_trains_teacher_and_student_on_two_processes(ddp_run):
    root, result, seconds = ddp_run
    assert result.returncode == 0, result.stderr[-3000:]
    run = root / "run"
    record = results.read(run)
    assert record["status"] == "ok" and record["teacher"]["cache"] == "miss"
    assert 0.5 < record["teacher"]["test"]["acc"] <= 1 and 0.1 < record["student"]["test"]["acc"] <= 1
    # teacher and student were each fitted by two processes (Lightning's line per rank)
    assert sorted(_members(result.stdout + result.stderr)) == ["1/2", "1/2", "2/2", "2/2"]
    entries = [p.name for p in (root / "cache").iterdir() if not p.name.endswith(".lock")]
    assert entries == [f"cnn-digits-{record['teacher']['cache_key']}"]  # cached once, no staging left over
    log = (run / "train.log").read_text()
    assert log.count("teacher cache miss") == 1 and log.count("results written") == 1
    assert [p.name for p in run.rglob("results.json")] == ["results.json"]
    # each rank took half of every epoch: 629 samples in 10 batches of 64 (one process takes 20)
    rows = list(csv.DictReader((run / "csv" / "student" / "metrics.csv").open()))
    assert {int(row["step"]) for row in rows if row["epoch"] == "0"} == {9}
    # the main process holds the best-on-validation checkpoint the workers chose
    val = {int(row["epoch"]): float(row["val/acc"]) for row in rows if row["val/acc"]}
    best = max(val, key=lambda epoch: (val[epoch], -epoch))
    assert record["student"]["best_epoch"] == best
    assert record["student"]["val"]["acc"] == pytest.approx(val[best], abs=1e-5)
    print(f"ddp run: {seconds:.1f} s")


@pytest.mark.slow  # ~20 s more: two more spawned fits
def test_a_ddp_sweep_runs_each_job_once(ddp_run, tmp_path):
    root, first, _ = ddp_run
    assert first.returncode == 0, first.stderr[-3000:]
    sweep = tmp_path / "sweep"
    result = run_train(
        ["-m", "seed=0,1", *DDP, *FAST, f"hydra.sweep.dir={sweep}", f"paths.cache_dir={root / 'cache'}"], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    # the spawned workers run `fit` only: one sweep of two jobs, not one more per extra rank
    assert output.count("Launching 2 jobs locally") == 1
    assert sorted(_members(output)) == ["1/2", "1/2", "2/2", "2/2"]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1"] and not (tmp_path / "outputs").exists()
    records = [results.read(sweep / job) for job in jobs]
    assert [r["status"] for r in records] == ["ok", "ok"] and [r["seed"] for r in records] == [0, 1]
    assert [r["teacher"]["cache"] for r in records] == ["hit", "hit"]  # the teacher of the first run
    assert (sweep / "summary.csv").is_file()


def test_a_plain_datamodule_with_cached_teacher_outputs_trains_on_two_processes(tmp_path):
    """The indexed copy of a plain datamodule's training loader (cached teacher outputs) is sharded
    across the ranks like any loader: each takes half of every epoch."""
    example = ROOT / "examples" / "my_datamodule"
    result = run_train(
        [
            "--config-dir",
            str(example / "conf"),
            "data=my_data",
            *DDP,
            *FAST,
            f"hydra.run.dir={tmp_path / 'run'}",
            f"paths.cache_dir={tmp_path / 'cache'}",
        ],
        cwd=tmp_path,
        env={"PYTHONPATH": os.pathsep.join([str(example), str(ROOT / "src")])},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "teacher outputs: cached" in log and "its batches get sample indices" in log
    record = results.read(tmp_path / "run")
    assert record["teacher"]["outputs"] == "cached" and record["status"] == "ok"
    # 420 training samples in batches of 32: 14 batches an epoch in one process, 7 on each of two
    rows = list(csv.DictReader((tmp_path / "run" / "csv" / "student" / "metrics.csv").open()))
    assert {int(row["step"]) for row in rows if row["epoch"] == "0" and row.get("train/loss")} == {6}
