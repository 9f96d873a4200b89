"""Resumable sweeps: finished jobs are skipped, missing and failed ones run, failures never stop a sweep."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from distillab import cli, pipeline, report, results
from distillab.config import ConfigError
from distillab.steps import resume
from tests.conftest import ROOT, compose_cfg, run_train

# tiny digits jobs: the teacher trains for one epoch, once, into a cache shared by this module
TINY = [
    "trainer.max_epochs=3",
    "teacher.recipe.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "logger=csv",
    "num_threads=1",
    "measure.warmup=1",
    "measure.repeats=3",
]
NAN = "optim.optimizer.lr=1e+30"  # the loss becomes NaN in the first epoch: a failed job (as Hydra writes 1e30)


@pytest.fixture(scope="module")
def cache(teacher_cache: Path) -> Path:
    return teacher_cache  # the session's (tests/conftest.py)


def ok_record(cfg, **changes) -> dict:
    """A complete results.json of ``cfg``, as ``pipeline.assemble`` writes it."""
    block = {"arch": "mlp", "params": 10, "test": {"acc": 0.9}, "val": {"acc": 0.8}}
    record = {
        "status": "ok",
        "config_hash": results.config_hash(cfg),
        "group": "(defaults)",
        "overrides": [],
        "seed": 0,
        "dataset": "digits",
        "method": "kd",
        "compress": "none",
        "teacher": {"arch": "cnn", "params": 100, "test": {"acc": 0.95}},
        "student": block,
        "ratios": {"params": 0.1},
        "timing_s": {"total": 1.0},
        "env": {},
    }
    record.update(changes)
    return record


def read_states(sweep: Path) -> dict[str, tuple[int, bytes]]:
    """Each job's results.json: (mtime in ns, content), to tell a skipped job from a re-run one."""
    return {path.parent.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in sweep.glob("*/results.json")}


def job_folders(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if (p / ".hydra").is_dir()), key=lambda p: int(p.name))


# -- results.completed / previous ----------------------------------------------------------------
def test_completed_needs_a_finished_ok_result_of_the_same_config(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg()
    folder = tmp_path / "job"
    assert results.previous(folder, results.config_hash(cfg)) == (None, None)  # no folder at all
    folder.mkdir()
    assert results.completed(folder, results.config_hash(cfg)) is None and results.previous(
        folder, results.config_hash(cfg)
    ) == (None, None)

    results.write(folder, ok_record(cfg))
    assert results.completed(folder, results.config_hash(cfg)) == ok_record(cfg)

    cases = {
        "failed": ({"status": "failed", "error": "FloatingPointError: loss is nan"}, "it failed: FloatingPointError"),
        "other config": (ok_record(cfg, config_hash="0123456789abcdef"), "another configuration (config 0123"),
        "corrupt": ('{"status": "ok", "config_ha', "cannot be read"),
        "not an object": ("[1, 2]", "not a JSON object"),
        "incomplete": ({"status": "ok", "config_hash": results.config_hash(cfg)}, "is incomplete"),
        "bad status": (ok_record(cfg, status="running"), "is incomplete"),
    }
    for name, (content, why) in cases.items():
        text = content if isinstance(content, str) else json.dumps(content)
        (folder / "results.json").write_text(text)
        record, reason = results.previous(folder, results.config_hash(cfg))
        assert record is None and results.completed(folder, results.config_hash(cfg)) is None, name
        assert why in reason and "\n" not in reason, (name, reason)


def test_the_config_hash_and_group_ignore_the_rerun_switch(make_cfg) -> None:
    assert results.config_hash(make_cfg("rerun=true")) == results.config_hash(make_cfg())
    assert results.config_hash(make_cfg("seed=1")) != results.config_hash(make_cfg())
    assert results.group_of(["rerun=true", "seed=2", "distill=kd"]) == "distill=kd"


# -- resume.start: skip, or start clean -----------------------------------------------------------
def leave_a_killed_attempt(folder: Path) -> None:
    """What a job killed during training leaves: Hydra's files, a checkpoint, half a metrics log."""
    for name in ("checkpoints/best.ckpt", "compressed/model.pt", "csv/student/metrics.csv", ".hydra/config.yaml"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("from the killed attempt")
    (folder / "train.log").write_text("the killed attempt's log\n")


def test_an_unfinished_job_starts_from_a_clean_folder(make_cfg, tmp_path: Path, caplog) -> None:
    cfg = make_cfg()
    folder = Path(cfg.paths.output_dir)
    leave_a_killed_attempt(folder)
    results.write(folder, {"status": "failed", "error": "RuntimeError: boom"})
    with caplog.at_level(logging.INFO, logger="distillab.steps.resume"):
        assert _start(cfg, folder, True) is None
    assert sorted(p.name for p in folder.iterdir()) == [".hydra", "train.log"]
    assert (folder / "train.log").read_text() == "the killed attempt's log\n"
    assert any("rerun:" in m and "it failed: RuntimeError: boom" in m for m in caplog.messages)
    assert any("checkpoints, compressed, csv" in m for m in caplog.messages)


def test_a_logger_folder_outside_the_job_is_left_alone(make_cfg, tmp_path: Path) -> None:
    shared = tmp_path / "shared_logs"
    cfg = make_cfg(f"logger.csv.save_dir={shared}")
    (shared / "csv").mkdir(parents=True)
    assert _start(cfg, Path(cfg.paths.output_dir), True) is None
    assert (shared / "csv").is_dir()


def test_a_complete_job_is_skipped_in_a_sweep_only_and_unless_forced(make_cfg, tmp_path: Path, caplog) -> None:
    cfg = make_cfg()
    folder = Path(cfg.paths.output_dir)
    results.write(folder, ok_record(cfg))
    (folder / "checkpoints").mkdir()
    with caplog.at_level(logging.INFO, logger="distillab.steps.resume"):
        assert _start(cfg, folder, True) == ok_record(cfg)
    assert f"skip: {folder} already complete (config {results.config_hash(cfg)})" in caplog.text
    assert (folder / "checkpoints").is_dir() and (folder / "results.json").is_file()  # a skip touches nothing

    forced = make_cfg("rerun=true")
    assert _start(forced, folder, True) is None
    assert not (folder / "results.json").exists() and not (folder / "checkpoints").exists()
    # a single run (python train.py without -m) into a used folder runs again
    results.write(folder, ok_record(cfg))
    assert _start(cfg, folder, False) is None and not (folder / "results.json").exists()


def test_a_folder_reused_for_another_config_is_run_again_and_says_why(make_cfg, tmp_path: Path, caplog) -> None:
    old = make_cfg("distill.lam=0.9")
    new = make_cfg("distill.lam=0.1")
    folder = Path(new.paths.output_dir)
    results.write(folder, ok_record(old))
    with caplog.at_level(logging.INFO, logger="distillab.steps.resume"):
        assert _start(new, folder, True) is None
    assert "another configuration" in caplog.text and results.config_hash(old) in caplog.text
    assert not (folder / "results.json").exists()


@pytest.mark.parametrize("value", ["maybe", "1"])
def test_rerun_must_be_a_boolean(make_cfg, value: str) -> None:
    cfg = make_cfg(f"rerun={value}")
    with pytest.raises(ConfigError, match=r"^rerun=.* is not allowed: true or false$"):
        pipeline.run(cfg)
    assert not (Path(cfg.paths.output_dir) / "results.json").exists()


def test_pipeline_run_skips_a_finished_sweep_job_and_reruns_over_a_killed_one(
    tmp_path: Path, cache: Path, caplog
) -> None:
    out = tmp_path / "job"
    leave_a_killed_attempt(out)
    cfg = compose_cfg([*TINY, "hydra.mode=MULTIRUN"], out, cache)
    first = pipeline.run(cfg)
    assert first["status"] == "ok"
    # the checkpoint is the new attempt's: a state dict of the student, not the killed attempt's file
    state = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    assert all(key.startswith("model.") for key in state)
    assert "killed attempt" not in (out / "csv" / "student" / "metrics.csv").read_text()
    assert not (out / "compressed").exists()  # compress=none: the killed attempt's model is gone
    before = (out / "results.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="distillab.steps.resume"):
        again = pipeline.run(compose_cfg([*TINY, "hydra.mode=MULTIRUN"], out, cache))
    assert again == first and (out / "results.json").stat().st_mtime_ns == before
    assert f"skip: {out} already complete" in caplog.text


# -- what a sweeper receives ----------------------------------------------------------------------
def test_the_objective_is_a_float_even_for_a_failed_job() -> None:
    assert math.isnan(cli.objective({"status": "failed", "error": "FloatingPointError: nan"}))
    assert cli.objective({"status": "ok", "student": {"val": {"acc": 0.75}}}) == 0.75
    assert cli.objective({"status": "ok", "compressed": {"of": "teacher", "val": {"acc": 0.5}}}) == 0.5


# -- the report lists failed jobs -----------------------------------------------------------------
def test_the_report_lists_failed_and_killed_jobs_with_their_overrides(tmp_path: Path, caplog) -> None:
    sweep = tmp_path / "sweep"
    for job, overrides in (("0", ["seed=0"]), ("1", [NAN, "seed=1"]), ("2", ["seed=2"])):
        (sweep / job / ".hydra").mkdir(parents=True)
        (sweep / job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    error = "FloatingPointError: training loss became nan at epoch 0"
    results.write(sweep / "1", {"status": "failed", "error": error, "overrides": [NAN, "seed=1"], "seed": 1})
    (sweep / "0" / "results.json").write_text(
        json.dumps({"status": "ok", "group": "(defaults)", "seed": 0, "student": {"arch": "mlp", "test": {"acc": 0.9}}})
    )
    with caplog.at_level(logging.INFO, logger="distillab.report"):
        report.SweepReportCallback().on_multirun_end(config=OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    text = (sweep / "summary.md").read_text()
    assert f"- `1` **failed** `{NAN} seed=1`: {error}" in text
    assert "- `2` **missing** `seed=2`: no results.json" in text  # killed: overrides from .hydra
    assert "3 jobs: 1 ok, 1 failed, 1 missing, 0 unreadable." in text
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings[0].startswith("sweep report: 2 of 3 jobs did not finish ok")
    assert f"job 1 failed ({NAN} seed=1): {error}" in warnings[1]
    assert "job 2 missing (seed=2): no results.json" in warnings[2]


# -- the real thing: python train.py -m, killed, resumed --------------------------------------------
def sweep_command(sweep: Path, cache: Path, *overrides: str) -> list[str]:
    return ["-m", *overrides, *TINY, f"hydra.sweep.dir={sweep}", f"paths.cache_dir={cache}"]


def start_and_kill(args: list[str], sweep: Path, output: Path, deadline_s: float = 180.0) -> float:
    """Start ``python train.py ARGS``; SIGKILL its process group once job 0 is complete and job 1
    has written its first checkpoint (so job 1 is killed mid-training). Returns the kill time."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with open(output, "w") as sink:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *args],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    start = time.monotonic()
    try:
        while not ((sweep / "0" / "results.json").exists() and (sweep / "1" / "checkpoints" / "best.ckpt").exists()):
            assert process.poll() is None, f"the sweep ended before it was killed: {output.read_text()[-3000:]}"
            assert time.monotonic() - start < deadline_s, "the sweep made no progress"
            time.sleep(0.02)
    finally:
        with contextlib.suppress(ProcessLookupError):  # already gone: the assertion above says why
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return time.time()


def test_a_killed_sweep_resumes_and_ends_with_one_complete_result_per_job(tmp_path: Path, cache: Path) -> None:
    sweep = tmp_path / "sweep"
    args = sweep_command(sweep, cache, "seed=0,1,2,3")
    tick = time.monotonic()
    killed_at = start_and_kill(args, sweep, tmp_path / "killed.log")
    first_s = time.monotonic() - tick
    done = read_states(sweep)
    assert 1 <= len(done) < 4, sorted(done)
    unfinished = [str(k) for k in range(4) if str(k) not in done]
    leftovers = {
        name: sorted(p.name for p in (sweep / name).iterdir()) for name in unfinished if (sweep / name).is_dir()
    }

    tick = time.monotonic()
    resumed = run_train(args, timeout=300)
    resume_s = time.monotonic() - tick
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    jobs = job_folders(sweep)
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    for job in jobs:
        assert [p.relative_to(job).as_posix() for p in job.rglob("*results.json*")] == ["results.json"]
        record = results.read(job)
        assert record["status"] == "ok" and record["seed"] == int(job.name)  # job k keeps its folder
        results.check(record)
    after = read_states(sweep)
    skipped = sorted(name for name in done if f"skip: {sweep / name} already complete" in log)
    assert skipped == sorted(done)
    assert all(after[name] == done[name] for name in done)  # not touched: same mtime, same bytes
    rerun = sorted(name for name in after if name not in done)
    assert rerun == unfinished and not any(f"skip: {sweep / name} " in log for name in rerun)
    # the job killed in training left a checkpoint; the resumed attempt cleared it and wrote its own
    if "checkpoints" in leftovers.get("1", []):
        assert f"cleared what an earlier attempt left in {sweep / '1'}: checkpoints, csv" in log
    assert (sweep / "1" / "checkpoints" / "best.ckpt").stat().st_mtime > killed_at
    # the report has each job once, as one group of four seeds
    summary = (sweep / "summary.csv").read_text().splitlines()
    student = next(line for line in summary if line.startswith("student,"))
    assert ",4,0 1 2 3," in student
    print(
        f"\nkilled after {first_s:.1f} s with {len(done)} of 4 jobs done ({leftovers}); resume skipped "
        f"{len(skipped)}, ran {len(rerun)} in {resume_s:.1f} s"
    )


def test_a_failed_job_does_not_stop_the_sweep_and_a_resume_reruns_only_it(tmp_path: Path, cache: Path) -> None:
    sweep = tmp_path / "sweep"
    args = sweep_command(sweep, cache, "optim.optimizer.lr=1e30,0.001")  # job 0 fails, job 1 runs after it
    first = run_train(args)
    assert first.returncode == 0, first.stderr[-3000:]
    failed, ok = results.read(sweep / "0"), results.read(sweep / "1")
    assert failed["status"] == "failed" and ok["status"] == "ok"
    assert "FloatingPointError" in failed["error"] and NAN in failed["overrides"]
    assert f"job 0 failed ({NAN} " in first.stdout + first.stderr  # the end-of-sweep report says so on the console
    assert f"- `0` **failed** `{NAN} " in (sweep / "summary.md").read_text()

    states = read_states(sweep)
    resumed = run_train(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert f"rerun: {sweep / '0'}: it failed: FloatingPointError" in log
    assert f"skip: {sweep / '1'} already complete" in log and "skip: " + str(sweep / "0") not in log
    after = read_states(sweep)
    assert after["1"] == states["1"] and after["0"][0] > states["0"][0]
    assert results.read(sweep / "0")["status"] == "failed"  # the same NaN again, recorded again

    forced = run_train([*args, "rerun=true"])
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "skip:" not in forced.stdout + forced.stderr
    again = results.read(sweep / "1")
    assert read_states(sweep)["1"][0] > after["1"][0]  # run again: a new file ...
    assert again["student"]["test"] == ok["student"]["test"]  # ... with the same seed, the same student
    assert again["config_hash"] == ok["config_hash"] and again["group"] == ok["group"]
    assert "rerun=True" in again["overrides"]


def _start(cfg, folder, sweep):
    return resume.start(folder, results.config_hash(cfg), cfg.rerun, cfg.get("logger"), sweep=sweep)
