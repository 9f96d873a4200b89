"""Parallel launchers: the launcher configs compose, a submitit_local sweep really runs, and the
per-job resources of a joblib sweep (threads, GPU slots) are placed right, without any GPU."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import joblib
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from joblib.externals.loky import get_reusable_executor
from omegaconf import OmegaConf

from distillab import pipeline, results, slots
from distillab.config import ConfigError
from tests import slot_jobs
from tests.conftest import CONF, FAST, compose_cfg, compose_hydra, run_train

PLUGIN_LAUNCHERS = {"basic", "joblib", "submitit_local", "submitit_slurm"}


@pytest.fixture(autouse=True)
def no_slot_held(monkeypatch):
    """Each test starts and ends with no slot held, CUDA_VISIBLE_DEVICES and torch threads as they were."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    threads = torch.get_num_threads()
    slots.release()
    yield
    slots.release()
    torch.set_num_threads(threads)


# -- the arithmetic ---------------------------------------------------------------------------
@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_slots_partition_the_gpus_into_disjoint_consecutive_groups(gpus: int) -> None:
    for per_job in (1, 2, 4, 8):
        count = slots.slot_count(gpus, per_job)
        assert count == gpus // per_job
        groups = [slots.slot_devices(k, gpus, per_job) for k in range(count)]
        used = [gpu for group in groups for gpu in group]
        assert all(len(group) == per_job for group in groups)
        assert len(used) == len(set(used)) == count * per_job and all(0 <= gpu < gpus for gpu in used)
        assert all(group == list(range(group[0], group[0] + per_job)) for group in groups)
        with pytest.raises(ValueError):
            slots.slot_devices(count, gpus, per_job)


def test_slot_examples() -> None:
    assert slots.slot_devices(0, 1, 1) == [0]
    assert slots.slot_devices(1, 2, 1) == [1]
    assert slots.slot_devices(1, 4, 2) == [2, 3]
    assert slots.slot_devices(3, 8, 2) == [6, 7]
    assert slots.slot_devices(1, 8, 4) == [4, 5, 6, 7]
    assert slots.slot_count(8, 3) == 2 and slots.slot_devices(1, 8, 3) == [3, 4, 5]  # GPUs 6, 7 stay idle
    assert slots.slot_count(1, 2) == 0
    with pytest.raises(ValueError):
        slots.slot_count(4, 0)


def test_a_slot_of_a_restricted_machine_names_the_gpus_cuda_was_given() -> None:
    ids = slots.visible_ids("4,5,6,7", 4)
    assert [ids[i] for i in slots.slot_devices(1, 4, 2)] == ["6", "7"]
    assert slots.visible_ids(None, 3) == ["0", "1", "2"]
    assert slots.visible_ids("GPU-aa, GPU-bb", 2) == ["GPU-aa", "GPU-bb"]


@pytest.mark.parametrize(
    ("n_jobs", "cores", "jobs", "threads"),
    [
        (1, 2, 1, 2),
        (2, 2, 2, 1),
        (-1, 2, 2, 1),
        (4, 2, 4, 1),
        (2, 8, 2, 4),
        (3, 8, 3, 2),
        (-1, 8, 8, 1),
        (-2, 8, 7, 1),
        (-4, 8, 5, 1),
        (-9, 8, 1, 8),
        (4, 16, 4, 4),
    ],
)
def test_threads_per_job_share_the_cores_between_the_jobs_at_once(n_jobs, cores, jobs, threads) -> None:
    assert slots.parallel_jobs(n_jobs, cores) == jobs
    assert slots.thread_count(cores, jobs) == threads


def test_n_jobs_zero_is_one_line_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^hydra\.launcher\.n_jobs=0 is not allowed"):
        slots.parallel_jobs(0, 4)


@pytest.mark.parametrize(
    ("trainer", "gpus", "per_job"),
    [
        ({"accelerator": "auto", "devices": 1}, 4, 1),
        ({"accelerator": "gpu", "devices": 2}, 4, 2),
        ({"accelerator": "cuda", "devices": "2"}, 4, 2),
        ({"accelerator": "auto", "devices": "auto"}, 4, 4),  # trainer=ddp: every GPU
        ({"accelerator": "auto", "devices": -1}, 8, 8),
        ({"accelerator": "auto", "devices": 1}, 0, None),  # no GPU
        ({"accelerator": "cpu", "devices": 2}, 4, None),  # CPU processes
        ({"accelerator": "auto", "devices": [0, 2]}, 4, None),  # GPU ids the user pinned
        ({"accelerator": "auto", "devices": "0,2"}, 4, None),
    ],
)
def test_gpus_per_job_come_from_the_trainer(trainer, gpus, per_job) -> None:
    assert slots.gpus_per_job(OmegaConf.create(trainer), gpus) == per_job


# -- claiming slots: threads and real processes -------------------------------------------------
def test_threads_claim_distinct_slots_and_one_waits_for_a_slot_to_free(tmp_path: Path) -> None:
    start = threading.Barrier(4)

    def try_claim(_: int):
        start.wait()
        try:
            return slots.claim(tmp_path, 2, wait_s=0)
        except RuntimeError as error:
            return error

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(try_claim, range(4)))
    claimed = [o for o in outcomes if isinstance(o, tuple)]
    assert sorted(slot for slot, _ in claimed) == [0, 1]
    assert sum(isinstance(o, RuntimeError) for o in outcomes) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slot-0.lock", "slot-1.lock"]

    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(slots.claim, tmp_path, 2, 10.0, 0.05)
        time.sleep(0.5)
        assert not waiting.done()  # both slots are taken
        dict(claimed)[1].release()
        slot, lock = waiting.result(timeout=10)
    assert slot == 1
    lock.release()
    dict(claimed)[0].release()


@pytest.mark.parametrize(("gpus", "per_job", "visible"), [(2, 1, {"0", "1"}), (4, 2, {"0,1", "2,3"})])
def test_loky_workers_keep_one_slot_each_and_reuse_it_job_after_job(tmp_path: Path, gpus, per_job, visible) -> None:
    # loky, the process pool under joblib.Parallel: 2 worker processes, reused from job to job
    executor = get_reusable_executor(max_workers=2, reuse=False)
    try:
        runs = list(executor.map(slot_jobs.hold_gpus, *zip(*[(str(tmp_path), gpus, per_job, 2, 0.3)] * 6)))
    finally:
        executor.shutdown(wait=True)
    by_pid: dict[int, set] = {}
    for run in runs:
        by_pid.setdefault(run["pid"], set()).add((run["slot"], run["visible"]))
    assert all(len(claims) == 1 for claims in by_pid.values())  # a worker never changes GPUs
    assert {run["visible"] for run in runs} <= visible
    assert len({run["slot"] for run in runs}) == len(by_pid)  # two workers never share a slot
    for slot in {run["slot"] for run in runs}:  # and a slot never has two jobs at once
        spans = sorted((run["began"], run["ended"]) for run in runs if run["slot"] == slot)
        assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:]))
    # the workers have exited, and with them their locks: every slot is free again
    held = [slots.claim(tmp_path, gpus // per_job, wait_s=0) for _ in range(gpus // per_job)]
    assert sorted(slot for slot, _ in held) == list(range(gpus // per_job))
    for _, lock in held:
        lock.release()


def test_a_job_in_a_loky_worker_can_start_processes_of_its_own() -> None:
    executor = get_reusable_executor(max_workers=1, reuse=False)
    try:
        unprepared = executor.submit(slot_jobs.start_a_child, False).result()
        prepared = executor.submit(slot_jobs.start_a_child, True).result()
    finally:
        executor.shutdown(wait=True)
    assert (unprepared, prepared) == (1, 0)  # the child of an unprepared worker dies at start-up


# -- the hook of pipeline.run -------------------------------------------------------------------
def joblib_hydra(tmp_path: Path, n_jobs: int):
    return compose_hydra(
        "hydra/launcher=joblib", f"hydra.launcher.n_jobs={n_jobs}", f"hydra.sweep.dir={tmp_path}"
    ).hydra


def job_cfg(**trainer):
    return OmegaConf.create({"num_threads": None, "trainer": {"accelerator": "auto", "devices": 1, **trainer}})


def test_a_joblib_job_takes_its_share_of_the_cores_and_a_gpu_slot(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    claim = _configure(job_cfg(), joblib_hydra(tmp_path, 2), gpus=4, cores=8)
    assert torch.get_num_threads() == 4
    assert claim is not None and claim.slot == 0 and os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    assert (tmp_path / ".gpu_slots" / "slot-0.lock").exists()
    # the next job of this worker: same slot, counted from the machine's GPUs, not the pinned one
    again = _configure(job_cfg(), joblib_hydra(tmp_path, 2), cores=8)
    assert again is claim and os.environ["CUDA_VISIBLE_DEVICES"] == "0"


def test_num_threads_wins_and_two_gpus_per_job_pin_a_pair(tmp_path: Path) -> None:
    torch.set_num_threads(3)
    cfg = job_cfg(devices=2)
    cfg.num_threads = 1
    claim = _configure(cfg, joblib_hydra(tmp_path, 2), gpus=4, cores=8)
    assert torch.get_num_threads() == 3  # left for pipeline.run to set from num_threads
    assert claim is not None and os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_on_a_restricted_machine_a_slot_pins_the_gpus_it_was_given(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    held = slots.claim(tmp_path / ".gpu_slots", 2, wait_s=0)  # another worker has slot 0
    claim = _configure(job_cfg(devices=2), joblib_hydra(tmp_path, 2), gpus=4, cores=8)
    assert claim is not None and claim.slot == 1 and os.environ["CUDA_VISIBLE_DEVICES"] == "6,7"
    slots.release()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    held[1].release()


def test_a_worker_moves_to_a_wider_slot_only_while_cuda_is_not_started(tmp_path: Path, monkeypatch) -> None:
    _configure(job_cfg(devices=1), joblib_hydra(tmp_path, 2), gpus=4, cores=8)
    wider = _configure(job_cfg(devices=2), joblib_hydra(tmp_path, 2), cores=8)
    assert wider is not None and wider.per_job == 2 and os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(ConfigError, match=r"^trainer\.devices=1 is not allowed: .* runs CUDA on GPUs 0,1"):
        _configure(job_cfg(devices=1), joblib_hydra(tmp_path, 2), cores=8)
    assert slots.held() is wider


def test_more_parallel_jobs_than_gpu_slots_is_one_line_before_any_claim(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        _configure(job_cfg(devices=2), joblib_hydra(tmp_path, 3), gpus=4, cores=8)
    message = str(error.value)
    assert "\n" not in message and message.startswith("hydra.launcher.n_jobs=3 is not allowed")
    assert "2 GPU slot(s)" in message and "hydra.launcher.n_jobs=2 or fewer" in message
    with pytest.raises(ConfigError, match=r"n_jobs=-1 is not allowed: it runs 8 jobs at once .* 1 GPU slot"):
        _configure(job_cfg(devices="auto"), joblib_hydra(tmp_path, -1), gpus=2, cores=8)
    with pytest.raises(ConfigError, match=r"^trainer\.devices=4 is not allowed: this machine has 2 GPU"):
        _configure(job_cfg(devices=4), joblib_hydra(tmp_path, 1), gpus=2, cores=8)
    assert slots.held() is None and "CUDA_VISIBLE_DEVICES" not in os.environ
    assert not (tmp_path / ".gpu_slots").exists()


def test_nothing_is_placed_without_joblib_or_without_a_gpu(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    basic = compose_hydra(f"hydra.sweep.dir={tmp_path}").hydra
    assert basic.launcher._target_.endswith("BasicLauncher")  # the default launcher
    assert _configure(job_cfg(), basic, gpus=4, cores=8) is None
    assert _configure(job_cfg(), None, gpus=4, cores=8) is None  # not under Hydra at all
    assert torch.get_num_threads() == 2 and "CUDA_VISIBLE_DEVICES" not in os.environ
    assert _configure(job_cfg(), joblib_hydra(tmp_path, 2), gpus=0, cores=8) is None
    assert _configure(job_cfg(accelerator="cpu"), joblib_hydra(tmp_path, 2), gpus=4, cores=8) is None
    assert torch.get_num_threads() == 4  # threads are still shared out
    assert "CUDA_VISIBLE_DEVICES" not in os.environ and not (tmp_path / ".gpu_slots").exists()


def test_pipeline_run_checks_the_slots_before_anything_is_written(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(slots, "visible_gpu_count", lambda: 2)  # a 2-GPU machine
    cfg = compose_cfg(
        ["hydra/launcher=joblib", "hydra.launcher.n_jobs=4", f"hydra.sweep.dir={tmp_path}", *FAST], tmp_path / "run"
    )
    with pytest.raises(ConfigError, match=r"hydra\.launcher\.n_jobs=4 is not allowed: .* 2 GPU slot"):
        pipeline.run(cfg)
    assert not (tmp_path / "run").exists() and "CUDA_VISIBLE_DEVICES" not in os.environ
    GlobalHydra.instance().clear()


# -- launcher configs ---------------------------------------------------------------------------
def test_distillab_launcher_presets_extend_the_plugins_configs_without_shadowing_them() -> None:
    # a file named like a plugin's config would be merged into it by Hydra's deprecated
    # schema matching (with a warning), so distillab's own presets have names of their own
    ours = {path.stem for path in (CONF / "hydra" / "launcher").glob("*.yaml")}
    assert ours and not ours & PLUGIN_LAUNCHERS
    slurm = compose_hydra("hydra/launcher=slurm").hydra.launcher
    plugin = compose_hydra("hydra/launcher=submitit_slurm").hydra.launcher
    assert slurm._target_ == plugin._target_ and slurm._target_.endswith("SlurmLauncher")
    assert set(plugin) <= set(slurm)  # every key of the plugin's config is there to override
    assert (slurm.gpus_per_node, slurm.tasks_per_node, plugin.gpus_per_node) == (1, 1, None)
    assert slurm.timeout_min > plugin.timeout_min


@pytest.mark.parametrize(
    ("overrides", "target", "expected"),
    [
        (["hydra/launcher=joblib", "hydra.launcher.n_jobs=3"], "JoblibLauncher", {"n_jobs": 3}),
        (
            ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", "hydra.launcher.cpus_per_task=2"],
            "LocalLauncher",
            {"timeout_min": 5, "cpus_per_task": 2},
        ),
        (["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"], "SlurmLauncher", {"partition": "gpu"}),
        (
            [
                "hydra/launcher=slurm",
                "hydra.launcher.partition=gpu",
                "hydra.launcher.timeout_min=30",
                "hydra.launcher.gpus_per_node=2",
                "hydra.launcher.cpus_per_task=16",
                "hydra.launcher.array_parallelism=4",
            ],
            "SlurmLauncher",
            {"partition": "gpu", "timeout_min": 30, "gpus_per_node": 2, "cpus_per_task": 16, "array_parallelism": 4},
        ),
    ],
)
def test_each_launcher_composes_and_takes_command_line_values(overrides, target, expected) -> None:
    launcher = compose_hydra(*overrides).hydra.launcher
    assert launcher._target_.endswith(target)
    assert {key: launcher[key] for key in expected} == expected


def test_a_misspelled_or_mistyped_launcher_value_fails_at_composition() -> None:
    with pytest.raises(Exception, match="timeout_min"):
        compose_hydra("hydra/launcher=slurm", "hydra.launcher.timeout_min=soon")
    with pytest.raises(Exception, match="n_job"):
        compose_hydra("hydra/launcher=joblib", "hydra.launcher.n_job=2")


def test_submitit_local_runs_a_two_job_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_train(
        [
            "-m",
            "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=10",
            "seed=0,1",
            *FAST,
            "trainer.max_epochs=2",
            "num_threads=1",
            f"hydra.sweep.dir={sweep}",
            f"paths.cache_dir={tmp_path / 'cache'}",
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    records = [results.read(job) for job in sorted(path.parent for path in sweep.glob("*/results.json"))]
    assert len(records) == 2 and all(r["status"] == "ok" for r in records)
    assert sorted(r["seed"] for r in records) == [0, 1]
    assert sorted(r["teacher"]["cache"] for r in records) == ["hit", "miss"]  # one teacher for both
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2  # each ran as a submitit job
    assert (sweep / "summary.md").stat().st_size > 0


def test_a_joblib_sweep_gives_each_job_its_share_of_the_cores(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_train(
        [
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "seed=0,1",
            *FAST,
            "trainer.max_epochs=2",
            "num_threads=null",
            f"hydra.sweep.dir={sweep}",
            f"paths.cache_dir={tmp_path / 'cache'}",
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = sorted(path.parent for path in sweep.glob("*/results.json"))
    assert len(jobs) == 2 and all(results.read(job)["status"] == "ok" for job in jobs)
    threads = slots.thread_count(joblib.cpu_count(), 2)
    for job in jobs:  # the hook ran inside each joblib worker, and saw the launcher's n_jobs
        assert (
            f"2 jobs at once (hydra.launcher.n_jobs=2) on {joblib.cpu_count()} cores: {threads} torch thread(s)"
            in (job / "train.log").read_text()
        )
    assert not (sweep / ".gpu_slots").exists()  # no GPU here: nothing to claim


def _configure(cfg, *args, **kwargs):
    return slots.configure_job(cfg.trainer, cfg.get("num_threads"), *args, **kwargs)
