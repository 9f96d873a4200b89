"""The built-in datamodules: splits, batches, and their settings (declared on the constructor,
valued in conf/data/, checked up front without torch and again when built from Python)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
from hydra.utils import get_class
from omegaconf import OmegaConf

from distillab import build, conf
from distillab.data import DigitsDataModule, SyntheticDataModule, TensorBatches
from distillab.settings import ConfigError
from tests.conftest import ROOT


def digits(**overrides: Any) -> DigitsDataModule:
    return conf.build("data", "digits", **overrides)


def synthetic(**overrides: Any) -> SyntheticDataModule:
    return conf.build("data", "synthetic", **overrides)


def test_digits_split_is_stratified_fixed_and_complete():
    data = digits(val_fraction=0.15, test_fraction=0.15, split_seed=0)
    sizes = data.split_sizes
    assert sum(sizes.values()) == 1797
    assert sizes == {"train": 1257, "val": 270, "test": 270}
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    # stratified: every class has the same share (±1 sample) in each split
    for name in ("train", "val", "test"):
        counts = torch.bincount(data.splits[name][1], minlength=10).numpy()
        expected = np.bincount(__import__("sklearn.datasets").datasets.load_digits().target) * sizes[name] / 1797
        assert np.all(np.abs(counts - expected) <= 1.5), (name, counts, expected)
    again = digits(split_seed=0)
    assert torch.equal(again.splits["test"][0], data.splits["test"][0])
    other = digits(split_seed=1)
    assert not torch.equal(other.splits["test"][1], data.splits["test"][1])


def test_splits_are_disjoint():
    data = synthetic(num_samples=300, data_seed=3)
    data.setup()
    x_all, _ = data.load_arrays()
    rows = {name: {tuple(row.flatten().tolist()) for row in data.splits[name][0]} for name in data.splits}
    assert not rows["train"] & rows["val"] and not rows["train"] & rows["test"] and not rows["val"] & rows["test"]
    assert sum(len(r) for r in rows.values()) == len(x_all)


def test_batches_cover_every_sample_once_per_epoch_and_reshuffle():
    x, y = torch.arange(10).float()[:, None], torch.arange(10)
    batches = TensorBatches(x, y, batch_size=4, shuffle=True, seed=0)
    assert len(batches) == 3
    first = torch.cat([index for _, _, index in batches])
    second = torch.cat([index for _, _, index in batches])
    assert sorted(first.tolist()) == list(range(10)) == sorted(second.tolist())
    assert not torch.equal(first, second)
    for xb, yb, index in batches:
        assert torch.equal(yb, index) and torch.equal(xb[:, 0].long(), index)


def test_drop_last_and_sharding_across_ranks():
    x, y = torch.zeros(10, 1), torch.arange(10)
    assert len(TensorBatches(x, y, 4, shuffle=False, drop_last=True)) == 2
    shards = [TensorBatches(x, y, 2, shuffle=True, seed=5, rank=r, world_size=2) for r in range(2)]
    seen = [torch.cat([i for _, _, i in shard]) for shard in shards]
    assert len(seen[0]) == len(seen[1]) == 5
    assert set(seen[0].tolist()).isdisjoint(seen[1].tolist())
    assert len(shards[0]) == 3


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (20,)])
def test_synthetic_any_shape(shape):
    data = synthetic(input_shape=list(shape), num_classes=5, num_samples=100)
    assert data.input_shape == shape and data.num_classes == 5
    xb, yb, _ = next(iter(data.train_dataloader()))
    assert xb.shape[1:] == shape


# -- settings ---------------------------------------------------------------------------------------
OPTIONS = conf.options("data")


def _yaml(option: str) -> tuple[str, dict]:
    values = OmegaConf.to_container(conf.load("data", option))
    return values.pop("_target_"), values


# one process checks every bad value in turn (each line on its own stderr) and says at the end
# whether torch was imported: a fresh interpreter is what "before torch" is about, one is enough
_COMMAND_LINE = """
import contextlib, io, json, sys
from distillab import cli
answers = {}
for override in sys.argv[1:]:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            cli.check_command_line([override])
        code = 0
    except SystemExit as done:
        code = done.code
    answers[override] = [code, err.getvalue()]
print(json.dumps({"answers": answers, "torch": "torch" in sys.modules}))
"""
BAD_VALUES = {
    "data.val_fraction=2": "data.val_fraction=2 is not allowed: a fraction in (0, 1)",
    "data.batch_size=0": "data.batch_size=0 is not allowed: an integer >= 1",
    "data.labelled_fraction=1.5": "data.labelled_fraction=1.5 is not allowed: a fraction in (0, 1]",
    "data.normalize=maybe": "data.normalize='maybe' is not allowed: true or false",
    "data.eval_batchsize=8": "data.eval_batchsize is not a known key; allowed keys of data: ",
}


@pytest.fixture(scope="module")
def checked_in_a_fresh_process() -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _COMMAND_LINE, *BAD_VALUES], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_the_checks_of_bad_values_import_no_torch(checked_in_a_fresh_process):
    assert checked_in_a_fresh_process["torch"] is False
    assert sorted(checked_in_a_fresh_process["answers"]) == sorted(BAD_VALUES)


@pytest.mark.parametrize(("override", "message"), BAD_VALUES.items())
def test_a_bad_value_is_one_line_before_torch_is_imported(override, message, checked_in_a_fresh_process):
    code, err = checked_in_a_fresh_process["answers"][override]
    assert code == 2, err
    err = err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {message}"), err


def test_the_command_line_exits_2_with_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "data.val_fraction=2"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "error: data.val_fraction=2 is not allowed: a fraction in (0, 1)"
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("option", "overrides", "message"),
    [
        (
            "digits",
            {"val_fraction": 0.6, "test_fraction": 0.5},
            "data.val_fraction=0.6 is not allowed: val_fraction + test_fraction must be < 1 (now 1.1)",
        ),
        (
            "synthetic",
            {"num_samples": 50},
            "data.num_samples=50 is not allowed: at least 10 per class (>= 100 for 10 classes)",
        ),
        ("synthetic", {"input_shape": []}, "data.input_shape=[] is not allowed: a list of sizes"),
        ("synthetic", {"input_shape": [3, 0]}, "data.input_shape=[3, 0] is not allowed: a list of sizes >= 1"),
        ("synthetic", {"num_classes": 1}, "data.num_classes=1 is not allowed: an integer >= 2"),
        ("mnist", {"root": "data", "max_shift": 9}, "data.max_shift=9 is not allowed: pixels in [0, 8]"),
        ("cifar10", {"root": "data", "val_size": 0}, "data.val_size=0 is not allowed: an integer >= 1 (images taken"),
    ],
)
def test_a_constructor_refuses_bad_values_in_one_line(option, overrides, message):
    """Cross-field checks live in the constructor; a value out of its declared range is refused
    there too when the datamodule is built from Python (``@checked``)."""
    node = conf.load("data", option)
    node.merge_with(overrides)
    with pytest.raises(ConfigError) as caught:
        build.part("data", node)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    values = OmegaConf.to_container(node, resolve=True)
    cls = get_class(values.pop("_target_"))
    with pytest.raises(ConfigError) as caught:
        cls(**values)
    assert f"data.{caught.value}".startswith(message)


def test_constructors_have_no_defaults_of_their_own():
    with pytest.raises(TypeError, match="missing"):
        DigitsDataModule(batch_size=8)
    data = DigitsDataModule(
        val_fraction=0.2,
        test_fraction=0.2,
        normalize=False,
        batch_size=8,
        eval_batch_size=8,
        split_seed=0,
        labelled_fraction=1.0,
    )
    assert data.split_sizes["test"] == 360 and not data.normalize
