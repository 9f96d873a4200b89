"""wandb without an account: the run is logged offline, and the offline files hold the
resolved config, the final results in the summary, and teacher/student job types. A sweep's
runs share a group and carry their overrides as tags; one summary run holds the sweep's table
and plot."""

import csv
import json
import struct
import time
from pathlib import Path

import pytest

from distillab import loggers, pipeline, report
from tests.conftest import FAST, run_train

BLOCK = 32768
HEADER = 7  # ":W&B" + 2-byte magic + 1-byte version; each chunk: crc32, length, type


def read_wandb_records(path: Path, wait_s: float = 30.0) -> list:
    """Parse a ``.wandb`` transaction log (LevelDB-style blocks) into protobuf Records.

    wandb's service process writes the log; it can still be writing it when ``finish()`` has
    returned in offline mode (a log cut inside a block, or whole blocks with the run record not
    yet among them), so the log is read again until it parses and ends with the ``exit`` record
    that closes a finished run (at most ``wait_s`` seconds), then the last error is raised."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + wait_s
    while True:
        try:
            records = _parse_wandb_log(path)
            if records and records[-1].WhichOneof("record_type") == "exit":
                return records
            problem: Exception = AssertionError(f"{path} does not end with an exit record yet")
        except DecodeError as error:
            problem = error
        if time.monotonic() > deadline:
            raise problem
        time.sleep(0.5)


def _parse_wandb_log(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a wandb transaction log"
    records, pending, pos = [], b"", HEADER
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left_in_block
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def summarize_run(path: Path) -> dict:
    info = {"config": {}, "summary": {}, "job_type": None, "group": None, "tags": []}
    for record in read_wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            info["job_type"], info["group"] = record.run.job_type, record.run.run_group
            info["tags"] = list(record.run.tags)
            info["config"].update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "config":
            info["config"].update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "summary":
            info["summary"].update({u.key: json.loads(u.value_json) for u in record.summary.update})
    return info


def history_of(path: Path) -> list[dict]:
    """The logged steps of a run, as nested dicts (media are logged as ``{"_type": ..., "path": ...}``)."""
    steps = []
    for record in read_wandb_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        step: dict = {}
        for item in record.history.item:
            *parents, leaf = list(item.nested_key) or [item.key]
            node = step
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = json.loads(item.value_json)
        steps.append(step)
    return steps


@pytest.fixture
def no_wandb_account(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc with a key
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))


def test_wandb_logs_offline_without_an_account(make_cfg, tmp_path, no_wandb_account, caplog):
    cfg = make_cfg("logger=wandb", "trainer.max_epochs=2", "teacher.recipe.max_epochs=2")
    with caplog.at_level("INFO", logger="distillab.loggers"):
        record = pipeline.run(cfg)
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2, runs  # teacher, then student
    infos = {info["job_type"]: info for info in map(summarize_run, runs)}
    assert set(infos) == {"teacher", "student"}
    student = infos["student"]
    assert student["config"]["distill"]["lam"] == 0.5
    assert student["config"]["paths"]["output_dir"] == str(tmp_path / "run")  # resolved, not ${...}
    assert student["summary"]["student/test/acc"] == pytest.approx(record["student"]["test"]["acc"])
    assert student["summary"]["teacher/cache"] == "miss"
    assert any("wandb sync" in message and "offline" in message for message in caplog.messages)


def test_offline_is_detected_from_the_environment(monkeypatch, tmp_path):
    from distillab import loggers

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert not loggers.wandb_api_key_present()
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert loggers.wandb_api_key_present()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert loggers.wandb_api_key_present()


def test_override_tags_are_short_and_leave_out_folders():
    overrides = [
        "distill=kd",
        "seed=1",
        "+distill.extra=1",
        "paths.cache_dir=/x",
        "hydra.sweep.dir=/y",
        "logger=wandb",
        "distill=kd",
        "student.hidden=[" + ",".join(["128"] * 20) + "]",
    ]
    tags = loggers.override_tags(overrides)
    assert tags[:3] == ["distill=kd", "seed=1", "distill.extra=1"] and len(tags) == 4
    assert tags[3].startswith("student.hidden=[128,") and len(tags[3]) == loggers.TAG_LENGTH


@pytest.mark.parametrize("logger, expected", [("wandb", True), ("csv", False), ("none", False)])
def test_the_summary_run_is_only_for_sweeps_that_log_to_wandb(make_cfg, logger, expected):
    assert loggers.uses_wandb(make_cfg(f"logger={logger}").get("logger")) is expected


def _two_job_sweep(tmp_path: Path, *extra: str) -> tuple[Path, str]:
    """A sweep of seeds 0 and 1 that logs to wandb (offline), 2 epochs each; its folder and output."""
    sweep = tmp_path / "sweep"
    fast = [o for o in FAST if not o.startswith("logger=")]
    arguments = ["-m", "seed=0,1", *extra, "logger=wandb", *fast, "trainer.max_epochs=2", "teacher.recipe.max_epochs=2"]
    result = run_train([*arguments, f"hydra.sweep.dir={sweep}", f"paths.cache_dir={tmp_path / 'c'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep, result.stdout + result.stderr


def test_a_sweep_shares_a_group_is_tagged_and_ends_with_a_summary_run(tmp_path, no_wandb_account):
    sweep, output = _two_job_sweep(tmp_path, "distill=kd")
    group = loggers.sweep_group(sweep)
    for job, roles in (("0", ["teacher", "student"]), ("1", ["student"])):
        runs = [summarize_run(p) for p in sorted((sweep / job / "wandb").glob("offline-run-*/run-*.wandb"))]
        assert [run["job_type"] for run in runs] == roles
        for run in runs:
            assert run["group"] == group
            assert {f"seed={job}", "distill=kd", "trainer.max_epochs=2"} <= set(run["tags"])
            assert not any(tag.startswith(("paths.", "hydra.", "logger")) for tag in run["tags"])

    [path] = (sweep / "wandb").glob("offline-run-*/run-*.wandb")
    summary = summarize_run(path)
    assert (summary["job_type"], summary["group"]) == ("sweep-summary", group)
    [step] = history_of(path)
    files = path.parent / "files"
    table, image = step["summary"], step["accuracy_vs_params"]
    assert (table["_type"], image["_type"]) == ("table-file", "image-file")
    logged = json.loads((files / table["path"]).read_text())
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert logged["columns"] == report.COLUMNS and len(logged["data"]) == len(rows) == 2
    index = {name: i for i, name in enumerate(logged["columns"])}
    for logged_row, row in zip(logged["data"], rows):
        assert logged_row[index["role"]] == row["role"] and logged_row[index["n_seeds"]] == int(row["n_seeds"])
        assert logged_row[index["acc_mean"]] == pytest.approx(float(row["acc_mean"]))
    assert (files / image["path"]).read_bytes() == (sweep / "accuracy_vs_params.png").read_bytes()
    # the paired comparisons too: one method over two seeds has nothing to compare, so no rows
    compared = json.loads((files / step["comparisons"]["path"]).read_text())
    assert compared["columns"] == report.COMPARISON_COLUMNS and compared["data"] == []
    assert step["comparisons"]["_type"] == "table-file" and step["comparisons_forest"]["_type"] == "image-file"
    assert "wandb sync" in output


def test_a_stacked_sweep_logs_each_job_as_its_own_wandb_run(tmp_path, no_wandb_account):
    sweep, _ = _two_job_sweep(tmp_path, "hydra/launcher=stacked")
    group = loggers.sweep_group(sweep)
    for job in ("0", "1"):
        runs = {summarize_run(p)["job_type"]: p for p in (sweep / job / "wandb").glob("offline-run-*/run-*.wandb")}
        student = summarize_run(runs["student"])
        assert student["group"] == group and f"seed={job}" in student["tags"]
        record = json.loads((sweep / job / "results.json").read_text())
        assert record["launcher"] == "stacked"
        # the group trained the missing teacher once, logged and reported as the first job's
        assert record["teacher"]["cache"] == ("miss" if job == "0" else "hit")
        assert ("teacher" in runs) == (job == "0")
        timing = record["timing_s"]  # the group's time for the teacher and its table is the first job's
        assert (timing["teacher"] > 0) == (job == "0") and timing["total"] >= timing["teacher"] + timing["student"]
        # the epochs at Lightning's steps: validation, then training, at the last step of each epoch
        history = history_of(runs["student"])
        epochs = [step for step in history if "val/acc" in step or "train/loss" in step]
        steps = [step["trainer/global_step"] for step in epochs]
        assert steps == [19, 19, 39, 39]
        assert [step["epoch"] for step in epochs] == [0, 0, 1, 1]
        assert student["summary"]["student/test/acc"] == pytest.approx(record["student"]["test"]["acc"])
