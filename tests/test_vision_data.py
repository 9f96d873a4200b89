"""torchvision datasets (MNIST, Fashion-MNIST, CIFAR-10/100) on tiny fixtures in the real file
formats: loading through torchvision, splits, normalisation, augmentation, whole runs, and the
one-line error when the files are missing and there is no network."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF

from distillab import conf, pipeline, results
from distillab.config import ConfigError
from distillab.data.vision import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
    VisionDataModule,
    shift_and_flip,
    stratified_subset,
)
from tests.conftest import ROOT, run_train
from tests.fixtures_vision import BORDER, WRITERS, trust_cifar_fixtures, write_mnist

MODULES = {
    "mnist": MNISTDataModule,
    "fashion_mnist": FashionMNISTDataModule,
    "cifar10": CIFAR10DataModule,
    "cifar100": CIFAR100DataModule,
}
# dataset -> (input shape, classes, fixture train size, fixture test size, val_size used, folder)
EXPECTED = {
    "mnist": ((1, 28, 28), 10, 60, 30, 20, "MNIST/raw"),
    "fashion_mnist": ((1, 28, 28), 10, 60, 30, 20, "FashionMNIST/raw"),
    "cifar10": ((3, 32, 32), 10, 100, 50, 20, "cifar-10-batches-py"),
    "cifar100": ((3, 32, 32), 100, 300, 100, 100, "cifar-100-python"),
}
# a dead proxy: any download attempt fails at once, with or without a network
NO_NETWORK_ENV = {
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "no_proxy": "",
    "NO_PROXY": "",
}


def vision(name: str, root: Path, **overrides) -> VisionDataModule:
    """The datamodule ``conf/data/<name>.yaml`` configures, reading its files from ``root``."""
    return conf.build("data", name, root=str(root), **overrides)


def _normalised(images: np.ndarray, module) -> torch.Tensor:
    mean = torch.tensor(module.mean).view(1, -1, 1, 1)
    std = torch.tensor(module.std).view(1, -1, 1, 1)
    return (torch.as_tensor(images, dtype=torch.float32) / 255 - mean) / std


@pytest.fixture
def no_download(monkeypatch):
    """Every URL torchvision opens fails, as on a machine without network."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return calls


@pytest.fixture
def dataset_root(tmp_path, monkeypatch, no_download):
    """``make(name)`` writes the fixture of ``name`` into a fresh root and returns (root, arrays)."""
    trust_cifar_fixtures(monkeypatch)

    def make(name: str):
        root = tmp_path / f"data_{name}"
        return root, WRITERS[name](root)

    return make


# -- loading, splits, normalisation ---------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODULES))
def test_loads_the_fixture_through_torchvision(name, dataset_root, monkeypatch, no_download):
    shape, classes, n_train, n_test, val_size, folder = EXPECTED[name]
    root, arrays = dataset_root(name)
    opened = []
    torch_class = MODULES[name].dataset_class
    original = torch_class.__init__

    def spy(self, *args, **kwargs):
        opened.append((type(self), kwargs.get("train")))
        original(self, *args, **kwargs)

    monkeypatch.setattr(torch_class, "__init__", spy)
    data = vision(name, root, download=True, val_size=val_size)
    data.setup()
    assert {(torch_class, True), (torch_class, False)} <= set(opened)
    assert not no_download  # the files were found: no download was attempted
    assert data.name == name and data.files_path == root / folder
    assert data.input_shape == shape and data.num_classes == classes
    assert data.split_sizes == {"train": n_train - val_size, "val": val_size, "test": n_test}
    for split in ("train", "val", "test"):
        x, y = data.splits[split]
        assert x.dtype == torch.float32 and y.dtype == torch.long and x.is_contiguous()
    # test = the official test set, in order, normalised with the dataset's constants
    test_images, test_labels = arrays["test"]
    x_test, y_test = data.splits["test"]
    torch.testing.assert_close(x_test, _normalised(test_images, data))
    assert torch.equal(y_test, torch.as_tensor(test_labels))
    # train + val = the official training set, each sample once, normalised the same way
    train_images, train_labels = arrays["train"]
    expected = _normalised(train_images, data).flatten(1)
    got = torch.cat([data.splits["train"][0], data.splits["val"][0]]).flatten(1)
    got_labels = torch.cat([data.splits["train"][1], data.splits["val"][1]])
    match = torch.cdist(got, expected).argmin(dim=1)
    assert sorted(match.tolist()) == list(range(n_train))
    torch.testing.assert_close(got, expected[match])
    assert torch.equal(got_labels, torch.as_tensor(train_labels)[match])
    # stratified: every class keeps its share of the training set in validation
    per_class = torch.bincount(data.splits["val"][1], minlength=classes)
    assert per_class.tolist() == [val_size // classes] * classes


def test_normalisation_constants_are_the_standard_ones():
    assert MNISTDataModule.mean == (0.1307,) and MNISTDataModule.std == (0.3081,)
    assert FashionMNISTDataModule.mean == (0.2860,) and FashionMNISTDataModule.std == (0.3530,)
    assert CIFAR10DataModule.mean == (0.4914, 0.4822, 0.4465)
    assert CIFAR10DataModule.std == (0.2470, 0.2435, 0.2616)
    assert CIFAR100DataModule.mean == (0.5071, 0.4865, 0.4409)
    assert CIFAR100DataModule.std == (0.2673, 0.2564, 0.2762)


def test_validation_split_depends_on_split_seed_only(dataset_root):
    root, _ = dataset_root("cifar10")

    def val_labels_and_inputs(**kwargs):
        data = vision("cifar10", root, val_size=20, **kwargs)
        return data.splits["val"]

    first, again = val_labels_and_inputs(split_seed=0), val_labels_and_inputs(split_seed=0, batch_size=7)
    other = val_labels_and_inputs(split_seed=1)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_stratified_subset_keeps_class_shares_and_exact_size():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    rng = np.random.default_rng(3)
    labels = labels[rng.permutation(len(labels))]
    chosen = stratified_subset(labels, 10, seed=0)
    assert len(chosen) == 10 and len(set(chosen.tolist())) == 10
    assert np.bincount(labels[chosen]).tolist() == [5, 3, 2]
    # fewer than one sample per class: still exactly `size`, at most one per class
    few = stratified_subset(labels, 2, seed=0)
    assert len(few) == 2 and len(set(labels[few].tolist())) == 2
    assert np.array_equal(stratified_subset(labels, 10, seed=0), chosen)


def test_val_size_not_below_the_training_set_is_a_one_line_error(dataset_root):
    root, _ = dataset_root("mnist")
    with pytest.raises(ConfigError) as caught:
        vision("mnist", root, val_size=60).setup()
    message = str(caught.value)
    assert "\n" not in message and message.startswith("data.val_size=60 is not allowed")
    assert "60 images of the MNIST training set" in message


# -- augmentation ---------------------------------------------------------------------------------
def test_shift_and_flip_by_hand():
    x = torch.arange(1.0, 17.0).view(1, 1, 4, 4)
    fill = torch.zeros(1)
    down1_left1 = shift_and_flip(x, torch.tensor([1]), torch.tensor([-1]), 1, fill)
    assert down1_left1[0, 0].tolist() == [[0, 0, 0, 0], [2, 3, 4, 0], [6, 7, 8, 0], [10, 11, 12, 0]]
    flipped = shift_and_flip(x, torch.tensor([1]), torch.tensor([-1]), 1, fill, flip=torch.tensor([True]))
    assert flipped[0, 0].tolist() == [[0, 0, 0, 0], [0, 4, 3, 2], [0, 8, 7, 6], [0, 12, 11, 10]]
    unchanged = shift_and_flip(x, torch.tensor([0]), torch.tensor([0]), 2, fill)
    assert torch.equal(unchanged, x)


def test_cifar_crop_and_flip_matches_torchvision_on_raw_pixels(dataset_root):
    """Padding by 4 black pixels, cropping at (top, left) and flipping the raw image, then
    normalising, equals shifting the normalised image by (4 - top, 4 - left)."""
    root, arrays = dataset_root("cifar10")
    data = vision("cifar10", root, augment=True)
    raw = torch.as_tensor(arrays["test"][0][:3])
    tops, lefts, flips = [0, 8, 3], [8, 0, 5], [False, True, True]
    expected = []
    for image, top, left, flip in zip(raw, tops, lefts, flips):
        crop = TF.crop(TF.pad(image, [4], fill=0), top, left, 32, 32)
        expected.append(TF.hflip(crop) if flip else crop)
    got = shift_and_flip(
        data.normalise(raw), 4 - torch.tensor(tops), 4 - torch.tensor(lefts), 4, data.black(), flip=torch.tensor(flips)
    )
    torch.testing.assert_close(got, data.normalise(torch.stack(expected)))


def test_cifar_augment_is_a_random_crop_and_flip_of_each_image(dataset_root):
    root, _ = dataset_root("cifar10")
    data = vision("cifar10", root, augment=True, val_size=20)
    assert data.augments and data.max_shift == 4
    x = data.splits["train"][0][:40]
    out = data.augment(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.equal(out, x)
    assert torch.equal(x, data.splits["train"][0][:40])  # the input is left alone
    black = data.black()
    seen = set()
    for i in range(len(x)):
        found = [
            (dy, dx, flip)
            for dy in range(-4, 5)
            for dx in range(-4, 5)
            for flip in (False, True)
            if torch.equal(
                out[i],
                shift_and_flip(
                    x[i : i + 1], torch.tensor([dy]), torch.tensor([dx]), 4, black, flip=torch.tensor([flip])
                )[0],
            )
        ]
        assert found, f"augmented image {i} is no crop/flip of its input"
        seen.update(found)
    assert {flip for _, _, flip in seen} == {False, True}
    assert len({(dy, dx) for dy, dx, _ in seen}) > 5
    # the same generator state gives the same batch
    again = data.augment(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_mnist_translation_keeps_pixel_mass(name, dataset_root):
    root, _ = dataset_root(name)
    data = vision(name, root, augment=True, max_shift=2, val_size=20)
    assert data.augments and data.max_shift <= BORDER
    x = data.splits["train"][0]
    out = data.augment(x, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    moved = [i for i in range(len(x)) if not torch.equal(out[i], x[i])]
    assert len(moved) > len(x) // 2
    # every image has a blank border of BORDER >= max_shift pixels: nothing leaves the frame
    background = data.black()
    torch.testing.assert_close((out - background).sum(dim=(1, 2, 3)), (x - background).sum(dim=(1, 2, 3)))
    # the ink moved by at most max_shift pixels in each direction, without flips
    ink_x, ink_out = (x - background)[:, 0], (out - background)[:, 0]
    rows = torch.arange(28.0)
    for axis in (1, 2):
        centre_in = (ink_x.sum(dim=3 - axis) * rows).sum(1) / ink_x.sum(dim=(1, 2))
        centre_out = (ink_out.sum(dim=3 - axis) * rows).sum(1) / ink_out.sum(dim=(1, 2))
        shift = centre_out - centre_in
        assert shift.abs().max() <= 2 + 1e-3
        assert torch.allclose(shift, shift.round(), atol=1e-3)


def test_no_augmentation_unless_asked(dataset_root):
    root, _ = dataset_root("cifar10")
    plain = vision("cifar10", root, augment=False, val_size=20)
    assert plain.augments is False
    x = plain.splits["train"][0][:8]
    assert plain.augment(x) is x
    assert vision("mnist", root, augment=True, max_shift=0).augments is False
    assert vision("mnist", root, augment=True, max_shift=2).augments is True


# -- whole runs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODULES))
def test_config_files(name, make_cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("DISTILLAB_DATA_DIR", str(tmp_path / "datasets"))
    data = make_cfg(f"data={name}").data
    cifar = name.startswith("cifar")
    assert data._target_ == f"{MODULES[name].__module__}.{MODULES[name].__name__}"
    assert data.root == str(tmp_path / "datasets") and data.download is True and data.val_size == 5000
    assert data.augment is cifar and data.max_shift == (4 if cifar else 2)
    assert data.batch_size == (64 if cifar else 128) and data.eval_batch_size == 1000
    assert (ROOT / "conf" / "data" / f"{name}.yaml").read_text().startswith("# ")


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_a_whole_run_on_the_fixture(name, dataset_root, make_cfg, tmp_path, monkeypatch):
    root, _ = dataset_root(name)
    cfg = make_cfg(
        f"data={name}",
        f"data.root={root}",
        "data.val_size=20",
        "data.batch_size=32",
        "teacher.width=8",
        "teacher.blocks=1",
        "trainer.max_epochs=1",
        "teacher.recipe.max_epochs=1",
    )
    assert cfg.data.augment is (name == "cifar10")
    augmented = []
    original = MODULES[name].augment

    def counting(self, x, generator=None):
        augmented.append(len(x))
        return original(self, x, generator)

    monkeypatch.setattr(MODULES[name], "augment", counting)
    record = pipeline.run(cfg)
    # CIFAR: every training batch of teacher and student, and nothing else, was augmented
    assert augmented == ([32, 32, 16] * 2 if name == "cifar10" else [])
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk == record and on_disk["status"] == "ok"
    results.check(on_disk)
    assert on_disk["dataset"] == name
    assert on_disk["teacher"]["arch"] == "cnn" and on_disk["student"]["arch"] == "mlp"
    pixels = 28 * 28 if name == "mnist" else 3 * 32 * 32
    assert on_disk["student"]["params"] == pixels * 32 + 32 + 32 * 10 + 10


# -- missing files, no network ----------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODULES))
def test_missing_files_without_network_is_a_one_line_error(name, tmp_path, no_download):
    root = tmp_path / "empty"
    start = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        vision(name, root, download=True).setup()
    assert time.perf_counter() - start < 30
    assert no_download, "a download should have been tried"
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"data={name}: no {MODULES[name].title} files under {root / EXPECTED[name][5]}")
    assert "the download failed (no network?)" in message and "data.root=" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert not root.exists()  # the failed download left no empty folders behind


def test_missing_files_with_download_off_says_so(tmp_path, no_download):
    with pytest.raises(ConfigError) as caught:
        vision("cifar100", tmp_path, download=False).setup()
    message = str(caught.value)
    assert "\n" not in message and not no_download
    assert message.startswith(f"data=cifar100: no CIFAR-100 files under {tmp_path / 'cifar-100-python'}")
    assert "data.download=false" in message and "data.root=" in message


def test_files_failing_the_md5_check_are_not_used(tmp_path, no_download):
    """Without the test-only relaxation, torchvision rejects the fixture's CIFAR files (their
    md5 sums are not the published ones), tries to download, and the user gets one line."""
    write = WRITERS["cifar10"]
    write(tmp_path)
    with pytest.raises(ConfigError) as caught:
        vision("cifar10", tmp_path).setup()
    message = str(caught.value)
    assert "\n" not in message and no_download
    assert message.startswith(
        f"data=cifar10: the CIFAR-10 files under {tmp_path / 'cifar-10-batches-py'} are incomplete or corrupted"
    )
    assert "data.root=" in message
    assert torchvision.datasets.cifar.check_integrity is torchvision.datasets.utils.check_integrity


def test_command_line_without_files_and_network(tmp_path):
    empty, run_dir = tmp_path / "empty", tmp_path / "run"
    empty.mkdir()
    start = time.perf_counter()
    result = run_train(
        ["data=cifar10", f"data.root={empty}", f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}"],
        env=NO_NETWORK_ENV,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert errors[0].startswith(f"error: data=cifar10: no CIFAR-10 files under {empty / 'cifar-10-batches-py'}")
    assert "data.root=" in errors[0]
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("results.json"))
    assert not list(empty.iterdir())
    assert time.perf_counter() - start < 100


def test_a_teacher_recipe_can_switch_augmentation_for_its_own_training(tmp_path):
    root = tmp_path / "root"
    write_mnist(root)
    data = vision("mnist", root, augment=False)
    assert not data.augments
    with data.augmentation(True):
        assert data.augments
    assert not data.augments
    with data.augmentation(None):
        assert not data.augments
