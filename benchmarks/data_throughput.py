"""Images per second decoded and augmented by distillab's image loaders, against the floor.

    PYTHONPATH=src:. python3 benchmarks/data_throughput.py [--images 3000] [--workers 1 2] [--rounds 2]
        [--batch-size 64] [--folder DIR]

A folder of ``--images`` JPEGs of ImageNet-like sizes (each side 200-500 pixels, smooth colour
fields with a little noise, quality 90: about the bytes per pixel of photographs) in 10 classes
is written once (or ``--folder`` is read), and written again as webdataset shards. Then, for each
worker count, four loaders each decode and augment every training image once (RandomResizedCrop
224 + horizontal flip + normalisation, batches of ``--batch-size``):

- *floor*: a bare loop of the same decoder (``torchvision.io.decode_image``) and the same
  transforms over the same files, in the same number of worker processes, each taking its own
  share; no batching, no transfer to the main process: what the decoding itself costs;
- *folder*: distillab's ``data=image_folder`` training loader (``ImageFolderDataModule``);
- *shards*: distillab's ``data=image_shards`` training loader over the shards;
- *PIL*: torchvision's ``ImageFolder`` with its PIL loader and the PIL transforms of torchvision's
  reference recipe (RandomResizedCrop, RandomHorizontalFlip, ToTensor, Normalize).

Each is timed from its first batch to its last (worker start-up and the first batch are not
counted; the floor's pool is started and warmed before its clock starts). The four run in a
rotating order, ``--rounds`` times in this one process, so a busy machine slows all alike; the
ratio to the floor is taken per round and its median reported. Goal: folder and shards at least
0.95 of the floor. The exit status is 1 if one misses it.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from distillab.data.image_folder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderDataModule,
    NormalisedBatch,
    read_image,
    train_transform,
)
from distillab.data.shards import ImageShardsDataModule, write

GOAL = 0.95
CROP = 224
CLASSES = 10


def make_folder(root: Path, images: int, seed: int = 0) -> Path:
    """``images`` JPEGs under ``root/train/<class>/``, sides 200-500 pixels, and a small val/ and test/."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", images), ("val", CLASSES), ("test", CLASSES)):
        for n in range(count):
            height, width = (int(v) for v in rng.integers(200, 501, 2))
            coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
                (width, height), Image.BICUBIC
            )
            pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3))
            path = root / split / f"class{n % CLASSES:02d}" / f"{n:06d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return root


def module_settings(workers: int, batch_size: int) -> dict:
    return {
        "name": "bench",
        "crop_size": CROP,
        "resize_size": 256,
        "min_scale": 0.08,
        "augment": True,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "batch_size": batch_size,
        "eval_batch_size": batch_size,
        "num_workers": workers,
        "pin_memory": False,
        "persistent_workers": False,
        "prefetch_factor": 4,
        "bad_images": "fail",
    }


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(loader) -> tuple[float, int, float]:
    """Seconds from the first batch to the end of one pass, the images in that span, and the CPU
    seconds per image of the whole pass (workers' start-up included, once they have exited)."""
    cpu = cpu_seconds()
    batches = iter(loader)
    total = len(next(batches)[1])
    start, count = time.perf_counter(), 0
    for batch in batches:
        count += len(batch[1])
    seconds = time.perf_counter() - start
    del batches  # the workers exit and are joined: their CPU time is counted
    return seconds, count, (cpu_seconds() - cpu) / (total + count)


# -- the floor: the decoder and the transforms alone, in worker processes --------------------------------
_TRANSFORM = train_transform(CROP, 0.08)
_NORMALISE = NormalisedBatch(IMAGENET_MEAN, IMAGENET_STD)


def _init_worker() -> None:
    torch.set_num_threads(1)  # as torch's DataLoader workers run


def _decode_all(paths: list[str]) -> int:
    """Decode, crop, flip and normalise each image on its own, keeping nothing."""
    for path in paths:
        _NORMALISE([(_TRANSFORM(read_image(path)), 0)])
    return len(paths)


def floor(paths: list[str], workers: int) -> tuple[float, int, float]:
    cpu = cpu_seconds()
    pool = multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker)
    pool.map(_decode_all, [paths[:2]] * workers)  # started and warm
    shares = [paths[i::workers] for i in range(workers)]
    start = time.perf_counter()
    count = sum(pool.map(_decode_all, shares, chunksize=1))
    seconds = time.perf_counter() - start
    pool.close()
    pool.join()
    return seconds, count, (cpu_seconds() - cpu) / (count + 2 * workers)


# -- the loaders -----------------------------------------------------------------------------------
def folder_loader(root: Path, workers: int, batch_size: int):
    data = ImageFolderDataModule(
        root=root, train_dir="train", val_dir="val", test_dir="test", val_size=0, test_size=0, split_seed=0,
        labelled_fraction=1.0, **module_settings(workers, batch_size),
    )  # fmt: skip
    return data.train_dataloader()


def shards_loader(root: Path, workers: int, batch_size: int):
    data = ImageShardsDataModule(shuffle_buffer=1000, root=root, **module_settings(workers, batch_size))
    return data.train_dataloader()


def pil_loader(root: Path, workers: int, batch_size: int):
    from torchvision import transforms

    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(CROP),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    dataset = torchvision.datasets.ImageFolder(str(root / "train"), transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--folder", type=Path, default=None, help="an image folder to read instead of a generated one")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("distillab").setLevel(logging.WARNING)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        started = time.perf_counter()
        root = args.folder or make_folder(scratch / "images", args.images)
        write(root, scratch / "shards", "bench", samples_per_shard=500)
        paths = sorted(str(p) for p in (root / "train").rglob("*.jpg"))
        kilobytes = sum(map(os.path.getsize, paths)) / len(paths) / 1e3
        print(
            f"# torch {torch.__version__}, torchvision {torchvision.__version__}, {os.cpu_count()} cores, "
            f"load {os.getloadavg()[0]:.1f}; {len(paths)} JPEGs ({kilobytes:.0f} kB each), batch {args.batch_size}, "
            f"{args.rounds} rounds; data written in {time.perf_counter() - started:.0f} s"
        )
        arms = {
            "folder": lambda w: timed(folder_loader(root, w, args.batch_size)),
            "shards": lambda w: timed(shards_loader(scratch / "shards", w, args.batch_size)),
            "PIL": lambda w: timed(pil_loader(root, w, args.batch_size)),
        }
        names = ["floor", *arms]
        print(
            f"\n| workers | {' | '.join(f'{n} img/s' for n in names)} | {' | '.join(f'{a}/floor' for a in arms)} "
            f"| {' | '.join(f'{a}/floor CPU' for a in arms)} |"
        )
        print("|---:" * (1 + len(names) + 2 * len(arms)) + "|")
        verdicts = []
        for workers in args.workers:
            rates: dict[str, list[float]] = {name: [] for name in names}
            ratios: dict[str, list[float]] = {name: [] for name in arms}
            cpu_ratios: dict[str, list[float]] = {name: [] for name in arms}
            for round_ in range(args.rounds):
                rate, per_image = {}, {}
                for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                    seconds, count, per_image[name] = floor(paths, workers) if name == "floor" else arms[name](workers)
                    rate[name] = count / seconds
                    rates[name].append(rate[name])
                for name in arms:
                    ratios[name].append(rate[name] / rate["floor"])
                    cpu_ratios[name].append(per_image["floor"] / per_image[name])
            wall = {name: statistics.median(values) for name, values in ratios.items()}
            cpu = {name: statistics.median(values) for name, values in cpu_ratios.items()}
            verdicts.append(min(wall["folder"], wall["shards"]) >= GOAL)
            print(
                f"| {workers} | {' | '.join(f'{statistics.median(rates[n]):.0f}' for n in names)} | "
                f"{' | '.join(f'{wall[n]:.2f}' for n in arms)} | {' | '.join(f'{cpu[n]:.2f}' for n in arms)} |"
            )
        failed = not all(verdicts)
        print(
            f"\ngoal: folder/floor and shards/floor >= {GOAL} in images/s: {'FAIL' if failed else 'PASS'} "
            f"(load {os.getloadavg()[0]:.1f}; on a loaded machine the CPU columns, images per CPU-second "
            "against the floor's, are the steadier reading)"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
