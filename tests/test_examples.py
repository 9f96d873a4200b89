"""The worked examples of examples/ (a logit method, a feature method, a model, a compressor), each
run by train.py in a subprocess as a user would: from a folder outside the repository, with the
example's folder on PYTHONPATH and its conf/ added to Hydra's search path by --config-dir."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distillab import results
from tests.conftest import ROOT

EXAMPLES = ROOT / "examples"
SMALL = ["trainer.max_epochs=2", "teacher.recipe.max_epochs=2", "trainer.enable_progress_bar=false", "num_threads=1"]
# Two runs cover the four examples (each run of train.py costs seconds of imports), each with two
# example folders on Hydra's search path, as docs/extending.md shows for several plug-in folders.
# name: ({config group: example folder}, overrides)
RUNS = {
    "logit+model": (
        {"distill": "my_method", "model": "my_model"},
        ["distill=logit_matching", "teacher=separable_cnn", "student=separable_cnn"],
    ),
    "feature+compressor": (
        {"distill": "my_method", "compress": "my_compressor"},
        ["distill=cosine_hint", "compress=low_rank", "compress.finetune_epochs=1"],
    ),
}
# results.json names an architecture after its option (teacher=separable_cnn)
SEPARABLE_CNN = ("separable_cnn",)


def start(folders: list[Path], overrides: list[str], out: Path, cache: Path) -> subprocess.Popen:
    """``python train.py --config-dir FOLDER/conf OVERRIDES`` run in ``out`` with ``folders`` on
    PYTHONPATH; with several folders, their conf/ folders go on Hydra's search path instead."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, folders), str(ROOT / "src")])}
    search = ",".join(f"file://{folder / 'conf'}" for folder in folders)
    where = ["--config-dir", str(folders[0] / "conf")] if len(folders) == 1 else [f"hydra.searchpath=[{search}]"]
    args = [
        sys.executable,
        str(ROOT / "train.py"),
        *where,
        *overrides,
        *SMALL,
        f"hydra.run.dir={out / 'run'}",
        f"paths.cache_dir={cache}",
    ]
    out.mkdir(parents=True)
    with open(out / "stdout", "w") as stdout, open(out / "stderr", "w") as stderr:
        return subprocess.Popen(args, cwd=out, env=env, stdout=stdout, stderr=stderr, text=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The results.json and run folder of each run of ``RUNS``, all started at once (one thread each)."""
    root = tmp_path_factory.mktemp("examples")
    started = {}
    for name, (groups, overrides) in RUNS.items():
        folders = sorted({EXAMPLES / example for example in groups.values()})
        started[name] = start(folders, overrides, root / name / "job", root / "cache")

    def record(name: str) -> tuple[dict, Path]:
        code = started[name].wait(timeout=300)
        out = root / name / "job"
        assert code == 0, (out / "stderr").read_text()[-3000:]
        found = json.loads((out / "run" / "results.json").read_text())
        results.check(found)
        assert found["status"] == "ok"
        return found, out / "run"

    yield record
    for process in started.values():
        if process.poll() is None:
            process.kill()


def logged_terms(run_dir: Path) -> set[str]:
    with open(run_dir / "csv" / "student" / "metrics.csv") as file:
        return set(next(csv.reader(file)))


@pytest.mark.parametrize(
    ("example", "overrides", "key"),
    [
        ("my_method", ["distill=logit_matching", "distill.weight=-1"], "distill.weight=-1"),
        ("my_method", ["distill=cosine_hint", "distill.kd.lam=2"], "distill.kd.lam=2"),
        ("my_model", ["student=separable_cnn", "student.width=0"], "student.width=0"),
        ("my_compressor", ["compress=low_rank", "compress.rank_fraction=1"], "compress.rank_fraction=1"),
    ],
)
def test_a_bad_setting_of_an_example_fails_in_one_line_before_any_work(tmp_path, example, overrides, key):
    tick = time.perf_counter()
    folder = EXAMPLES / example  # as its README says: its folder on PYTHONPATH, its conf/ by --config-dir
    process = start([folder], overrides, tmp_path / "job", tmp_path / "cache")
    assert process.wait(timeout=120) == 2
    lines = (tmp_path / "job" / "stderr").read_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {key} is not allowed: "), lines
    assert not (tmp_path / "job" / "run").exists() and not list(tmp_path.rglob("results.json"))
    assert time.perf_counter() - tick < 30  # before any work (a cold declaration cache imports the part once)


def test_logit_method_example(run):
    record, run_dir = run("logit+model")
    assert record["method"] == "logit_matching"
    assert {"train/ce", "train/mse", "train/loss"} <= logged_terms(run_dir)


def test_feature_method_example(run):
    record, run_dir = run("feature+compressor")
    assert record["method"] == "cosine_hint"
    assert record["student"]["extra_params"] > 0  # the learned projection, counted apart from the student
    assert {"train/ce", "train/kd", "train/cos"} <= logged_terms(run_dir)


def test_model_example_as_teacher_and_student(run):
    record, _ = run("logit+model")
    # stem 16·9 + 32, stage 0: 16·9 + 32 + 16·16 + 32, stage 1: 16·9 + 32 + 16·32 + 64, classifier 32·10 + 10
    params = 176 + 464 + 752 + 330
    for role in ("teacher", "student"):
        assert record[role]["arch"] in SEPARABLE_CNN and record[role]["params"] == params
    assert record["teacher"]["cache"] == "miss"


def test_compressor_example(run):
    record, run_dir = run("feature+compressor")
    student, compressed = record["student"], record["compressed"]
    assert record["compress"] == "low_rank" and compressed["method"] == "low_rank"
    assert compressed["details"]["layers"] == {"features.1": [64, 32, 8]}  # not the classifier
    assert compressed["params"] == compressed["details"]["params_after"] < student["params"]
    artifact = run_dir / "compressed" / "model.pt"
    assert compressed["size_bytes"] == artifact.stat().st_size < student["size_bytes"]

    from distillab.models import MLP  # the artifact rebuilds on the uncompressed architecture

    spec = importlib.util.spec_from_file_location("low_rank", EXAMPLES / "my_compressor" / "low_rank.py")
    low_rank = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(low_rank)
    model = low_rank.load(artifact, MLP((1, 8, 8), 10, hidden=[32], dropout=0.0, input_dropout=0.0))
    assert sum(p.numel() for p in model.parameters()) == compressed["params"]
