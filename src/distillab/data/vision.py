"""torchvision image datasets held in memory: MNIST, Fashion-MNIST, CIFAR-10, CIFAR-100.

The files are read (and downloaded once, if asked) by torchvision's own dataset classes,
which check them against the published md5 sums; the decoded arrays are then kept as
normalised float32 tensors and served by the in-memory batch path of ``InMemoryDataModule``.

Splits: test is the official test set; validation is a stratified, fixed-seed
(``split_seed``) subset of ``val_size`` images of the official training set; train is the
rest of the official training set.

Normalisation: ``(pixel / 255 - mean) / std`` per channel, with the usual constants
(statistics of each official training set):

============== ========================== ==========================
dataset        mean                       std
============== ========================== ==========================
MNIST          0.1307                     0.3081
Fashion-MNIST  0.2860                     0.3530
CIFAR-10       (0.4914, 0.4822, 0.4465)   (0.2470, 0.2435, 0.2616)
CIFAR-100      (0.5071, 0.4865, 0.4409)   (0.2673, 0.2564, 0.2762)
============== ========================== ==========================

Augmentation (``augment=True``, training batches only, on the batch's device): CIFAR gets a
random 32×32 crop of the image padded by ``max_shift`` (4 by default) black pixels plus a
random horizontal flip, the standard CIFAR recipe; the MNIST family gets a random
translation of up to ``max_shift`` pixels, the jittered inputs of Hinton et al. (2015).
Both are one gather over the whole batch, with no per-sample Python loop.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import pickle
import socket
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, ClassVar

import numpy as np
import torch
import torchvision
from torch import Tensor

from distillab.data.base import InMemoryDataModule
from distillab.settings import ConfigError, Range, checked

log = logging.getLogger(__name__)

# seconds a download may wait on one socket operation: a blocked network fails, not hangs
DOWNLOAD_TIMEOUT_S = 30.0

# what torchvision raises on missing, corrupted or undownloadable files
_LOAD_ERRORS = (
    RuntimeError,
    OSError,  # includes URLError, socket timeouts, bad gzip files
    EOFError,
    ValueError,
    pickle.UnpicklingError,
    tarfile.TarError,
    http.client.HTTPException,
)


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of ``size`` samples drawn with ``seed``, each class in proportion to its
    share of ``labels`` (rounded by largest remainder, so the total is exactly ``size``)."""
    rng = np.random.default_rng(seed)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    exact = counts * size / len(labels)
    quota = np.floor(exact).astype(np.int64)
    missing = size - int(quota.sum())
    if missing:
        # the classes with the largest remainders get one more each; ties are broken at random
        order = np.lexsort((rng.random(len(classes)), -(exact - quota)))
        quota[order[:missing]] += 1
    chosen = [rng.permutation(np.flatnonzero(inverse == k))[:q] for k, q in enumerate(quota)]
    return np.sort(np.concatenate(chosen))


def shift_and_flip(x: Tensor, dy: Tensor, dx: Tensor, pad: int, fill: Tensor, flip: Tensor | None = None) -> Tensor:
    """Translate each image of ``x`` (N, C, H, W) by ``(dy[i], dx[i])`` pixels (down, right),
    filling uncovered pixels with ``fill`` (C,), then mirror it left-right where ``flip[i]``.

    ``out[i, :, r, c] = x[i, :, r - dy[i], c' - dx[i]]`` with ``c' = W - 1 - c`` if flipped,
    else ``c``. This is a crop at offset ``(pad - dy, pad - dx)`` of the image padded by ``pad``
    pixels (``|dy|, |dx| <= pad``), followed by a flip: torchvision's RandomCrop(padding=pad)
    then RandomHorizontalFlip, for the whole batch in two gathers.
    """
    n, c, h, w = x.shape
    padded = fill.to(x).view(1, c, 1, 1).expand(n, c, h + 2 * pad, w + 2 * pad).clone()
    padded[:, :, pad : pad + h, pad : pad + w] = x
    rows = torch.arange(h, device=x.device).unsqueeze(0) - dy.unsqueeze(1) + pad  # (N, H)
    cols = torch.arange(w, device=x.device).unsqueeze(0).expand(n, w)
    if flip is not None:
        cols = torch.where(flip.unsqueeze(1), w - 1 - cols, cols)
    cols = cols - dx.unsqueeze(1) + pad  # (N, W)
    out = padded.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w + 2 * pad))
    return out.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Bound each socket operation of a download, unless the process already set a bound."""
    previous = socket.getdefaulttimeout()
    if previous is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


@checked
class VisionDataModule(InMemoryDataModule):
    """A torchvision dataset with an official test set, decoded once into memory.

    Subclasses set the torchvision class, where it keeps its files under ``root``, the
    class count and the normalisation constants.
    """

    name = "vision"
    title: ClassVar[str] = "image"  # the dataset's usual name, for messages
    dataset_class: ClassVar[Any] = None  # the torchvision dataset class
    folder: ClassVar[str] = ""  # the folder under ``root`` holding the files
    classes: ClassVar[int] = 10
    mean: ClassVar[tuple[float, ...]] = ()
    std: ClassVar[tuple[float, ...]] = ()
    flips: ClassVar[bool] = False  # random horizontal flips when augmenting

    def __init__(
        self,
        root: str | Path,
        download: bool,
        augment: bool,
        max_shift: Annotated[int, Range(0, 8, what="pixels")],
        val_size: Annotated[int, Range(1, note="images taken from the training set")],
        **kwargs: Any,
    ) -> None:
        """``root``: the folder torchvision keeps the files in (``download``: fetch them if missing);
        ``augment``: random shifts (and flips for CIFAR) of training batches by up to
        ``max_shift`` pixels; ``val_size``: the validation images taken from the official training
        set. The other settings are ``InMemoryDataModule``'s (values in conf/data/<name>.yaml)."""
        super().__init__(**kwargs)
        self.root = os.path.abspath(os.path.expanduser(str(root)))
        self.download = bool(download)
        self.use_augment = bool(augment)
        self.max_shift = int(max_shift)
        self.val_size = int(val_size)

    # -- files --------------------------------------------------------------------------------
    @property
    def files_path(self) -> Path:
        """Where torchvision looks for (and downloads) the files."""
        return Path(self.root) / self.folder

    def _read(self, train: bool) -> tuple[Tensor, Tensor]:
        """The official training or test set as uint8 images (N, C, H, W) and int64 labels."""
        dataset = self._open(train)
        data = torch.as_tensor(dataset.data)  # MNIST: a (N, H, W) tensor; CIFAR: a (N, H, W, C) array
        images = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
        labels = torch.as_tensor(dataset.targets, dtype=torch.long)
        return images.contiguous(), labels

    def _open(self, train: bool) -> Any:
        folder = self.files_path
        had_files = folder.is_dir() and any(folder.iterdir())
        new_dirs = self._missing_dirs()
        try:
            with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                return self.dataset_class(self.root, train=train, download=self.download)
        except _LOAD_ERRORS as error:
            log.debug("torchvision could not load %s: %r", self.title, error)
            for path in new_dirs:  # a failed download leaves no empty folders behind
                with contextlib.suppress(OSError):
                    path.rmdir()
            raise ConfigError(self._load_failure(had_files, error)) from None

    def _missing_dirs(self) -> list[Path]:
        """Folders from the files' folder up to ``root`` that do not exist yet, deepest first."""
        chain = [self.files_path, *self.files_path.parents]
        chain = chain[: chain.index(Path(self.root)) + 1]
        return [path for path in chain if not path.exists()]

    def _load_failure(self, had_files: bool, error: BaseException) -> str:
        where = f"data={self.name}"
        fix = "set data.root=<folder with them> (or DISTILLAB_DATA_DIR)"
        if had_files:
            cause = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(":")[:160]
            return (
                f"{where}: the {self.title} files under {self.files_path} are incomplete or corrupted "
                f"({type(error).__name__}: {cause}): replace them with the original files, {fix}, "
                "or delete them and run once with network access"
            )
        if not self.download:
            return (
                f"{where}: no {self.title} files under {self.files_path} and data.download=false: "
                f"put the files there, {fix}, or set data.download=true with network access"
            )
        return (
            f"{where}: no {self.title} files under {self.files_path} and the download failed (no network?): "
            f"put the files there, {fix}, or run once with network access"
        )

    # -- arrays and splits --------------------------------------------------------------------
    def normalise(self, images: Tensor) -> Tensor:
        """uint8 images (N, C, H, W) -> float32 ``(pixel / 255 - mean) / std`` per channel."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        x = images.to(dtype=torch.float32, memory_format=torch.contiguous_format)
        return x.div_(255.0).sub_(mean).div_(std)

    def make_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        train_images, train_labels = self._read(train=True)
        test_images, test_labels = self._read(train=False)
        n = len(train_labels)
        if self.val_size >= n:
            raise ConfigError(
                f"data.val_size={self.val_size} is not allowed: it must be smaller than the {n} images of the "
                f"{self.title} training set (validation is taken from it, the rest trains)"
            )
        val_idx = torch.as_tensor(stratified_subset(train_labels.numpy(), self.val_size, self.split_seed))
        keep = torch.ones(n, dtype=torch.bool)
        keep[val_idx] = False
        train_idx = keep.nonzero().squeeze(1)
        # index the uint8 images first, then convert: one float copy of the data at a time
        return {
            "train": (self.normalise(train_images[train_idx]), train_labels[train_idx].contiguous()),
            "val": (self.normalise(train_images[val_idx]), train_labels[val_idx].contiguous()),
            "test": (self.normalise(test_images), test_labels.contiguous()),
        }

    @property
    def num_classes(self) -> int:
        return self.classes

    # -- augmentation -------------------------------------------------------------------------
    @property
    def augments(self) -> bool:
        return super().augments and (self.max_shift > 0 or self.flips)

    def black(self) -> Tensor:
        """The normalised value of a black (0) pixel per channel: what padding fills in."""
        return torch.tensor([-m / s for m, s in zip(self.mean, self.std)], dtype=torch.float32)

    def augment(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A random translation by up to ``max_shift`` pixels per image (the MNIST family), or
        a random crop of the image padded by ``max_shift`` plus a random flip (CIFAR)."""
        if not self.augments:
            return x
        n, shift = x.shape[0], self.max_shift
        dy, dx = torch.randint(-shift, shift + 1, (2, n), device=x.device, generator=generator)
        flip = torch.rand(n, device=x.device, generator=generator) < 0.5 if self.flips else None
        return shift_and_flip(x, dy, dx, shift, self.black().to(x.device), flip)

    def describe(self) -> str:
        if not self.augments:
            how = "none"
        elif self.flips:
            how = f"random crop with padding {self.max_shift} + horizontal flip"
        else:
            how = f"random translation by up to {self.max_shift} px"
        return f"{super().describe()}; files {self.files_path}; augment: {how}"


class MNISTDataModule(VisionDataModule):
    """MNIST handwritten digits: 60,000 training and 10,000 test 28×28 grey images, 10 classes."""

    name = "mnist"
    title = "MNIST"
    dataset_class = torchvision.datasets.MNIST
    folder = "MNIST/raw"
    mean, std = (0.1307,), (0.3081,)


class FashionMNISTDataModule(VisionDataModule):
    """Fashion-MNIST (Zalando): 60,000 training and 10,000 test 28×28 grey images of clothing, 10 classes."""

    name = "fashion_mnist"
    title = "Fashion-MNIST"
    dataset_class = torchvision.datasets.FashionMNIST
    folder = "FashionMNIST/raw"
    mean, std = (0.2860,), (0.3530,)


class _CIFARDataModule(VisionDataModule):
    """CIFAR: ``max_shift`` is the crop padding (4 in the standard recipe) and crops come with flips."""

    flips = True


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10: 50,000 training and 10,000 test 32×32 colour images, 10 classes."""

    name = "cifar10"
    title = "CIFAR-10"
    dataset_class = torchvision.datasets.CIFAR10
    folder = "cifar-10-batches-py"
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100: 50,000 training and 10,000 test 32×32 colour images, 100 (fine) classes."""

    name = "cifar100"
    title = "CIFAR-100"
    dataset_class = torchvision.datasets.CIFAR100
    folder = "cifar-100-python"
    classes = 100
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
