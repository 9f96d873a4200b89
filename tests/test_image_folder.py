"""Image folders and their webdataset shards, on small folders of real JPEG and PNG files written
here: splits, transforms, workers, every bad input as one line, the shards' per-epoch and per-rank
parts, and a whole KD run on an image folder."""

from __future__ import annotations

import collections
import json
import logging
import shlex
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from distillab import conf, pipeline
from distillab.data import adapter
from distillab.data.image_folder import BadImage, ImageFolderDataModule, split_folders
from distillab.data.shards import MANIFEST, ImageShardsDataModule, command_line, epoch_part, main, write
from distillab.settings import ConfigError
from tests.conftest import ROOT
from tests.fixtures_images import CLASSES, write_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"crop_size": 16, "resize_size": 20, "num_workers": 0, "batch_size": 8, "eval_batch_size": 8}


def folder_module(root, **overrides) -> ImageFolderDataModule:
    return conf.build("data", "image_folder", root=str(root), **{**SMALL, "val_size": 6, "test_size": 6, **overrides})


def shards_module(root, name="toy", **overrides) -> ImageShardsDataModule:
    return conf.build("data", "image_shards", root=str(root), name=name, **{**SMALL, "shuffle_buffer": 4, **overrides})


@pytest.fixture
def images(tmp_path):
    return write_image_folder(tmp_path / "images")


@pytest.fixture
def shards(images, tmp_path):
    write(images, tmp_path / "shards", "toy", val_size=6, test_size=6, samples_per_shard=5)
    return tmp_path / "shards"


# -- folders and splits --------------------------------------------------------------------------
def test_splits_drawn_from_train_are_stratified_disjoint_and_follow_split_seed(images):
    classes, splits = split_folders(images, "train", "val", "test", 6, 3, split_seed=0)
    assert classes == sorted(CLASSES)
    paths = {name: [p for p, _ in samples] for name, samples in splits.items()}
    assert sum(map(len, paths.values())) == 12 * len(CLASSES) and (len(paths["val"]), len(paths["test"])) == (6, 3)
    assert not set(paths["train"]) & set(paths["val"]) and not set(paths["val"]) & set(paths["test"])
    assert collections.Counter(label for _, label in splits["val"]) == {0: 2, 1: 2, 2: 2}
    assert split_folders(images, "train", None, None, 6, 3, split_seed=0)[1] == splits
    assert split_folders(images, "train", None, None, 6, 3, split_seed=1)[1]["val"] != splits["val"]


def test_split_folders_are_used_when_present(tmp_path):
    root = write_image_folder(tmp_path, per_class=4, splits={"val": 2, "test": 1})
    data = folder_module(root, val_size=0, test_size=0)
    assert data.split_sizes == {"train": 12, "val": 6, "test": 3}
    assert "val from val/, test from test/" in data.describe()


def test_batches_shapes_normalisation_and_augmentation_switch(images):
    data = folder_module(images)
    info = adapter.prepare(data, seed=0)
    assert (info.name, info.input_shape, info.num_classes) == ("image_folder", (3, 16, 16), 3)
    x, y = next(iter(data.val_dataloader()))
    assert x.shape == (6, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.long
    # uniform random pixels normalised with ImageNet's statistics: means near (0.5 - mean) / std
    expected = (0.5 - torch.tensor(data.mean)) / torch.tensor(data.std)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), expected, atol=0.35)
    assert data.augments
    first, second = (data.dataset("train")[0][0] for _ in range(2))
    assert not torch.equal(first, second), "random crops differ from one read to the next"
    with data.augmentation(False):
        assert not data.augments and torch.equal(data.dataset("train")[0][0], data.dataset("train")[0][0])
    assert "randomly augmented" in adapter.index_obstacle(data)
    with data.augmentation(False):  # fixed inputs: the teacher's outputs can be cached
        assert adapter.index_obstacle(data) is None


def test_the_training_order_follows_the_seed(images):
    def order(seed):
        data = folder_module(images, augment=False)
        adapter.prepare(data, seed)
        return torch.cat([y for _, y in data.train_dataloader()])

    assert torch.equal(order(3), order(3)) and not torch.equal(order(3), order(4))


def test_labelled_fraction_hides_labels_of_the_rest(images):
    data = folder_module(images, labelled_fraction=0.5)
    targets = torch.cat([y for _, y in data.train_dataloader()])
    assert (targets == -1).sum() == len(targets) - int(data.labelled_mask().sum()) > 0
    with data.labelled(None):
        assert (torch.cat([y for _, y in data.train_dataloader()]) >= 0).all()


# -- bad input, one line each ----------------------------------------------------------------------
def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


def test_an_empty_folder(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(ConfigError) as caught:
        folder_module(tmp_path).setup()
    assert "is empty" in _one_line(caught) and "data.train_dir=train" in str(caught.value)
    with pytest.raises(ConfigError, match="no such folder"):
        folder_module(tmp_path / "nothing").setup()


def test_a_class_folder_without_images(images):
    (images / "train" / "owl").mkdir()
    (images / "train" / "owl" / "notes.txt").write_text("not an image")
    with pytest.raises(ConfigError) as caught:
        folder_module(images).setup()
    assert "owl has no images" in _one_line(caught)


def test_val_classes_that_differ_from_train(tmp_path):
    root = write_image_folder(tmp_path, per_class=3, splits={"val": 1})
    (root / "val" / "dog").rename(root / "val" / "wolf")
    with pytest.raises(ConfigError) as caught:
        folder_module(root).setup()
    message = _one_line(caught)
    assert "data.val_dir=val" in message and "lacks dog" in message and "wolf not in train" in message


def _corrupt(root):
    """A truncated JPEG and a JPEG replaced by text, in the test folder."""
    path = root / "test" / "cat" / "000.jpg"
    path.write_bytes(path.read_bytes()[:200])
    (root / "test" / "dog" / "001.jpg").write_bytes(b"not an image at all")
    return path


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_file_fails_in_one_line_naming_it(tmp_path, workers):
    root = write_image_folder(tmp_path, per_class=6, splits={"test": 2})
    bad = _corrupt(root)
    data = folder_module(root, num_workers=workers, persistent_workers=False)
    start = time.perf_counter()
    with pytest.raises(BadImage) as caught:
        list(data.test_dataloader())
    assert time.perf_counter() - start < 60, "the worker pool must not hang"
    message = _one_line(caught)
    assert str(bad) in message or "dog/001.jpg" in message
    assert "data.bad_images=skip" in message


def test_corrupt_files_are_skipped_when_asked(tmp_path, caplog):
    root = write_image_folder(tmp_path, per_class=6, splits={"test": 2})
    _corrupt(root)
    data = folder_module(root, bad_images="skip")
    batches = list(data.test_dataloader())
    assert sum(len(y) for _, y in batches) == 6, "a skipped file is replaced by the next readable one"
    assert sum("skipping" in r.message for r in caplog.records) == 2


def test_settings_are_checked(images):
    settings = OmegaConf.to_container(conf.load("data", "image_folder"), resolve=False)
    del settings["_target_"]
    settings.update(SMALL, root=str(images), val_size=6, test_size=6)
    for key, value, words in (
        ("resize_size", 12, "data.resize_size=12 is not allowed"),
        ("mean", [0.5], "data.mean=[0.5] is not allowed"),
        ("bad_images", "ignore", "bad_images='ignore' is not allowed"),
        ("num_workers", -1, "num_workers=-1 is not allowed"),
    ):
        with pytest.raises(ConfigError) as caught:
            ImageFolderDataModule(**{**settings, key: value})
        assert words in _one_line(caught)
    with pytest.raises(ConfigError) as caught:
        ImageFolderDataModule(**{**settings, "test_size": 0}).setup()
    assert "data.test_size=0 is not allowed here: no folder" in _one_line(caught)


# -- shards ------------------------------------------------------------------------------------------
def test_shards_hold_the_folders_splits_in_webdatasets_format(images, shards):
    manifest = json.loads((shards / MANIFEST).read_text())
    assert manifest["dataset"] == "toy" and manifest["classes"] == sorted(CLASSES)
    assert {s: e["samples"] for s, e in manifest["splits"].items()} == {"train": 24, "val": 6, "test": 6}
    assert [s["samples"] for s in manifest["splits"]["train"]["shards"]] == [5, 5, 5, 5, 4]
    webdataset = pytest.importorskip("webdataset")
    read = list(webdataset.WebDataset(str(shards / "val-000000.tar"), shardshuffle=False))
    assert len(read) == 5 and all(("jpg" in s or "png" in s) and "cls" in s for s in read)
    # the same images as the folder's split: the same labels, the same pixels once decoded
    folder = folder_module(images)
    stream = shards_module(shards)
    assert stream.split_sizes == folder.split_sizes and stream.num_classes == folder.num_classes
    labels = sorted(int(y) for _, y in stream.stream("val"))
    assert labels == sorted(folder.samples["val"][1].tolist())


def test_shards_every_sample_once_per_epoch_across_two_ranks():
    counts = [5, 5, 5, 5, 4, 6]
    total = sum(counts)
    for epoch in range(3):
        parts = [epoch_part(counts, epoch, seed=0, shuffle=True, rank=r, world=2) for r in range(2)]
        assert len(parts[0]) == len(parts[1]) == total // 2
        assert sorted(parts[0] + parts[1]) == sorted((s, p) for s, n in enumerate(counts) for p in range(n))
    parts = [epoch_part(counts, 0, seed=0, shuffle=True, rank=r, world=4) for r in range(4)]
    seen = collections.Counter(sample for part in parts for sample in part)
    assert len(seen) == total and all(len(part) == -(-total // 4) for part in parts)  # padded by wrapping round
    orders = {tuple(epoch_part(counts, e, seed=s, shuffle=True, rank=0, world=2)) for e in range(3) for s in (0, 1)}
    assert len(orders) == 6, "each epoch and each seed has its own order"
    assert epoch_part(counts, 1, 0, False, 0, 1) == epoch_part(counts, 2, 0, False, 0, 1)


def test_shard_streams_of_two_ranks_serve_every_image_once(shards):
    data = shards_module(shards, augment=False)
    data.shuffle_seed = 7

    def labels_and_means(epoch, rank):
        stream = data.stream("train", rank, 2)
        stream.epoch.fill_(epoch)
        items = list(stream)
        assert len(items) == len(stream) == 12
        return [(int(y), round(float(x.float().mean()), 4)) for x, y in items]

    folder = [(y, m) for epoch in range(2) for y, m in labels_and_means(epoch, 0) + labels_and_means(epoch, 1)]
    per_epoch = len(folder) // 2
    assert sorted(folder[:per_epoch]) == sorted(folder[per_epoch:]), "the same 24 images in each epoch"
    assert len(set(folder[:per_epoch])) == 24
    assert labels_and_means(0, 0) != labels_and_means(1, 0), "a new order every epoch"


@pytest.mark.parametrize("workers", [0, 2])
def test_the_shard_loader_gives_whole_batches_and_a_new_order_each_pass(shards, workers):
    data = shards_module(shards, num_workers=workers, augment=False, persistent_workers=True)
    loader = data.train_dataloader()
    passes = [[y.tolist() for _, y in loader] for _ in range(2)]
    assert [len(b) for b in passes[0]] == [8, 8, 8] == [len(b) for b in passes[1]]
    assert sorted(sum(passes[0], [])) == sorted(sum(passes[1], [])) and passes[0] != passes[1]


def test_shards_of_another_dataset_are_refused(shards, tmp_path):
    with pytest.raises(ConfigError) as caught:
        shards_module(shards, name="imagenet").setup()
    message = _one_line(caught)
    assert "written for dataset 'toy'" in message and "data.name=imagenet" in message
    with pytest.raises(ConfigError, match="no shards there"):
        shards_module(tmp_path).setup()
    (shards / "train-000001.tar").unlink()
    with pytest.raises(ConfigError, match="train-000001.tar .* is missing"):
        shards_module(shards).setup()


def test_a_corrupt_sample_in_a_shard(tmp_path):
    root = write_image_folder(tmp_path / "images", per_class=4, splits={"test": 2})
    (root / "test" / "fox" / "000.jpg").write_bytes(b"\xff\xd8 truncated")
    write(root, tmp_path / "shards", "toy", val_size=3)
    with pytest.raises(BadImage) as caught:
        list(shards_module(tmp_path / "shards").test_dataloader())
    assert "test/fox/000.jpg (in " in _one_line(caught) and "does not decode" in str(caught.value)
    served = sum(len(y) for _, y in shards_module(tmp_path / "shards", bad_images="skip").test_dataloader())
    assert served == 6, "a skipped sample is replaced, so every rank keeps its count"


def test_the_write_command(images, tmp_path):
    command = [sys.executable, "-m", "distillab.data.shards", "write", str(images), str(tmp_path / "out")]
    done = subprocess.run([*command, "--name", "toy", "--val-size", "3", "--test-size", "3"], capture_output=True)
    assert done.returncode == 0, done.stderr
    assert b"train 30, val 3, test 3 samples, 3 classes" in done.stdout
    assert main(["write", str(tmp_path / "none"), str(tmp_path / "x"), "--name", "toy"]) == 2


# -- a whole run -------------------------------------------------------------------------------------
@pytest.mark.parametrize("data", ["image_folder", "image_shards"])
def test_kd_on_images_from_disk_end_to_end(data, make_cfg, tmp_path, caplog):
    root = write_image_folder(tmp_path / "images", per_class=10, size=(32, 32))
    where = [f"data.root={root}", "data.val_size=6", "data.test_size=6"]
    if data == "image_shards":
        write(root, tmp_path / "shards", "flowers", val_size=6, test_size=6, samples_per_shard=8)
        where = [f"data.root={tmp_path / 'shards'}", "data.name=flowers"]
    cfg = make_cfg(
        f"data={data}",
        *where,
        "data.crop_size=16",
        "data.resize_size=16",
        "data.batch_size=8",
        "data.num_workers=0",
        "teacher.width=8",
        "teacher.blocks=1",
        "trainer.max_epochs=1",
        "teacher.recipe.max_epochs=1",
        "distill=kd",
    )
    with caplog.at_level(logging.INFO):
        record = pipeline.run(cfg)
    assert record["status"] == "ok", record
    assert record["dataset"] == ("image_folder" if data == "image_folder" else "flowers")
    assert record["student"]["params"] == 3 * 16 * 16 * 32 + 32 + 32 * 3 + 3
    assert 0 <= record["student"]["test"]["acc"] <= 1
    # random crops: the live teacher, and the log says why
    assert any(
        "teacher outputs: live" in r.getMessage() and "randomly augmented" in r.getMessage() for r in caplog.records
    )


def test_the_imagenet_config_is_the_image_folder_with_imagenets_layout(make_cfg):
    folder, imagenet = (OmegaConf.to_container(conf.load("data", name)) for name in ("image_folder", "imagenet"))
    differ = {key for key in folder if folder[key] != imagenet[key]}
    assert folder.keys() == imagenet.keys() and differ == {
        "root",
        "name",
        "val_dir",
        "test_dir",
        "val_size",
        "test_size",
    }
    data = make_cfg("data=imagenet").data
    assert data._target_.endswith("ImageFolderDataModule") and data.name == "imagenet"
    assert (data.val_dir, data.test_dir, data.val_size) == (None, "val", 10000)
    assert list(data.mean) == [0.485, 0.456, 0.406] and list(data.std) == [0.229, 0.224, 0.225]
    assert (data.crop_size, data.resize_size, data.batch_size) == (224, 256, 256)
    assert (ROOT / "conf" / "data" / "image_shards.yaml").read_text().startswith("# ")


def test_the_shard_commands_the_docs_show_parse():
    shown = [
        shlex.split(line)[3:]
        for line in (ROOT / "docs" / "large-data.md").read_text().splitlines()
        if line.startswith("python -m distillab.data.shards ")
    ]
    assert len(shown) >= 2
    for args in shown:
        parsed = command_line().parse_args(args)
        assert parsed.command == "write" and parsed.name
