"""Small image folders in torchvision's ImageFolder layout, written as real JPEG and PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("cat", "dog", "fox")


def write_image(path: Path, rng: np.random.Generator, size: tuple[int, int]) -> None:
    """A random colour image of ``size`` (height, width); the suffix of ``path`` picks the format."""
    pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_image_folder(
    root: Path,
    per_class: int = 12,
    splits: dict[str, int] | None = None,
    classes: tuple[str, ...] = CLASSES,
    size: tuple[int, int] = (36, 44),
    seed: int = 0,
) -> Path:
    """``root/<split>/<class>/<n>.jpg|png``: ``per_class`` images per class in train/ and, for each
    ``splits`` entry, that many per class in the named folder; every third file is a PNG."""
    rng = np.random.default_rng(seed)
    for split, count in {"train": per_class, **(splits or {})}.items():
        for name in classes:
            for n in range(count):
                write_image(root / split / name / f"{n:03d}.{'png' if n % 3 == 2 else 'jpg'}", rng, size)
    return root
