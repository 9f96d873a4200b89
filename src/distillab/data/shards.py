"""Image shards for clusters: an image folder written as webdataset tar shards, and streamed back.

Millions of small files on a shared file system are slow to open one by one; a few thousand tar
files of about a thousand images each read sequentially at the disk's speed. The shards are
webdataset's format (https://github.com/webdataset/webdataset): plain POSIX tar files in which
the members of one sample share a key, ``<key>.jpg`` (the original file's bytes, not re-encoded;
``.png``, ``.webp``, ... as the file was) and ``<key>.cls`` (the class index as text). Any tar
tool, and webdataset's own ``WebDataset`` reader, can read them. Beside them
``distillab-shards.json`` records the dataset's name, its classes, and the shards of each split
with their sample counts.

Writing (``python -m distillab.data.shards write ROOT OUT ...``) takes the train/val/test splits
of ``data=image_folder`` by the same rules and with the same settings (a split without its folder
is drawn from train with ``split_seed``), and writes each split's samples in an order shuffled
once with ``split_seed``, so that every shard mixes the classes.

Reading (``data=image_shards``, ``ImageShardsDataModule``) streams each split as an
``IterableDataset``. Every epoch the shards are put in an order drawn from ``(seed, epoch)``, the
same on every rank; their samples, concatenated in that order, are cut into one contiguous part
per rank of ``ceil(N / world_size)`` samples (the last rank's part wraps around to the first
samples, as torch's DistributedSampler pads), so every sample is read once per epoch and every
rank gets the same number of batches. A rank's part is cut into batch-sized blocks dealt to its
workers in turn, and each worker mixes its samples in a shuffle buffer seeded by
``(seed, epoch, rank, worker)``. Evaluation splits are read in their written order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image

from distillab.data.image_folder import PRIME, SPLITS, BadImage, ImageDataModule, decode_error, split_folders
from distillab.io import atomic_write_text
from distillab.settings import ConfigError, NonNegativeCount, checked

log = logging.getLogger(__name__)

MANIFEST = "distillab-shards.json"
BLOCK = 512  # the tar format's block
EMPTY_BLOCK = bytes(BLOCK)
VERSION = 1
WRITE_COMMAND = "python -m distillab.data.shards write <image folder> <shard folder> --name <dataset>"


# -- writing -----------------------------------------------------------------------------------------
def write(
    root: str | Path,
    out: str | Path,
    name: str,
    train_dir: str = "train",
    val_dir: str | None = "val",
    test_dir: str | None = "test",
    val_size: int = 0,
    test_size: int = 0,
    split_seed: int = 0,
    samples_per_shard: int = 1000,
) -> dict[str, Any]:
    """Write the image folder at ``root`` as shards under ``out``; returns the manifest it wrote."""
    try:
        import webdataset
    except ImportError:
        raise ConfigError(
            'writing shards needs the shards extra (webdataset missing): pip install -e ".[shards]"'
        ) from None
    root, out = Path(root).absolute(), Path(out).absolute()
    classes, splits = split_folders(root, train_dir, val_dir, test_dir, val_size, test_size, split_seed)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "format": "webdataset",
        "version": VERSION,
        "dataset": name,
        "classes": classes,
        "source": str(root),
        "split_seed": split_seed,
        "splits": {},
    }
    digest = hashlib.sha256(json.dumps([name, classes]).encode())
    for split, samples in splits.items():
        order = np.random.default_rng(split_seed).permutation(len(samples))
        pattern = str(out / f"{split}-%06d.tar")
        shards = []
        with webdataset.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0) as writer:
            for k, i in enumerate(order):
                path, label = samples[i]
                suffix = Path(path).suffix.lower().lstrip(".")
                with open(path, "rb") as file:
                    image = file.read()
                source = str(Path(path).relative_to(root))
                # the source file's path rides along, so that an error can name the file a sample came from
                writer.write(
                    {"__key__": f"{k:09d}", "jpg" if suffix == "jpeg" else suffix: image, "cls": label, "path": source}
                )
                digest.update(f"{source}:{label}".encode())
        for index in range(math.ceil(len(samples) / samples_per_shard)):
            count = min(samples_per_shard, len(samples) - index * samples_per_shard)
            shards.append({"file": Path(pattern % index).name, "samples": count})
        manifest["splits"][split] = {"samples": len(samples), "shards": shards}
    manifest["fingerprint"] = digest.hexdigest()[:16]
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def read_manifest(folder: Path, name: str) -> dict[str, Any]:
    """The manifest of the shards in ``folder``, checked: written for dataset ``name``, every shard there."""
    path = folder / MANIFEST
    if not path.is_file():
        raise ConfigError(f"data.root={folder}: no shards there (no {MANIFEST}); write them with {WRITE_COMMAND}")
    try:
        manifest = json.loads(path.read_text())
        splits = {split: manifest["splits"][split] for split in SPLITS}
        written_for, classes = str(manifest["dataset"]), list(manifest["classes"])
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"data.root={folder}: {MANIFEST} is not a shard manifest ({error!r})") from None
    if manifest.get("version") != VERSION:
        raise ConfigError(
            f"data.root={folder}: shards of format version {manifest.get('version')}, this version reads {VERSION}; "
            f"write them again with {WRITE_COMMAND}"
        )
    if written_for != name:
        raise ConfigError(
            f"data.name={name}: the shards in {folder} were written for dataset {written_for!r} "
            f"({len(classes)} classes); point data.root at the shards of {name!r} or write them with {WRITE_COMMAND}"
        )
    for split, entry in splits.items():
        for shard in entry["shards"]:
            if not (folder / shard["file"]).is_file():
                raise ConfigError(
                    f"data.root={folder}: the {split} shard {shard['file']} listed in {MANIFEST} is missing"
                )
    return manifest


# -- reading -----------------------------------------------------------------------------------------
def epoch_part(
    counts: Sequence[int], epoch: int, seed: int, shuffle: bool, rank: int, world: int
) -> list[tuple[int, int]]:
    """The samples rank ``rank`` of ``world`` reads in ``epoch``, in order: ``(shard, position in
    the shard)`` pairs. The shards' order is drawn from ``(seed, epoch)`` when ``shuffle``, the
    same on every rank; each rank takes a contiguous ``ceil(N / world)`` of their concatenation,
    wrapping around at the end."""
    order = np.random.default_rng([seed, epoch]).permutation(len(counts)) if shuffle else np.arange(len(counts))
    sizes = np.asarray(counts, dtype=np.int64)[order]
    total = int(sizes.sum())
    if total == 0:
        return []
    per_rank = -(-total // world)
    positions = (rank * per_rank + np.arange(per_rank)) % total
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    which = np.searchsorted(starts, positions, side="right") - 1
    return [(int(order[w]), int(p - starts[w])) for w, p in zip(which, positions)]


def tar_files(file: BinaryIO) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """``(name, read)`` of each regular file of the tar stream ``file``, in order; ``read()`` returns
    its bytes, and a file not read is skipped with one seek. A lean reader of the POSIX ustar/pax
    headers webdataset's writer produces: ``tarfile`` parses every header in Python, which cost a
    sixth of a worker's time per sample here."""
    long_name = None
    while True:
        header = file.read(BLOCK)
        if len(header) < BLOCK or header == EMPTY_BLOCK:
            return
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        kind, padded = header[156:157], -(-size // BLOCK) * BLOCK
        name = long_name or _field(header[345:500]) + ("/" if header[345] else "") + _field(header[:100])
        long_name = None
        if kind in (b"x", b"L"):  # a pax or GNU header: the next file's long name, if it has one
            data = file.read(padded)[:size]
            long_name = _pax_path(data) if kind == b"x" else _field(data)
            continue
        start = file.tell()
        if kind in (b"0", b"\0"):
            yield name, lambda size=size: file.read(size)
        file.seek(start + padded)


def _field(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def _pax_path(records: bytes) -> str | None:
    """The ``path`` of a pax extended header ("<length> path=<name>\\n" records), if it sets one."""
    for record in records.split(b"\n"):
        _, _, field = record.partition(b" ")
        if field.startswith(b"path="):
            return field[5:].decode("utf-8", errors="replace")
    return None


def read_samples(path: Path, wanted: Sequence[int]) -> Iterator[tuple[int, bytes, int, str]]:
    """``(position, image bytes, class, source file)`` of the samples at ``wanted`` positions
    (ascending) of the shard at ``path``, reading the tar once from its start."""
    wanted_set, last = set(wanted), max(wanted)
    position, key = -1, None
    image: bytes | None = None
    label: int | None = None
    source = ""
    with open(path, "rb") as file:
        for name, read in tar_files(file):
            stem, _, ext = name.partition(".")
            if stem != key:
                if image is not None and label is not None:
                    yield position, image, label, source
                position, key, image, label, source = position + 1, stem, None, None, ""
                if position > last:
                    return
            if position not in wanted_set:
                continue
            data = read()
            if ext == "cls":
                label = int(data)
            elif ext == "path":
                source = data.decode(errors="replace")
            else:
                image, source = data, source or name
        if image is not None and label is not None and position in wanted_set:
            yield position, image, label, source


class ShardStream(IterableDataset):
    """The samples of one split's shards, streamed as ``(transform(image), target)`` (module doc)."""

    def __init__(
        self,
        folder: Path,
        shards: Sequence[dict[str, Any]],
        transform: Callable[[Tensor], Tensor],
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        buffer: int = 0,
        bad_images: str = "fail",
    ) -> None:
        self.folder, self.files = folder, [str(shard["file"]) for shard in shards]
        self.counts = [int(shard["samples"]) for shard in shards]
        self.transform, self.batch_size, self.shuffle = transform, batch_size, shuffle
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.buffer, self.bad_images = buffer if shuffle else 0, bad_images
        # the epoch, shared with the worker processes (EpochLoader sets it before each pass)
        self.epoch = torch.zeros((), dtype=torch.long).share_memory_()

    def __len__(self) -> int:
        return -(-sum(self.counts) // self.world_size)

    def part(self, epoch: int, worker: int = 0, workers: int = 1) -> list[tuple[int, int]]:
        """What one worker of this rank reads in ``epoch``: the rank's batch-sized blocks dealt in turn."""
        mine = epoch_part(self.counts, epoch, self.seed, self.shuffle, self.rank, self.world_size)
        blocks = [mine[i : i + self.batch_size] for i in range(0, len(mine), self.batch_size)]
        return [sample for block in blocks[worker::workers] for sample in block]

    def __iter__(self) -> Iterator[tuple[Tensor, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = int(self.epoch)
        samples = self._encoded(self.part(epoch, worker, workers))
        if self.buffer > 1:
            samples = shuffled(samples, self.buffer, np.random.default_rng([self.seed, epoch, self.rank, worker]))
        return self._decoded(samples)

    def _encoded(self, part: list[tuple[int, int]]) -> Iterator[tuple[bytes, int, str]]:
        """The encoded samples of ``part`` in its order, one pass over each run of one shard."""
        start = 0
        while start < len(part):
            shard, stop = part[start][0], start + 1
            while stop < len(part) and part[stop][0] == shard and part[stop][1] > part[stop - 1][1]:
                stop += 1
            wanted = [position for _, position in part[start:stop]]
            path = self.folder / self.files[shard]
            found = 0
            for _, data, label, source in read_samples(path, wanted):
                found += 1
                yield data, label, f"{source} (in {path})"
            if found != len(wanted):
                raise BadImage(f"data: the shard {path} holds fewer samples than {MANIFEST} says; write it again")
            start = stop

    def _decoded(self, samples: Iterator[tuple[bytes, int, str]]) -> Iterator[tuple[Tensor, int]]:
        last: tuple[Tensor, int] | None = None
        owed = 0  # bad samples skipped before a good one: served as copies of it, to keep the count
        for data, label, where in samples:
            try:
                image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            except (RuntimeError, ValueError) as error:
                cause = decode_error(error)
                if self.bad_images == "fail":
                    raise BadImage(
                        f"data: {where} does not decode as an image ({cause}); write the shards again without "
                        "it, or set data.bad_images=skip to skip such samples"
                    ) from None
                log.warning("data: skipping %s: it does not decode as an image (%s)", where, cause)
                if last is None:
                    owed += 1
                else:
                    yield last
                continue
            last = (self.transform(image), label)
            for _ in range(owed + 1):
                yield last
            owed = 0


def shuffled(items: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """``items`` in a random order, mixed through a buffer of ``size`` items."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(size))
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


class EpochLoader(DataLoader):
    """A DataLoader that tells its ``ShardStream`` which pass this is before each one, through the
    tensor the stream shares with its (possibly persistent) worker processes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.passes = 0

    def __iter__(self) -> Any:
        self.dataset.epoch.fill_(self.passes)
        self.passes += 1
        return super().__iter__()


@checked
class ImageShardsDataModule(ImageDataModule):
    """The shards of an image folder (``write``), streamed with per-epoch shuffling that follows the
    run's seed and splits the samples between DDP ranks (module doc). Settings:
    ``conf/data/image_shards.yaml``."""

    def __init__(self, shuffle_buffer: NonNegativeCount, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shuffle_buffer = int(shuffle_buffer)
        self.manifest: dict[str, Any] = {}

    def setup(self, stage: str | None = None) -> None:
        if not self.manifest:
            self.manifest = read_manifest(self.root, self.name)

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self.manifest["classes"])

    @property
    def split_sizes(self) -> dict[str, int]:
        self.setup()
        return {split: int(self.manifest["splits"][split]["samples"]) for split in SPLITS}

    def stream(self, split: str, rank: int = 0, world_size: int = 1) -> ShardStream:
        self.setup()
        train = split == "train"
        return ShardStream(
            self.root,
            self.manifest["splits"][split]["shards"],
            self.transform(train),
            self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            seed=self.shuffle_seed,
            rank=rank,
            world_size=world_size,
            buffer=self.shuffle_buffer,
            bad_images=self.bad_images,
        )

    def _loader(self, split: str) -> EpochLoader:
        rank, world = self._distributed()
        stream = self.stream(split, rank, world)
        # the workers' random crops follow the run's seed, each rank its own (as the image folder's)
        generator = torch.Generator().manual_seed(self.shuffle_seed + PRIME * rank)
        return EpochLoader(stream, batch_size=stream.batch_size, generator=generator, **self.loader_options())

    def train_dataloader(self) -> EpochLoader:
        return self._loader("train")

    def val_dataloader(self) -> EpochLoader:
        return self._loader("val")

    def test_dataloader(self) -> EpochLoader:
        return self._loader("test")

    def describe(self) -> str:
        sizes = self.split_sizes
        shards = sum(len(self.manifest["splits"][split]["shards"]) for split in SPLITS)
        return (
            f"{self.name}: {shards} webdataset shards in {self.root}, {self.num_classes} classes; split "
            f"train/val/test = {sizes['train']}/{sizes['val']}/{sizes['test']}; shuffle buffer "
            f"{self.shuffle_buffer}; " + self.describe_transforms()
        )


# -- the command ---------------------------------------------------------------------------------------
def command_line() -> argparse.ArgumentParser:
    """The parser of ``python -m distillab.data.shards``."""
    parser = argparse.ArgumentParser(prog="python -m distillab.data.shards", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    writing = commands.add_parser("write", help="write an image folder as webdataset shards")
    writing.add_argument("root", help="the image folder (data.root of data=image_folder)")
    writing.add_argument("out", help="the folder for the shards (data.root of data=image_shards)")
    writing.add_argument("--name", required=True, help="the dataset's name (data.name); readers check it")
    writing.add_argument("--train-dir", default="train")
    none = lambda value: None if value in ("null", "none", "") else value  # noqa: E731
    writing.add_argument("--val-dir", type=none, default="val", help="null: draw val from train")
    writing.add_argument("--test-dir", type=none, default="test", help="null: draw test from train")
    writing.add_argument("--val-size", type=int, default=0, help="images drawn from train when val has no folder")
    writing.add_argument("--test-size", type=int, default=0, help="images drawn from train when test has no folder")
    writing.add_argument("--split-seed", type=int, default=0)
    writing.add_argument("--samples-per-shard", type=int, default=1000)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m distillab.data.shards write ROOT OUT --name NAME [...]``: see ``--help``."""
    args = command_line().parse_args(argv)
    try:
        manifest = write(
            args.root, args.out, args.name, args.train_dir, args.val_dir, args.test_dir,
            args.val_size, args.test_size, args.split_seed, args.samples_per_shard,
        )  # fmt: skip
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{split} {entry['samples']}" for split, entry in manifest["splits"].items())
    print(f"wrote the shards of {args.name!r} to {args.out}: {counts} samples, {len(manifest['classes'])} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
