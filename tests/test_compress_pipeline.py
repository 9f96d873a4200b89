"""Compression as step 6 of a real run: the compressed block, the artifact, the teacher
baseline, chains and bad input."""

import json

import pytest

from distillab import cli, pipeline, results
from distillab.compress import prune
from distillab.config import ConfigError
from tests.conftest import run_train
from tests.test_calibration import check_calibration_of_a_run

QUICK = ["measure.warmup=0", "measure.repeats=2"]


def test_unstructured_pruning_of_the_student(make_cfg, tmp_path):
    record = pipeline.run(
        make_cfg(
            "compress=prune_unstructured",
            "compress.amount=0.8",
            "compress.finetune_epochs=1",
            "student=cnn",
            "student.width=8",
            *QUICK,
        )
    )
    results.check(record)
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == record
    check_calibration_of_a_run(record, make_cfg)
    block = record["compressed"]
    assert block["method"] == "prune_unstructured" and block["of"] == "student"
    assert "torch.nn.utils.prune" in block["backend"]
    assert block["params"] == record["student"]["params"]  # dense tensors stay
    assert block["details"]["nonzero_fraction"] == pytest.approx(0.2, abs=0.01)
    assert block["nonzero_params"] < 0.5 * block["params"]
    artifact = tmp_path / "run" / "compressed" / "model.pt"
    assert block["size_bytes"] == artifact.stat().st_size < record["student"]["size_bytes"]
    assert set(block["vs_uncompressed"]) == {"params", "size", "latency_batch_64", "acc_retention"}
    assert block["vs_teacher"]["params"] == pytest.approx(block["params"] / record["teacher"]["params"])
    # the artifact reloads into the student architecture, exactly
    student = pipeline.prepare(make_cfg("student=cnn", "student.width=8")).student
    prune.load_unstructured(artifact, student)
    assert sum(int((p == 0).sum()) for p in student.parameters()) >= block["details"]["zeroed_weights"]


def test_structured_pruning_shrinks_the_student_for_real(make_cfg):
    record = pipeline.run(
        make_cfg("compress=prune_structured", "compress.finetune_epochs=1", "student=cnn", "student.width=16", *QUICK)
    )
    block = record["compressed"]
    assert block["vs_uncompressed"]["params"] <= 0.55
    assert block["macs"] < record["student"]["macs"]
    assert 0.0 <= block["test"]["acc"] <= 1.0


def test_compressing_the_teacher_is_a_baseline_without_a_student(make_cfg):
    record = pipeline.run(
        make_cfg("compress=prune_structured", "compress.target=teacher", "compress.finetune_epochs=0", *QUICK)
    )
    results.check(record)
    assert "student" not in record and record["compressed"]["of"] == "teacher"
    assert record["compressed"]["vs_uncompressed"] == record["compressed"]["vs_teacher"]
    assert record["timing_s"]["student"] == 0.0


def test_a_chain_applies_its_steps_in_order(make_cfg):
    record = pipeline.run(
        make_cfg(
            "compress=prune_structured+quant_static",
            "compress.finetune_epochs=0",
            "student=cnn",
            "student.width=16",
            *QUICK,
        )
    )
    block = record["compressed"]
    assert block["method"] == "prune_structured+quant_static"
    assert block["macs"] > 0  # counted on the pruned float model: int8 runs the same MACs
    assert block["vs_uncompressed"]["size"] < 0.3


@pytest.mark.parametrize(
    "override,key",
    [
        ("compress.amount=1.5", "compress.amount"),
        ("compress.importance=l3", "compress.importance"),
        ("compress.target=both", "compress.target"),
    ],
)
def test_bad_compression_input_fails_before_training(override, key, capsys):
    with pytest.raises(SystemExit) as exit_info:  # what train.py runs before anything else
        cli.check_command_line(["compress=prune_structured", override])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("error: ") and key in err and len(err.strip().splitlines()) == 1


def test_bad_compression_input_from_the_command_line_writes_nothing(tmp_path):
    result = run_train(
        [
            "compress=prune_structured",
            "compress.amount=1.5",
            f"hydra.run.dir={tmp_path / 'run'}",
            f"paths.cache_dir={tmp_path / 'cache'}",
        ]
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ") and "compress.amount" in result.stderr
    assert not list(tmp_path.rglob("results.json")) and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "overrides",
    [
        ["compress=prune_structured", "compress.amount=0.99", "student=cnn", "student.width=2"],
        ["compress=prune_structured", "compress.amount=null", "compress.target_params=99999999"],
    ],
)
def test_compression_that_cannot_apply_is_refused_before_training(make_cfg, tmp_path, overrides):
    with pytest.raises(ConfigError):
        pipeline.run(make_cfg(*overrides, "compress.finetune_epochs=0", *QUICK, own_cache=True), raise_on_failure=True)
    assert not (tmp_path / "cache").exists()  # no teacher was trained
    assert not list(tmp_path.rglob("results.json"))
