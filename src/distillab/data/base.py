"""In-memory datasets with a fast batch path.

For data that fits in memory as tensors (digits is 1,797 8×8 images) a DataLoader's
per-sample indexing and collation costs more than the student's whole step, so batches are
sliced from preloaded tensors instead: one index op per batch, no workers.

``InMemoryDataModule`` is that path (any split held as tensors); ``ArrayDataModule`` adds the
stratified train/val/test split of one array by fractions (digits, synthetic). Their settings
are the typed parameters of their constructors (``distillab.settings``); the values are in
``conf/data/<name>.yaml``, the one place a default is written.
"""

from __future__ import annotations

import abc
import contextlib
import logging
from collections.abc import Iterator
from typing import Annotated, Any

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.model_selection import train_test_split
from torch import Tensor

from distillab.labels import hide_labels, labelled_subset
from distillab.settings import ConfigError, Count, Fraction, Range, Seed, checked

log = logging.getLogger(__name__)

#: the share of the training labels the student sees
LabelledFraction = Annotated[
    float, Range(0, 1, low_open=True, what="a fraction", note="of the training labels the student sees; 1 = all")
]


class TensorBatches:
    """An iterable of ``(x, y, index)`` batches sliced from in-memory tensors.

    ``index`` is each sample's position in the split, so per-sample data (cached teacher
    outputs, label masks) can be looked up. Under distributed training each rank takes a
    disjoint, equal-sized shard of every epoch's permutation, as a DistributedSampler would.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def _indices(self) -> Tensor:
        n = len(self.y)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            per_rank = -(-n // self.world_size)
            order = torch.cat([order, order[: per_rank * self.world_size - n]])
            order = order[self.rank :: self.world_size]
        return order

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        order = self._indices()
        self.epoch += 1
        stop = len(order) - (len(order) % self.batch_size if self.drop_last else 0)
        for start in range(0, stop, self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.x[index], self.y[index], index

    def __len__(self) -> int:
        n = -(-len(self.y) // self.world_size)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of a fixed-seed stratified train/val/test split of ``labels``: ``val_fraction`` and
    ``test_fraction`` of the samples (0: that split is not cut, its indices are empty)."""
    labels = np.asarray(labels)
    index, none = np.arange(len(labels)), np.arange(0)
    holdout = val_fraction + test_fraction
    if holdout == 0:
        return index, none, none
    train_idx, rest_idx = train_test_split(index, test_size=holdout, stratify=labels, random_state=seed)
    if val_fraction == 0 or test_fraction == 0:
        return (train_idx, rest_idx, none) if test_fraction == 0 else (train_idx, none, rest_idx)
    val_idx, test_idx = train_test_split(
        rest_idx, test_size=test_fraction / holdout, stratify=labels[rest_idx], random_state=seed
    )
    return train_idx, val_idx, test_idx


class AugmentationSwitch:
    """A teacher's recipe may switch augmentation (``use_augment``) for a while: the teacher may
    train on jittered inputs the student never sees."""

    use_augment: bool

    @contextlib.contextmanager
    def augmentation(self, enabled: bool | None) -> Iterator[None]:
        """Switch augmentation on or off for a while (None keeps the dataset's setting)."""
        saved = self.use_augment
        if enabled is not None:
            self.use_augment = bool(enabled)
        try:
            yield
        finally:
            self.use_augment = saved


class LabelSwitch(abc.ABC):
    """The share of training labels a datamodule serves (``labelled_fraction``), and the recipe's
    switch to serve another share for a while: the teacher may learn from every label while the
    student sees a fraction. The subset is drawn by ``split_seed`` alone (``labels.labelled_subset``)."""

    def _init_labels(self, labelled_fraction: float, split_seed: int) -> None:
        self.split_seed = int(split_seed)
        self.labelled_fraction = float(labelled_fraction)
        self._serving_fraction = self.labelled_fraction  # the share of labels the train loader yields now
        self._labelled_masks: dict[float, Tensor] = {}

    @abc.abstractmethod
    def training_targets(self) -> Tensor:
        """The training split's targets, in the order its samples are indexed."""

    def labelled_mask(self, fraction: float | None = None) -> Tensor:
        """Which training samples keep their label at ``fraction`` (None: ``labelled_fraction``)."""
        fraction = self.labelled_fraction if fraction is None else float(fraction)
        if fraction not in self._labelled_masks:
            self._labelled_masks[fraction] = labelled_subset(self.training_targets(), fraction, self.split_seed)
        return self._labelled_masks[fraction]

    @contextlib.contextmanager
    def labelled(self, fraction: float | None) -> Iterator[None]:
        """Serve the labels of ``fraction`` of the training split for a while (None: all of them)."""
        saved = self._serving_fraction
        self._serving_fraction = 1.0 if fraction is None else float(fraction)
        try:
            yield
        finally:
            self._serving_fraction = saved

    def served_targets(self, targets: Tensor) -> Tensor:
        """The training targets as the train loader yields them now: hidden outside the served share."""
        if self._serving_fraction < 1:
            return hide_labels(targets, self.labelled_mask(self._serving_fraction))
        return targets


@checked
class InMemoryDataModule(pl.LightningDataModule, AugmentationSwitch, LabelSwitch):
    """Base class of the built-in datamodules: train/val/test splits held as tensors, served
    by ``TensorBatches`` (batches ``(x, y, index)``, so cached teacher outputs need no wrapper),
    with switches for the teacher's recipe (``augmentation``, ``labelled``). A subclass
    implements ``make_splits()`` (``ArrayDataModule`` by fractions of one array; the vision
    datamodules from the official training and test sets).

    The split depends on ``split_seed`` only, not on the run's ``seed``, so every seed of a
    sweep (and the cached teacher) sees the same train/val/test samples; the order of training
    batches follows ``shuffle_seed``, which the run sets to its seed.

    ``labelled_fraction`` < 1 keeps the labels of that share of the training split only (a
    stratified subset drawn with ``split_seed``, see ``distill.labels.labelled_subset``): the
    training loader then yields ``UNLABELLED`` targets for the others. ``labelled(fraction)``
    serves another share for a while (the teacher trains on all labels by default).
    """

    name = "in_memory"

    def __init__(
        self, batch_size: Count, eval_batch_size: Count, split_seed: Seed, labelled_fraction: LabelledFraction
    ) -> None:
        super().__init__()
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self._init_labels(labelled_fraction, split_seed)
        self._splits: dict[str, tuple[Tensor, Tensor]] = {}
        self.shuffle_seed = 0
        self.use_augment = True  # datasets with an `augment` option set it from there

    @abc.abstractmethod
    def make_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{"train"|"val"|"test": (x, y)}``: float32 inputs and int64 labels of each split."""

    @property
    def splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{"train"|"val"|"test": (x, y)}``, loaded on first use."""
        self.setup()
        return self._splits

    def setup(self, stage: str | None = None) -> None:
        if not self._splits:
            self._splits = self.make_splits()

    def augment(self, x: Tensor) -> Tensor:
        """Random augmentation of a training batch, on its device (none by default)."""
        return x

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training and self.augments:
            x, *rest = batch
            return (self.augment(x), *rest)
        return batch

    @property
    def augments(self) -> bool:
        """Whether training batches are randomly transformed (then inputs are not deterministic)."""
        return self.use_augment and type(self).augment is not InMemoryDataModule.augment

    def training_targets(self) -> Tensor:
        return self.splits["train"][1]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.splits["train"][0].shape[1:])

    @property
    def num_classes(self) -> int:
        return int(self.splits["train"][1].max()) + 1

    @property
    def split_sizes(self) -> dict[str, int]:
        return {name: len(y) for name, (_, y) in self.splits.items()}

    def _distributed(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _batches(self, split: str, shuffle: bool, batch_size: int) -> TensorBatches:
        x, y = self.splits[split]
        if split == "train":
            y = self.served_targets(y)
        rank, world = self._distributed() if shuffle else (0, 1)
        return TensorBatches(x, y, batch_size, shuffle, self.shuffle_seed, rank=rank, world_size=world)

    def train_dataloader(self) -> TensorBatches:
        return self._batches("train", True, self.batch_size)

    def val_dataloader(self) -> TensorBatches:
        return self._batches("val", False, self.eval_batch_size)

    def test_dataloader(self) -> TensorBatches:
        return self._batches("test", False, self.eval_batch_size)

    def describe(self) -> str:
        sizes = self.split_sizes
        return (
            f"{self.name}: {sum(sizes.values())} samples, input {self.input_shape}, "
            f"{self.num_classes} classes; split train/val/test = "
            f"{sizes['train']}/{sizes['val']}/{sizes['test']} (split_seed={self.split_seed})" + self._describe_labels()
        )

    def _describe_labels(self) -> str:
        if self.labelled_fraction >= 1:
            return ""
        count, total = int(self.labelled_mask().sum()), self.split_sizes["train"]
        return f"; labels for {count} of {total} training samples (labelled_fraction={self.labelled_fraction:g})"


@checked
class ArrayDataModule(InMemoryDataModule):
    """A dataset that fits in memory as arrays: a subclass implements ``load_arrays()`` returning
    all features and labels; this class makes the fixed-seed stratified train/val/test split
    (``val_fraction``, ``test_fraction`` of the samples) and optionally standardises the inputs
    with the training split's statistics (``normalize``)."""

    def __init__(self, val_fraction: Fraction, test_fraction: Fraction, normalize: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        total = val_fraction + test_fraction
        if total >= 1:
            raise ConfigError(
                f"val_fraction={val_fraction!r} is not allowed: val_fraction + test_fraction "
                f"must be < 1 (now {total:g})"
            )
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.normalize = bool(normalize)

    @abc.abstractmethod
    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All features (N, C, H, W) or (N, D) and integer labels (N,) of the dataset."""

    def make_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Stratified train/val/test split of ``load_arrays()``, normalised with statistics of
        the training split only, so nothing leaks from val/test."""
        x, y = self.load_arrays()
        train_idx, val_idx, test_idx = stratified_split(y, self.val_fraction, self.test_fraction, self.split_seed)
        x = torch.as_tensor(x, dtype=torch.float32)
        y = torch.as_tensor(y, dtype=torch.long)
        if self.normalize:
            mean, std = x[train_idx].mean(), x[train_idx].std().clamp_min(1e-8)
            x = (x - mean) / std
        splits = {}
        for name, idx in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
            idx = torch.as_tensor(np.sort(idx))
            splits[name] = (x[idx].contiguous(), y[idx].contiguous())
        return splits
