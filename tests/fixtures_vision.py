"""Writers of tiny image datasets in the real on-disk formats that torchvision reads.

* MNIST / Fashion-MNIST: IDX files (big-endian int32 magic 2051 for images, 2049 for labels,
  then the dimensions, then uint8 data), written both gzip-compressed (``*.gz``, as
  published) and uncompressed under ``<root>/MNIST/raw`` resp. ``<root>/FashionMNIST/raw``:
  torchvision's ``_check_exists`` looks for the uncompressed names, so ``download=True``
  finds them and never reaches the network.
* CIFAR-10: pickled dicts ``data_batch_1`` … ``data_batch_5``, ``test_batch`` (``data``:
  uint8 (N, 3072) rows of R, G, B planes; ``labels``) and ``batches.meta`` under
  ``<root>/cifar-10-batches-py``.
* CIFAR-100: pickled ``train``, ``test`` (``fine_labels``, ``coarse_labels``) and ``meta``
  under ``<root>/cifar-100-python``.

Labels are learnable: each class has its own mean image. Images keep a black border of
``BORDER`` pixels, so translations by up to that many pixels lose nothing.

torchvision checks the CIFAR files against the published md5 sums, which these files cannot
match; ``trust_cifar_fixtures(monkeypatch)`` relaxes that check for a test only.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import torchvision.datasets.cifar

BORDER = 4

Arrays = dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (uint8 images (N, C, H, W), int64 labels)


def _labels(classes: int, per_class: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.repeat(np.arange(classes), per_class)).astype(np.int64)


def _grey_digits(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """28×28 images, black border; class k is a bright 6×6 square at its own place plus noise."""
    n = len(labels)
    images = np.zeros((n, 1, 28, 28), dtype=np.uint8)
    inner = slice(BORDER, 28 - BORDER)
    images[:, 0, inner, inner] = rng.integers(0, 40, size=(n, 28 - 2 * BORDER, 28 - 2 * BORDER))
    for i, k in enumerate(labels):
        top, left = 5 + 9 * (k // 5), 4 + 3 * (k % 5)
        images[i, 0, top : top + 6, left : left + 6] = rng.integers(200, 256, size=(6, 6))
    return images


def _colour_images(labels: np.ndarray, classes: int, rng: np.random.Generator) -> np.ndarray:
    """32×32 RGB images, black border; class k has its own random mean image plus noise."""
    means = rng.integers(30, 226, size=(classes, 3, 32, 32)).astype(np.float64)
    noisy = means[labels] + rng.normal(0, 12, size=(len(labels), 3, 32, 32))
    images = np.clip(noisy, 0, 255).astype(np.uint8)
    images[:, :, :BORDER] = images[:, :, -BORDER:] = 0
    images[:, :, :, :BORDER] = images[:, :, :, -BORDER:] = 0
    return images


# -- MNIST family ----------------------------------------------------------------------------------
def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file: uint8 images (N, H, W) get magic 2051, uint8 labels (N,) magic 2049."""
    magic = {3: 2051, 1: 2049}[array.ndim]
    header = struct.pack(">i", magic) + b"".join(struct.pack(">i", d) for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_mnist(
    root: Path, folder: str = "MNIST", train_per_class: int = 6, test_per_class: int = 3, seed: int = 0
) -> Arrays:
    """MNIST-format files under ``root/<folder>/raw`` (``folder``: MNIST or FashionMNIST)."""
    rng = np.random.default_rng(seed)
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    arrays: Arrays = {}
    for split, prefix, per_class in (("train", "train", train_per_class), ("test", "t10k", test_per_class)):
        labels = _labels(10, per_class, rng)
        images = _grey_digits(labels, rng)
        for kind, array in (("images-idx3", images[:, 0]), ("labels-idx1", labels.astype(np.uint8))):
            blob = idx_bytes(array)
            name = f"{prefix}-{kind}-ubyte"
            (raw / name).write_bytes(blob)
            (raw / f"{name}.gz").write_bytes(gzip.compress(blob))
        arrays[split] = (images, labels)
    return arrays


# -- CIFAR -----------------------------------------------------------------------------------------
def _pickle(path: Path, entry: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def _rows(images: np.ndarray) -> np.ndarray:
    """(N, 3, 32, 32) -> (N, 3072): the red plane, then green, then blue, each row-major."""
    return images.reshape(len(images), -1)


def write_cifar10(root: Path, train_per_class: int = 10, test_per_class: int = 5, seed: int = 0) -> Arrays:
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train_labels = _labels(10, train_per_class, rng)
    test_labels = _labels(10, test_per_class, rng)
    train, test = _colour_images(train_labels, 10, rng), _colour_images(test_labels, 10, rng)
    chunks = np.array_split(np.arange(len(train_labels)), 5)
    for b, idx in enumerate(chunks, start=1):
        _pickle(
            folder / f"data_batch_{b}",
            {
                "batch_label": f"training batch {b} of 5",
                "labels": train_labels[idx].tolist(),
                "data": _rows(train[idx]),
                "filenames": [f"train_{i}.png" for i in idx],
            },
        )
    _pickle(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": test_labels.tolist(),
            "data": _rows(test),
            "filenames": [f"test_{i}.png" for i in range(len(test_labels))],
        },
    )
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(folder / "batches.meta", {"num_cases_per_batch": len(chunks[0]), "label_names": names, "num_vis": 3072})
    return {"train": (train, train_labels), "test": (test, test_labels)}


def write_cifar100(root: Path, train_per_class: int = 3, test_per_class: int = 1, seed: int = 0) -> Arrays:
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    arrays: Arrays = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = _labels(100, per_class, rng)
        images = _colour_images(labels, 100, rng)
        _pickle(
            folder / split,
            {
                "filenames": [f"{split}_{i}.png" for i in range(len(labels))],
                "batch_label": f"{'training' if split == 'train' else 'testing'} batch 1 of 1",
                "fine_labels": labels.tolist(),
                "coarse_labels": (labels // 5).tolist(),
                "data": _rows(images),
            },
        )
        arrays[split] = (images, labels)
    _pickle(
        folder / "meta",
        {
            "fine_label_names": [f"fine_{k}" for k in range(100)],
            "coarse_label_names": [f"coarse_{k}" for k in range(20)],
        },
    )
    return arrays


WRITERS = {
    "mnist": lambda root: write_mnist(root, "MNIST"),
    "fashion_mnist": lambda root: write_mnist(root, "FashionMNIST", seed=1),
    "cifar10": write_cifar10,
    "cifar100": write_cifar100,
}


def trust_cifar_fixtures(monkeypatch) -> None:
    """For a test only: accept CIFAR files that exist, whatever their md5 sum."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
