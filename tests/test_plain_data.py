"""Any LightningDataModule as a run's data: what is read from it or inferred, the order of its
training batches, and cached teacher outputs through an indexed copy of its training loader
(or the live teacher, with the reason logged, when a table cannot stand in for it)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    SequentialSampler,
    Subset,
    TensorDataset,
)
from torch.utils.data._utils.collate import default_collate

from distillab import results
from distillab.data import adapter
from distillab.distill.methods.kd import KD
from distillab.distill.module import DistillationModule
from distillab.settings import ConfigError
from distillab.steps.teacher import outputs
from distillab.steps.teacher.cache import Teacher
from tests.conftest import ROOT, quiet_trainer

EXAMPLE = ROOT / "examples" / "my_datamodule"
AUTO = outputs.OutputSettings(cache="auto", dtype="float32", top_k=None)


# -- plain datamodules and datasets ------------------------------------------------------------------
def tensors(n: int = 120, shape: tuple[int, ...] = (1, 4, 4), classes: int = 3) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, *shape, generator=generator), torch.arange(n) % classes


class LabelsApart(Dataset):
    """A dataset that keeps its labels in ``targets`` (a list), as torchvision's do; counts its reads."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.targets, self.reads = x, y.tolist(), 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        self.reads += 1
        return self.x[index], self.targets[index]


class LabelsInside(LabelsApart):
    """The same samples, with no way to read the labels but reading the samples."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        super().__init__(x, y)
        self.labels_ = self.__dict__.pop("targets")

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        self.reads += 1
        return self.x[index], self.labels_[index]


class Jittered(LabelsApart):
    """Random noise on every read: a random augmentation."""

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x, y = super().__getitem__(index)
        return x + 0.1 * torch.randn_like(x), y


class Stream(IterableDataset):
    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y))


class Plain(pl.LightningDataModule):
    """A plain datamodule: setup and three loaders, nothing else. ``kind`` picks the training set."""

    def __init__(self, kind: str = "tensor", batch_size: int = 16, **loader: Any) -> None:
        super().__init__()
        self.kind, self.batch_size, self.loader = kind, batch_size, loader
        self.train_set: Any = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = tensors()
        self.x, self.y = x, y
        self.train_set = {
            "tensor": lambda: TensorDataset(x, y),
            "apart": lambda: LabelsApart(x, y),
            "inside": lambda: LabelsInside(x, y),
            "jittered": lambda: Jittered(x, y),
            "stream": lambda: Stream(x, y),
            "subset": lambda: Subset(LabelsApart(x, y), list(range(0, 120, 2))),
        }[self.kind]()
        self.val_set = TensorDataset(x[:30], y[:30])

    def train_dataloader(self) -> DataLoader:
        options = {"batch_size": self.batch_size, "shuffle": self.kind != "stream", **self.loader}
        return DataLoader(self.train_set, **options)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=64)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=64)


class WithAttributes(Plain):
    name = "mine"
    input_shape = (1, 4, 4)

    @property
    def num_classes(self) -> int:
        if self.train_set is None:
            raise RuntimeError("call setup() first")
        return 7


class FailingNumClasses(Plain):
    @property
    def num_classes(self) -> int:
        raise NotImplementedError("not known")


class Seeded(Plain):
    """Shuffles with a generator of its own, seeded by ``shuffle_seed`` (which the run sets)."""

    shuffle_seed = 0

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(self.shuffle_seed),
        )


class Transferring(Plain):
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        return x * 2, y


class Dicts(Plain):
    def train_dataloader(self) -> DataLoader:
        return DataLoader([{"x": x, "y": y} for x, y in zip(self.x, self.y)], batch_size=8)


def ready(data: pl.LightningDataModule, seed: int = 0) -> adapter.DataInfo:
    return adapter.prepare(data, seed)


# -- what is read and what is inferred -----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tensor", "apart", "inside", "subset", "stream"])
def test_shape_classes_and_name_are_inferred(kind, caplog):
    data = Plain(kind)
    with caplog.at_level(logging.INFO, logger="distillab.data.adapter"):
        info = ready(data)
    assert info.name == "Plain" and info.input_shape == (1, 4, 4) and info.num_classes == 3
    assert info.description.startswith("Plain: input (1, 4, 4), 3 classes")
    # labels kept apart are read without loading the inputs; otherwise one pass, said in the log
    passes = "reading the training labels batch by batch" in caplog.text
    assert passes is (kind in ("inside", "stream"))
    if kind == "apart":
        reads = data.train_set.reads
        assert adapter.infer_num_classes(data) == 3 and data.train_set.reads == reads


def test_attributes_win_and_a_failing_property_is_inferred():
    data = WithAttributes()
    with pytest.raises(RuntimeError):
        data.num_classes  # noqa: B018 - fails before setup; prepare sets the module up first
    info = ready(data)
    assert (info.name, info.input_shape, info.num_classes) == ("mine", (1, 4, 4), 7)
    assert ready(FailingNumClasses()).num_classes == 3


def test_labels_of_datasets_are_read_apart_from_inputs():
    x, y = tensors(10, (2,), 4)
    assert torch.equal(adapter.dataset_labels(TensorDataset(x, y)), y)
    assert torch.equal(adapter.dataset_labels(LabelsApart(x, y)), y)
    assert torch.equal(adapter.dataset_labels(Subset(LabelsApart(x, y), [3, 1])), y[[3, 1]])
    assert adapter.dataset_labels(TensorDataset(x)) is None
    assert adapter.dataset_labels(LabelsInside(x, y)) is None
    assert adapter.dataset_labels(Stream(x, y)) is None


def test_batches_that_are_not_pairs_are_a_one_line_error():
    with pytest.raises(ConfigError, match=r"^data: the training batches of Dicts must be \(inputs, labels\) pairs"):
        ready(Dicts())


def test_reading_the_data_draws_no_random_numbers():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    ready(Plain("inside"))
    data = Plain("tensor")
    data.setup()
    adapter.example(data)
    assert torch.equal(torch.rand(3), expected)


# -- the order of training batches follows the run's seed ---------------------------------------------
class Recorder(pl.LightningModule):
    """Records the labels (and indices) of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(16, 3)
        self.seen: list[list[int]] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.seen.append(batch[-1].tolist())
        return self.layer(batch[0].flatten(1)).sum()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def batch_order(data: pl.LightningDataModule, seed: int, indexed: bool) -> list[list[int]]:
    """The training batches of two epochs of a fit, seeded as the run seeds it: right before the fit."""
    ready(data, seed)
    pl.seed_everything(seed, verbose=False)
    module = Recorder()
    trainer = quiet_trainer(2, num_sanity_val_steps=0)
    trainer.fit(module, **adapter.fit_arguments(data, indexed=indexed))
    return module.seen


@pytest.mark.parametrize(("module", "indexed"), [(Plain, False), (Plain, True), (Seeded, False), (Seeded, True)])
def test_batch_order_follows_the_seed(module, indexed):
    first, again, other = (batch_order(module("apart"), seed, indexed) for seed in (0, 0, 1))
    assert first == again and first != other
    epochs = [sum(first[: len(first) // 2], []), sum(first[len(first) // 2 :], [])]
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    if indexed:  # the batches carry sample indices: every sample once per epoch
        assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(120))


# -- sample indices ------------------------------------------------------------------------------------
def indices_and_batches(loader: DataLoader, seed: int) -> list[tuple]:
    torch.manual_seed(seed)
    return list(loader)


@pytest.mark.parametrize(
    "options",
    [
        {"batch_size": 16, "shuffle": True},
        {"batch_size": 16, "shuffle": True, "drop_last": True, "generator": torch.Generator().manual_seed(3)},
        {"batch_sampler": BatchSampler(SequentialSampler(range(120)), 50, drop_last=False)},
        {"batch_size": 10, "shuffle": True, "collate_fn": lambda samples: [t * 2 for t in default_collate(samples)]},
        {"batch_size": 32, "shuffle": True, "num_workers": 1},
    ],
)
def test_the_indexed_loader_keeps_order_and_batch_composition(options):
    x, y = tensors()
    dataset = LabelsApart(x, y)
    generator = options.get("generator")
    state = generator.get_state() if generator is not None else None
    original = DataLoader(dataset, **options)
    expected = indices_and_batches(original, 7)
    if state is not None:
        generator.set_state(state)
    indexed = adapter.indexed_loader(DataLoader(dataset, **options))
    assert indexed.batch_size == original.batch_size and indexed.drop_last == original.drop_last
    assert indexed.num_workers == original.num_workers
    got = indices_and_batches(indexed, 7)
    assert len(got) == len(expected) == len(indexed)
    scale = 2 if "collate_fn" in options else 1
    for (xb, yb), (xi, yi, index) in zip(expected, got):
        assert torch.equal(xb, xi) and torch.equal(yb, yi)
        assert torch.equal(xi, scale * x[index]) and torch.equal(yi, scale * y[index])


def test_the_index_wrappers_pickle_for_worker_processes():
    x, y = tensors(6)
    collate = pickle.loads(pickle.dumps(adapter.IndexedCollate(default_collate)))
    dataset = pickle.loads(pickle.dumps(adapter.IndexedDataset(TensorDataset(x, y))))
    xb, yb, index = collate([dataset[4], dataset[1]])
    assert torch.equal(xb, x[[4, 1]]) and torch.equal(yb, y[[4, 1]]) and index.tolist() == [4, 1]


# -- cached teacher outputs of a plain datamodule ---------------------------------------------------------
class Teach(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def test_the_cached_table_equals_the_live_teachers_logits(tmp_path, caplog):
    data = Plain("apart")
    ready(data)
    teacher = Teach().eval()
    with caplog.at_level(logging.INFO, logger="distillab.steps.teacher.outputs"):
        taught = outputs.for_run(AUTO, "cpu", Teacher(teacher, "key", "miss", tmp_path), data, KD(0.5, 4.0, False))
    assert taught.mode == "cached" and taught.source == "miss" and taught.table.shape == (120, 3)
    assert "teacher outputs: cached: the training inputs are deterministic (Plain's training set is map-style" in (
        caplog.text
    )
    with torch.no_grad():
        torch.testing.assert_close(taught.table, teacher(data.x), rtol=0, atol=1e-6)
    live = DistillationModule(nn.Linear(16, 3), teacher, KD(0.5, 4.0, False))
    cached = DistillationModule(nn.Linear(16, 3), None, KD(0.5, 4.0, False), teacher_table=taught.table)
    loader = adapter.fit_arguments(data, indexed=True)["train_dataloaders"]
    for x, _, index in loader:
        with torch.no_grad():
            torch.testing.assert_close(
                cached.teacher_logits(x, index), live.teacher_logits(x, index), rtol=0, atol=1e-6
            )
    again = outputs.for_run(AUTO, "cpu", Teacher(teacher, "key", "hit", tmp_path), data, KD(0.5, 4.0, False))
    assert again.source == "hit" and torch.equal(again.table, taught.table)
    assert adapter.fit_arguments(data, indexed=False) == {"datamodule": data}


@pytest.mark.parametrize(
    ("kind", "module", "reason"),
    [
        ("jittered", Plain, "training sample 0 differs between two reads (a random transform?)"),
        ("stream", Plain, "the training set of Plain is an IterableDataset (Stream): its samples have no index"),
        ("tensor", Transferring, "Transferring overrides on_after_batch_transfer"),
    ],
)
def test_where_a_table_cannot_stand_in_the_teacher_runs_live_and_the_log_says_why(
    kind, module, reason, tmp_path, caplog
):
    data = module(kind)
    ready(data)
    teacher = Teach()
    calls: list[int] = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    with caplog.at_level(logging.INFO, logger="distillab.steps.teacher.outputs"):
        taught = outputs.for_run(AUTO, "cpu", Teacher(teacher, "key", "miss", tmp_path), data, KD(0.5, 4.0, False))
    assert taught.mode == "live" and taught.table is None and not calls
    assert f"teacher outputs: live: {reason}" in caplog.text
    assert len([r for r in caplog.records if r.message.startswith("teacher outputs:")]) == 1
    cached = outputs.OutputSettings(cache="cached", dtype="float32", top_k=None)
    with pytest.raises(ConfigError, match=r"^teacher_outputs.cache=cached is not allowed here: "):
        outputs.decide(cached, data, KD(0.5, 4.0, False))


def test_inputs_that_change_between_passes_are_never_stored(tmp_path, caplog):
    """A random dataset the probe misses (a sample changes from one pass to the next, not between the
    probe's reads) is caught by the second pass over the training set, and no table is stored."""

    class EveryOtherPass(LabelsApart):
        def __getitem__(self, index: int) -> tuple[Tensor, int]:
            x, y = super().__getitem__(index)
            return x + (self.reads // 120) % 2, y

    data = Plain("apart")
    ready(data)
    data.train_set = EveryOtherPass(data.x, data.y)  # the probe reads 8 samples, then two passes of 120 follow
    with caplog.at_level(logging.INFO, logger="distillab.steps.teacher.outputs"):
        taught = outputs.for_run(AUTO, "cpu", Teacher(Teach(), "key", "miss", tmp_path), data, KD(0.5, 4.0, False))
    assert taught.mode == "live" and "teacher outputs: live: two passes over the training set gave different" in (
        caplog.text
    )
    assert not list(tmp_path.rglob("*.pt"))


# -- the example, from the command line ------------------------------------------------------------------
def test_the_plain_datamodule_example_runs_from_another_folder(tmp_path):
    run_dir, workdir = tmp_path / "run", tmp_path / "elsewhere"
    workdir.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLE), str(ROOT / "src")])}
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "--config-dir",
        str(EXAMPLE / "conf"),
        "data=my_data",
        "trainer.max_epochs=2",
        "teacher.recipe.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "num_threads=1",
        f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "ok" and record["dataset"] == "MyDataModule"
    results.check(record)
    # the inferred input (1, 12, 12) and 4 classes size the MLP[32] student
    assert record["student"]["params"] == 144 * 32 + 32 + 32 * 4 + 4
    assert record["teacher"]["outputs"] == "cached"
    log = done.stdout + done.stderr
    assert "data MyDataModule: input (1, 12, 12), 4 classes; 420 training samples" in log
    assert "teacher outputs: cached: the training inputs are deterministic (MyDataModule's training set is " in log
    readme = (EXAMPLE / "README.md").read_text()
    assert (
        "PYTHONPATH=examples/my_datamodule python train.py --config-dir examples/my_datamodule/conf data=my_data"
        in readme
    )


def test_the_example_is_a_plain_datamodule():
    source = (EXAMPLE / "my_data.py").read_text()
    assert "distillab" not in source.split('"""', 2)[2]  # nothing imported or used from distillab
    sys.path.insert(0, str(EXAMPLE))
    try:
        from my_data import MyDataModule
    finally:
        sys.path.remove(str(EXAMPLE))
    for member in ("name", "describe", "shuffle_seed", "input_shape"):
        assert not hasattr(MyDataModule, member) or getattr(MyDataModule, member) is None, member
    assert Path(EXAMPLE / "conf" / "data" / "my_data.yaml").is_file()
