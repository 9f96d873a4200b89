"""Image folders larger than memory: torchvision's ``ImageFolder`` layout, decoded in workers.

``<root>/<train_dir>/<class>/<image>`` (and the same under ``val_dir`` and ``test_dir`` when they
exist): one subfolder per class, named by the class; classes are numbered in sorted order of their
names, as torchvision's ``ImageFolder`` numbers them. A split without its folder is drawn from the
training folder: ``val_size`` (``test_size``) images, stratified by class, chosen with
``split_seed`` only, so every seed of a sweep and the cached teacher see the same split.

Files are read and decoded in the DataLoader's worker processes (``num_workers``) by
``torchvision.io.decode_image`` (libjpeg-turbo for JPEG; also PNG, WebP, GIF), always to RGB;
each decoded uint8 image goes straight to its crop: training takes a RandomResizedCrop of
``crop_size`` (scale ``min_scale``..1) and a random horizontal flip, evaluation resizes the
shorter side to ``resize_size`` and takes the centre ``crop_size`` square; then
``(pixel / 255 - mean) / std`` per channel (``mean``, ``std``: ImageNet's by default). Batches
are ``(images, targets)``; a method that needs sample indices gets them through
``data.adapter.fit_arguments``.

Bad input is found when it can be known: an empty folder, a class folder without images and
validation or test classes that differ from training's when the module is set up; a file that
does not decode when it is read, in its worker: ``bad_images=fail`` stops with one line naming
the file, ``skip`` logs it once and serves the next readable image instead.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from distillab.data.base import AugmentationSwitch, LabelSwitch
from distillab.data.vision import stratified_subset
from distillab.settings import ConfigError, Count, NonNegativeCount, Range, Seed, checked

log = logging.getLogger(__name__)

#: what ``torchvision.io.decode_image`` reads; other files in a class folder are ignored, as by ImageFolder
EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif")
#: statistics of ImageNet's training set, the usual constants (torchvision's reference scripts)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "val", "test")
PRIME = 1_000_003  # apart the crop seeds of DDP ranks

Pixels = Annotated[int, Range(8, note="pixels")]
Scale = Annotated[float, Range(0, 1, low_open=True, what="a fraction", note="of the image's area")]
LabelledFraction = Annotated[
    float, Range(0, 1, low_open=True, what="a fraction", note="of the training labels the student sees; 1 = all")
]


class BadImage(ConfigError):
    """A file that does not decode: one line naming it.

    Raised in a DataLoader worker, the exception reaches the main process rebuilt by torch as
    ``BadImage("Caught BadImage in DataLoader worker process 0.\\nOriginal Traceback ...")``; the
    message is then cut back to the original line, so that the run still fails in one line."""

    def __init__(self, message: str) -> None:
        if message.startswith("Caught "):
            lines = [line for line in message.splitlines() if line.strip()]
            message = re.sub(r"^[\w.]*BadImage: ", "", lines[-1])
        super().__init__(message)


# -- the folder ------------------------------------------------------------------------------------
def scan(folder: Path, key: str) -> tuple[list[str], list[tuple[str, int]]]:
    """``(classes, samples)`` of an ImageFolder-layout ``folder``: class names in sorted order and
    ``(path, class index)`` of every image, sorted by path within a class. ``key`` names the
    setting that chose the folder, for the one-line errors."""
    if not folder.is_dir():
        raise ConfigError(f"{key}: no folder {folder}")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise ConfigError(f"{key}: {folder} is empty: it needs one subfolder of images per class")
    samples = []
    for index, name in enumerate(classes):
        images = sorted(
            entry.path
            for entry in os.scandir(folder / name)
            if entry.is_file() and entry.name.lower().endswith(EXTENSIONS)
        )
        if not images:
            raise ConfigError(
                f"{key}: the class folder {folder / name} has no images (files ending in {', '.join(EXTENSIONS)})"
            )
        samples.extend((path, index) for path in images)
    return classes, samples


def same_classes(train: list[str], other: list[str], key: str, folder: Path) -> None:
    """A validation or test folder must hold exactly the training folder's classes."""
    if other != train:
        missing, extra = sorted(set(train) - set(other)), sorted(set(other) - set(train))
        parts = [f"lacks {_few(missing)}" if missing else "", f"has {_few(extra)} not in train" if extra else ""]
        detail = "; ".join(p for p in parts if p)
        raise ConfigError(f"{key}: the classes of {folder} differ from the training folder's: it {detail}")


def _few(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def split_folders(
    root: Path,
    train_dir: str,
    val_dir: str | None,
    test_dir: str | None,
    val_size: int,
    test_size: int,
    split_seed: int,
) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """``(classes, {"train"|"val"|"test": samples})``: each split from its folder when it has one,
    else drawn from the training folder (stratified, ``split_seed``), by the rules of the module doc."""
    classes, train = scan(root / train_dir, f"data.train_dir={train_dir}")
    splits: dict[str, list[tuple[str, int]]] = {}
    drawn: dict[str, int] = {}
    for split, folder_name, size in (("val", val_dir, val_size), ("test", test_dir, test_size)):
        folder = root / folder_name if folder_name else None
        if folder is not None and folder.exists():
            found, samples = scan(folder, f"data.{split}_dir={folder_name}")
            same_classes(classes, found, f"data.{split}_dir={folder_name}", folder)
            splits[split] = samples
        elif size > 0:
            drawn[split] = size
        else:
            where = f"no folder {folder}" if folder is not None else f"data.{split}_dir=null"
            raise ConfigError(
                f"data.{split}_size=0 is not allowed here: {where}, so the {split} split is drawn from "
                f"the training folder; set data.{split}_size to a number of images > 0"
            )
    if sum(drawn.values()) >= len(train):
        raise ConfigError(
            f"data.val_size/test_size: {sum(drawn.values())} images to draw from the {len(train)} of "
            f"{root / train_dir}: leave some for training"
        )
    labels = np.array([label for _, label in train])
    keep = np.ones(len(train), dtype=bool)
    for offset, (split, size) in enumerate(drawn.items()):
        rest = np.flatnonzero(keep)
        chosen = rest[stratified_subset(labels[rest], size, split_seed + offset)]
        splits[split] = [train[i] for i in chosen]
        keep[chosen] = False
    splits["train"] = [train[i] for i in np.flatnonzero(keep)]
    return classes, {name: splits[name] for name in SPLITS}


def decode_error(error: BaseException) -> str:
    """What a decoder's error says, in a few words: its first sentence, without the C++ source location."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return re.sub(r"^\w+, \S+:\d+, ", "", text).split(". ")[0][:120]


# -- decoding and transforms -----------------------------------------------------------------------
def read_image(path: str) -> Tensor:
    """The file at ``path`` decoded to a uint8 RGB tensor (3, H, W)."""
    return decode_image(torch.from_numpy(np.fromfile(path, dtype=np.uint8)), mode=ImageReadMode.RGB)


def train_transform(crop_size: int, min_scale: float) -> v2.Compose:
    """RandomResizedCrop + horizontal flip of a uint8 image; a uint8 crop."""
    return v2.Compose(
        [v2.RandomResizedCrop(crop_size, scale=(min_scale, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    )


def eval_transform(resize_size: int, crop_size: int) -> v2.Compose:
    """Resize of the shorter side + centre crop of a uint8 image; a uint8 crop."""
    return v2.Compose([v2.Resize(resize_size, antialias=True), v2.CenterCrop(crop_size)])


class NormalisedBatch:
    """The collate function of the image loaders: stacks ``(uint8 crop, target)`` samples and turns the
    batch into float32 ``(pixel / 255 - mean) / std`` per channel, in place, in the worker's shared
    memory. Normalising the batch once instead of each image keeps a worker's memory traffic to one
    float batch (each float image would be a fresh allocation of its own, and the batch a second
    copy): half the page faults per image (``benchmarks/README.md``, ``data_throughput.py``)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.scale = torch.tensor([1 / (255 * s) for s in std]).view(1, -1, 1, 1)
        self.shift = torch.tensor([m / s for m, s in zip(mean, std)]).view(1, -1, 1, 1)

    def __call__(self, samples: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
        shape = (len(samples), *samples[0][0].shape)
        if get_worker_info() is None:
            batch = torch.empty(shape, dtype=torch.float32)
        else:  # written straight into shared memory, in which it goes to the main process (as default_collate)
            empty = torch.empty(0, dtype=torch.float32)
            batch = empty.new(empty._typed_storage()._new_shared(math.prod(shape))).view(shape)
        for row, (image, _) in zip(batch, samples):
            row.copy_(image)
        targets = torch.tensor([int(target) for _, target in samples], dtype=torch.long)
        return batch.mul_(self.scale).sub_(self.shift), targets


class ImageFiles(Dataset):
    """Image files with their class indices: item ``i`` is ``(transform(decoded file i), target i)``,
    a uint8 crop (``NormalisedBatch`` normalises the batch).

    Paths are held in one numpy array rather than a list of Python strings, so that forked
    workers do not copy them page by page as they touch their reference counts."""

    def __init__(
        self,
        paths: Sequence[str],
        targets: Tensor,
        transform: Callable[[Tensor], Tensor],
        bad_images: str = "fail",
        decode: Callable[[str], Tensor] = read_image,
    ) -> None:
        self.paths = np.array(paths, dtype=np.str_)
        self.targets = targets
        self.transform, self.bad_images, self.decode = transform, bad_images, decode
        self._skipped: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        for attempt in range(len(self.paths)):
            i = (int(index) + attempt) % len(self.paths)
            if i in self._skipped:
                continue
            try:
                image = self.decode(str(self.paths[i]))
            except (RuntimeError, OSError, ValueError) as error:
                self._bad(i, error)
                continue
            return self.transform(image), int(self.targets[i])
        raise BadImage(f"data: none of the {len(self.paths)} files of this split decodes as an image")

    def _bad(self, i: int, error: BaseException) -> None:
        path, cause = str(self.paths[i]), decode_error(error)
        if self.bad_images == "fail":
            raise BadImage(
                f"data: {path} does not decode as an image ({cause}); replace or remove it, or set "
                "data.bad_images=skip to skip such files"
            )
        log.warning("data: skipping %s: it does not decode as an image (%s)", path, cause)
        self._skipped.add(i)


# -- the datamodules -------------------------------------------------------------------------------
@checked
class ImageDataModule(pl.LightningDataModule, AugmentationSwitch):
    """What image folders and image shards share: the transforms, their switch, the loaders' workers."""

    def __init__(
        self,
        root: str | Path,
        name: str,
        crop_size: Pixels,
        resize_size: Pixels,
        min_scale: Scale,
        augment: bool,
        mean: list[float],
        std: list[float],
        batch_size: Count,
        eval_batch_size: Count,
        num_workers: NonNegativeCount,
        pin_memory: bool,
        persistent_workers: bool,
        prefetch_factor: Count,
        bad_images: Literal["fail", "skip"],
    ) -> None:
        super().__init__()
        self.root = Path(os.path.expanduser(str(root))).absolute()
        self.name = str(name)
        self.crop_size, self.resize_size, self.min_scale = int(crop_size), int(resize_size), float(min_scale)
        if self.resize_size < self.crop_size:
            raise ConfigError(
                f"data.resize_size={self.resize_size} is not allowed: it must be at least crop_size={self.crop_size}"
            )
        self.use_augment = bool(augment)
        self.mean, self.std = check_statistics(mean, std)
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.num_workers, self.pin_memory = int(num_workers), bool(pin_memory)
        self.persistent_workers, self.prefetch_factor = bool(persistent_workers), int(prefetch_factor)
        self.bad_images = str(bad_images)
        self.shuffle_seed = 0

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.crop_size, self.crop_size)

    @property
    def augments(self) -> bool:
        """Whether training batches are random crops (then the inputs differ every epoch)."""
        return self.use_augment

    def transform(self, train: bool) -> v2.Compose:
        if train and self.use_augment:
            return train_transform(self.crop_size, self.min_scale)
        return eval_transform(self.resize_size, self.crop_size)

    def loader_options(self) -> dict[str, Any]:
        """Workers, pinning and prefetch, the same for every split."""
        # page-locked batches only help a copy to a GPU (torch warns about them without one)
        pin = self.pin_memory and torch.cuda.is_available()
        options: dict[str, Any] = {
            "num_workers": self.num_workers,
            "pin_memory": pin,
            "collate_fn": NormalisedBatch(self.mean, self.std),
        }
        if self.num_workers > 0:
            options.update(persistent_workers=self.persistent_workers, prefetch_factor=self.prefetch_factor)
        return options

    def _distributed(self) -> tuple[int, int]:
        """``(rank, world size)`` of the trainer this module serves; ``(0, 1)`` without one."""
        trainer = getattr(self, "trainer", None)
        return (0, 1) if trainer is None else (trainer.global_rank, trainer.world_size)

    def describe_transforms(self) -> str:
        how = (
            f"RandomResizedCrop {self.crop_size} (scale {self.min_scale:g}-1) + flip"
            if self.use_augment
            else f"resize {self.resize_size} + centre crop {self.crop_size}"
        )
        return (
            f"training images: {how}; evaluation: resize {self.resize_size} + centre crop {self.crop_size}; "
            f"{self.num_workers} decoding workers"
        )


@checked
class ImageFolderDataModule(ImageDataModule, LabelSwitch):
    """Train/val/test image folders in torchvision's ImageFolder layout, decoded and augmented in
    DataLoader worker processes (see the module doc). Settings: ``conf/data/image_folder.yaml``."""

    def __init__(
        self,
        train_dir: str,
        val_dir: str | None,
        test_dir: str | None,
        val_size: NonNegativeCount,
        test_size: NonNegativeCount,
        split_seed: Seed,
        labelled_fraction: LabelledFraction,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.dirs = {"train": str(train_dir), "val": val_dir, "test": test_dir}
        self.sizes = {"val": int(val_size), "test": int(test_size)}
        self._init_labels(labelled_fraction, split_seed)
        self.classes: list[str] = []
        self._samples: dict[str, tuple[list[str], Tensor]] = {}

    # -- files and splits ------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._samples:
            return
        if not self.root.is_dir():
            raise ConfigError(f"data.root={self.root}: no such folder")
        self.classes, splits = split_folders(
            self.root,
            self.dirs["train"],
            self.dirs["val"],
            self.dirs["test"],
            self.sizes["val"],
            self.sizes["test"],
            self.split_seed,
        )
        for split, samples in splits.items():
            paths = [path for path, _ in samples]
            self._samples[split] = (paths, torch.tensor([label for _, label in samples], dtype=torch.long))

    @property
    def samples(self) -> dict[str, tuple[list[str], Tensor]]:
        """``{"train"|"val"|"test": (paths, targets)}``, scanned on first use."""
        self.setup()
        return self._samples

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self.classes)

    @property
    def split_sizes(self) -> dict[str, int]:
        return {split: len(paths) for split, (paths, _) in self.samples.items()}

    # -- labels --------------------------------------------------------------------------------------
    def training_targets(self) -> Tensor:
        return self.samples["train"][1]

    # -- loaders -------------------------------------------------------------------------------------
    def dataset(self, split: str) -> ImageFiles:
        paths, targets = self.samples[split]
        if split == "train":
            targets = self.served_targets(targets)
        return ImageFiles(paths, targets, self.transform(split == "train"), self.bad_images)

    def train_dataloader(self) -> DataLoader:
        # the order follows the run's seed (shuffle_seed), and so do the workers' random crops, whose
        # seeds torch draws from this generator; under DDP each rank draws its own crops (Lightning
        # gives every rank a DistributedSampler for its share of the order)
        rank, _ = self._distributed()
        generator = torch.Generator().manual_seed(self.shuffle_seed + PRIME * rank)
        return DataLoader(
            self.dataset("train"),
            batch_size=self.batch_size,
            shuffle=True,
            generator=generator,
            **self.loader_options(),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset("val"), batch_size=self.eval_batch_size, **self.loader_options())

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset("test"), batch_size=self.eval_batch_size, **self.loader_options())

    def describe(self) -> str:
        sizes = self.split_sizes
        origins = ", ".join(
            f"{split} from {self.dirs[split]}/"
            if self.dirs[split] and (self.root / self.dirs[split]).exists()
            else f"{split} drawn from {self.dirs['train']}/"
            for split in ("val", "test")
        )
        return (
            f"{self.name}: image folder {self.root}, {self.num_classes} classes; split train/val/test = "
            f"{sizes['train']}/{sizes['val']}/{sizes['test']} ({origins}; split_seed={self.split_seed}); "
            + self.describe_transforms()
        )


def check_statistics(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Three channel means and three positive standard deviations."""
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3:
        raise ConfigError(f"data.mean={list(mean)} is not allowed: it needs 3 values, one per RGB channel")
    if len(std) != 3 or min(std) <= 0:
        raise ConfigError(f"data.std={list(std)} is not allowed: it needs 3 values > 0, one per RGB channel")
    return mean, std
