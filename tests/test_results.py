import json
import os

import pytest

from distillab import results
from distillab.io import atomic_write_text


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_text(path, "old")

    with pytest.raises(TypeError):
        atomic_write_text(path, 123)  # type: ignore[arg-type]
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_failed_record_needs_one_line_error(tmp_path):
    results.write(tmp_path, {"status": "failed", "error": "FloatingPointError: loss became nan"})
    assert results.read(tmp_path)["status"] == "failed"
    with pytest.raises(ValueError):
        results.write(tmp_path / "b", {"status": "failed", "error": "two\nlines"})
    assert not (tmp_path / "b").exists() or not os.listdir(tmp_path / "b")


def test_ok_record_must_be_complete_and_fractions(tmp_path):
    with pytest.raises(ValueError, match="misses"):
        results.write(tmp_path, {"status": "ok"})
    record = {key: {} for key in results.REQUIRED_OK}
    record.update(status="ok", student={"test": {"acc": 97.0}}, ratios={})
    with pytest.raises(ValueError, match="fraction"):
        results.write(tmp_path, record)
    assert not (tmp_path / "results.json").exists()
    # a compressed teacher without a student is complete; a student without ratios is not
    record.update(student={"test": {"acc": 0.9}})
    del record["ratios"]
    with pytest.raises(ValueError, match="ratios"):
        results.write(tmp_path, record)
    del record["student"]
    record["compressed"] = {"test": {"acc": 0.8}}
    results.write(tmp_path, record)


def test_group_drops_only_the_seed():
    assert results.group_of(["seed=1", "distill=kd", "data.batch_size=32"]) == "data.batch_size=32 distill=kd"
    assert results.group_of(["seed=2"]) == "(defaults)"


def test_results_json_is_plain_json(tmp_path):
    results.write(tmp_path, {"status": "failed", "error": "x"})
    assert json.loads((tmp_path / "results.json").read_text()) == {"status": "failed", "error": "x"}
