"""Any LightningDataModule as the data of a run.

A datamodule needs nothing but Lightning's own contract: ``setup`` and the three dataloaders,
whose batches are ``(inputs, labels)`` pairs (int64 class indices). What the run needs beyond
that is read from the datamodule when it has it and inferred otherwise (``prepare``):

- ``input_shape``: the attribute, else the shape of one sample of the first training batch;
- ``num_classes``: the attribute, else the largest training label + 1, from the training set's
  labels when it keeps them apart (``targets`` or ``labels`` lists or tensors, a
  ``TensorDataset``, a ``Subset`` or ``ConcatDataset`` of those), else from one pass over the
  training batches;
- ``name``: the attribute, else the class name;
- the order of training batches follows the run's seed: a ``shuffle_seed`` attribute is set to
  it; a DataLoader built with ``shuffle=True`` and no ``generator`` of its own draws its order
  from torch's global generator, which the run seeds (``pl.seed_everything(seed)``) right before
  each fit, so it follows the seed too. A loader with a generator seeded by a constant does not.

Cached teacher outputs (``teacher.outputs``) need each training sample's index in the batch.
The built-in datamodules (``InMemoryDataModule``) serve ``(x, y, index)`` themselves. For any
other datamodule whose training set is map-style, ``fit_arguments`` trains on a copy of its
training DataLoader over ``IndexedDataset(dataset)`` (same sampler, batch size, workers, collate
function, …) whose batches are ``(x, y, index)``; ``index_obstacle`` says when that cannot stand
in for the datamodule: an iterable training set, samples that differ from one read to the next
(random transforms), or batch-transfer hooks that may change the batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset, IterableDataset, Subset, TensorDataset

from distillab.data.base import InMemoryDataModule
from distillab.settings import ConfigError

log = logging.getLogger(__name__)

#: LightningDataModule hooks that may change a batch between the DataLoader and the step
TRANSFER_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")
#: samples read twice under different random states to tell whether the training set is random
PROBES = 4


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What the run knows of its data: a name, the shape of one input, the number of classes."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    description: str


# -- what the run reads from the datamodule ---------------------------------------------------------
def prepare(data: Any, seed: int) -> DataInfo:
    """Set ``data`` up for a run with ``seed`` and tell what it holds (one line, for the log).

    Reading the data here draws no random numbers from the run's generators: the student's
    initial weights depend on the seed alone, whatever the datamodule does."""
    if hasattr(data, "prepare_data"):
        data.prepare_data()
    data.setup("fit")
    if hasattr(data, "shuffle_seed"):
        data.shuffle_seed = int(seed)
    name = str(_attribute(data, "name") or type(data).__name__)
    with preserved_rng():
        batch = first_batch(data)
        input_shape = _shape(_attribute(data, "input_shape")) or tuple(int(d) for d in batch[0].shape[1:])
        num_classes = _count(_attribute(data, "num_classes")) or infer_num_classes(data)
    describe = getattr(data, "describe", None)
    description = describe() if callable(describe) else _describe(data, name, input_shape, num_classes)
    return DataInfo(name, input_shape, num_classes, description)


def _attribute(data: Any, name: str) -> Any:
    """``data.<name>``, or None when it is missing or fails (a property that needs more set-up)."""
    try:
        return getattr(data, name, None)
    except Exception as error:  # noqa: BLE001 - a failing property is as good as none: infer it
        log.debug("data: %s.%s failed (%r); inferring it", type(data).__name__, name, error)
        return None


def _shape(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, torch.Size) or (isinstance(value, Sequence) and not isinstance(value, str)):
        if len(value) and all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in value):
            return tuple(int(d) for d in value)
    return None


def _count(value: Any) -> int | None:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1:
        return int(value)
    return None


def _describe(data: Any, name: str, input_shape: tuple[int, ...], num_classes: int) -> str:
    dataset = getattr(data.train_dataloader(), "dataset", None)
    try:
        size = f"; {len(dataset)} training samples"
    except TypeError:  # an iterable dataset, or a loader without one
        size = ""
    return f"{name}: input {input_shape}, {num_classes} classes{size}"


def first_batch(data: Any) -> Sequence[Tensor]:
    """The first training batch, checked to be ``(inputs, labels)`` (``(x, y, index)`` from an
    ``InMemoryDataModule``)."""
    batch = next(iter(data.train_dataloader()))
    sizes = (3,) if isinstance(data, InMemoryDataModule) else (2,)
    if (
        not isinstance(batch, (tuple, list))
        or len(batch) not in sizes
        or not all(isinstance(part, Tensor) for part in batch)
    ):
        what = (
            f"a {len(batch)}-element {type(batch).__name__}"
            if isinstance(batch, (tuple, list))
            else (f"a {type(batch).__name__}")
        )
        raise ConfigError(
            f"data: the training batches of {type(data).__name__} must be (inputs, labels) pairs "
            f"of tensors; the first one is {what}"
        )
    return batch


def example(data: Any, size: int = 8) -> Tensor:
    """A few training inputs (to trace shapes and check models before any training)."""
    with preserved_rng():
        return first_batch(data)[0][:size]


def infer_num_classes(data: Any) -> int:
    """The largest training label + 1: from the training set's labels when it keeps them apart
    (``dataset_labels``), else from one pass over the training batches."""
    loader = data.train_dataloader()
    labels = dataset_labels(getattr(loader, "dataset", None))
    if labels is None:
        log.info("data: %s has no num_classes; reading the training labels batch by batch", type(data).__name__)
        labels = torch.cat([torch.as_tensor(batch[1]).reshape(-1) for batch in loader])
    if labels.numel() == 0:
        raise ConfigError(f"data: {type(data).__name__} has no num_classes and no training labels to count")
    return int(labels.max()) + 1


def dataset_labels(dataset: Any) -> Tensor | None:
    """All labels of a map-style dataset, in index order, when it keeps them apart from the
    inputs (read without loading a single input); None otherwise."""
    if dataset is None or isinstance(dataset, IterableDataset):
        return None
    if isinstance(dataset, Subset):
        inner = dataset_labels(dataset.dataset)
        return None if inner is None else inner[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    if isinstance(dataset, ConcatDataset):
        parts = [dataset_labels(part) for part in dataset.datasets]
        return None if any(part is None for part in parts) else torch.cat(parts)
    if isinstance(dataset, TensorDataset):
        return _labels(dataset.tensors[1], len(dataset)) if len(dataset.tensors) >= 2 else None
    for name in ("targets", "labels"):
        labels = _labels(getattr(dataset, name, None), len(dataset) if hasattr(dataset, "__len__") else -1)
        if labels is not None:
            return labels
    return None


def _labels(value: Any, count: int) -> Tensor | None:
    """``value`` as a 1-d int64 tensor of ``count`` class indices, or None if it is not one."""
    if value is None:
        return None
    try:
        labels = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    if labels.ndim != 1 or len(labels) != count or labels.is_floating_point() or labels.dtype == torch.bool:
        return None
    return labels.long()


# -- sample indices for cached teacher outputs --------------------------------------------------
def serves_indices(data: Any) -> bool:
    """Whether ``data``'s own training batches are ``(x, y, index)`` (the in-memory fast path)."""
    return isinstance(data, InMemoryDataModule)


class IndexedDataset(Dataset):
    """``dataset`` with each sample's index appended: item ``i`` is ``(*dataset[i], i)``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        sample = self.dataset[index]
        if not isinstance(sample, (tuple, list)):
            raise TypeError(f"sample {index} is a {type(sample).__name__}, not an (input, label) pair")
        return (*sample, index)


class IndexedCollate:
    """Collates ``(*sample, index)`` items with the loader's own ``collate_fn`` (which sees the
    samples as they were) and appends the indices: the batch ``(x, y)`` becomes ``(x, y, index)``.
    A class, not a closure, so that it pickles for worker processes."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: list[tuple[Any, ...]]) -> tuple[Any, ...]:
        batch = self.collate_fn([tuple(item[:-1]) for item in items])
        index = torch.as_tensor([int(item[-1]) for item in items], dtype=torch.long)
        return (*batch, index)


def indexed_loader(loader: DataLoader) -> DataLoader:
    """A DataLoader like ``loader`` (same sampler or batch sampler, so the same batches in the same
    order; batch size, drop_last, workers, collate function, pinning, generator) whose batches
    carry the sample indices: ``(x, y, index)``."""
    options: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": IndexedCollate(loader.collate_fn),
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
        "persistent_workers": loader.persistent_workers,
        "pin_memory_device": loader.pin_memory_device,
        "in_order": getattr(loader, "in_order", True),
    }
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
    if loader.batch_size is not None:  # the loader made its batch sampler from these
        options.update(batch_size=loader.batch_size, sampler=loader.sampler, drop_last=loader.drop_last)
    else:
        options["batch_sampler"] = loader.batch_sampler
    return DataLoader(IndexedDataset(loader.dataset), **options)


class InputsInOrder:
    """The inputs of a map-style training set in index order, batch by batch (each iteration is a
    fresh pass, with the training loader's batch size, workers and collate function); ``len()``
    is the number of samples. What the teacher's table is computed from."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader.dataset)

    def __iter__(self) -> Iterator[Tensor]:
        loader = self.loader
        ordered = DataLoader(
            loader.dataset,
            batch_size=loader.batch_size or 128,
            shuffle=False,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context,
        )
        for batch in ordered:
            yield batch[0]


def train_size(data: Any) -> int | None:
    """The number of training samples, or None when the training set is not map-style."""
    if serves_indices(data):
        return len(data.splits["train"][0])
    dataset = getattr(data.train_dataloader(), "dataset", None)
    try:
        return len(dataset) if dataset is not None and not isinstance(dataset, IterableDataset) else None
    except TypeError:
        return None


def training_inputs(data: Any) -> Tensor | InputsInOrder:
    """The training inputs, row ``i`` (or the ``i``-th sample of the passes) for sample index ``i``."""
    if serves_indices(data):
        return data.splits["train"][0]
    return InputsInOrder(data.train_dataloader())


def index_obstacle(data: Any) -> str | None:
    """Why the training batches of ``data`` cannot be served with sample indices and inputs that are
    the same in every epoch, or None when they can."""
    name = type(data).__name__
    if serves_indices(data):
        return None
    if getattr(data, "augments", False) is True:  # a datamodule that says so (image folders): no need to probe
        return f"the training batches of {name} are randomly augmented, so the teacher's inputs change every epoch"
    hooks = [hook for hook in TRANSFER_HOOKS if _overrides(data, hook)]
    if hooks:
        return f"{name} overrides {hooks[0]}, which may change training batches on their way to the model"
    loader = data.train_dataloader()
    if not isinstance(loader, DataLoader):
        return f"{name}.train_dataloader() returns a {type(loader).__name__}, not a torch DataLoader"
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        return f"the training set of {name} is an IterableDataset ({type(dataset).__name__}): its samples have no index"
    if loader.batch_size is None and loader.batch_sampler is None:
        return f"the training DataLoader of {name} does not batch samples (batch_size=None)"
    try:
        size = len(dataset)
    except TypeError:
        return f"the training set of {name} ({type(dataset).__name__}) has no length"
    if size == 0:
        return f"the training set of {name} is empty"
    return _random_samples(dataset, size)


def _overrides(data: Any, hook: str) -> bool:
    return getattr(type(data), hook, None) is not getattr(pl.LightningDataModule, hook)


def _random_samples(dataset: Any, size: int) -> str | None:
    """Why the samples of ``dataset`` are not the same on every read, or None: a few are read
    twice, under different random states of torch, numpy and ``random``."""
    picks = sorted({round(i * (size - 1) / max(PROBES - 1, 1)) for i in range(PROBES)})
    reads = []
    for seed in (1, 2):
        with preserved_rng():
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)
            reads.append([dataset[i] for i in picks])
    for index, first, second in zip(picks, *reads):
        if not isinstance(first, (tuple, list)) or len(first) != 2:
            return f"training sample {index} is a {type(first).__name__}, not an (input, label) pair"
        if not _same(first, second):
            return (
                f"training sample {index} differs between two reads (a random transform?), so the teacher's "
                "inputs change every epoch"
            )
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (Tensor, np.ndarray)) or isinstance(b, (Tensor, np.ndarray)):
        try:
            return torch.equal(torch.as_tensor(a), torch.as_tensor(b))
        except (TypeError, RuntimeError):
            return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an object without equality (an image): compare its bytes
        return np.array_equal(np.asarray(a), np.asarray(b))


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without consuming the random states of torch (CPU), numpy and ``random``."""
    state = (random.getstate(), np.random.get_state())
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])


# -- the fit ---------------------------------------------------------------------------------------
def fit_arguments(data: Any, indexed: bool) -> dict[str, Any]:
    """What ``Trainer.fit`` gets besides the module: the datamodule itself, or, when the student
    reads cached teacher outputs (``indexed``) from a datamodule that does not serve sample
    indices, its training loader with indices (``indexed_loader``) and its validation loader."""
    if not indexed or serves_indices(data):
        return {"datamodule": data}
    return {"train_dataloaders": indexed_loader(data.train_dataloader()), "val_dataloaders": data.val_dataloader()}
