"""wandb without an account: the run is logged offline, and the offline files hold the
resolved config, the final results in the summary, and teacher/student job types."""

import json
import struct
from pathlib import Path

import pytest

from distillab import pipeline

BLOCK = 32768
HEADER = 7  # ":W&B" + 2-byte magic + 1-byte version; each chunk: crc32, length, type


def read_wandb_records(path: Path) -> list:
    """Parse a ``.wandb`` transaction log (LevelDB-style blocks) into protobuf Records."""
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
    info = {"config": {}, "summary": {}, "job_type": None, "group": None}
    for record in read_wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            info["job_type"], info["group"] = record.run.job_type, record.run.run_group
            info["config"].update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "config":
            info["config"].update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "summary":
            info["summary"].update({u.key: json.loads(u.value_json) for u in record.summary.update})
    return info


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
