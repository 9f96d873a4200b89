import numpy as np
import pytest
import torch

from distillab.data import DigitsDataModule, SyntheticDataModule, TensorBatches


def test_digits_split_is_stratified_fixed_and_complete():
    data = DigitsDataModule(val_fraction=0.15, test_fraction=0.15, split_seed=0)
    sizes = data.split_sizes
    assert sum(sizes.values()) == 1797
    assert sizes == {"train": 1257, "val": 270, "test": 270}
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    # stratified: every class has the same share (±1 sample) in each split
    for name in ("train", "val", "test"):
        counts = torch.bincount(data.splits[name][1], minlength=10).numpy()
        expected = np.bincount(__import__("sklearn.datasets").datasets.load_digits().target) * sizes[name] / 1797
        assert np.all(np.abs(counts - expected) <= 1.5), (name, counts, expected)
    again = DigitsDataModule(split_seed=0)
    assert torch.equal(again.splits["test"][0], data.splits["test"][0])
    other = DigitsDataModule(split_seed=1)
    assert not torch.equal(other.splits["test"][1], data.splits["test"][1])


def test_splits_are_disjoint():
    data = SyntheticDataModule(num_samples=300, data_seed=3)
    data.setup()
    x_all, _ = data.load_arrays()
    rows = {name: {tuple(row.flatten().tolist()) for row in data.splits[name][0]} for name in data.splits}
    assert not rows["train"] & rows["val"] and not rows["train"] & rows["test"] and not rows["val"] & rows["test"]
    assert sum(len(r) for r in rows.values()) == len(x_all)


def test_batches_cover_every_sample_once_per_epoch_and_reshuffle():
    x, y = torch.arange(10).float()[:, None], torch.arange(10)
    batches = TensorBatches(x, y, batch_size=4, shuffle=True, seed=0)
    assert len(batches) == 3
    first = torch.cat([index for _, _, index in batches])
    second = torch.cat([index for _, _, index in batches])
    assert sorted(first.tolist()) == list(range(10)) == sorted(second.tolist())
    assert not torch.equal(first, second)
    for xb, yb, index in batches:
        assert torch.equal(yb, index) and torch.equal(xb[:, 0].long(), index)


def test_drop_last_and_sharding_across_ranks():
    x, y = torch.zeros(10, 1), torch.arange(10)
    assert len(TensorBatches(x, y, 4, shuffle=False, drop_last=True)) == 2
    shards = [TensorBatches(x, y, 2, shuffle=True, seed=5, rank=r, world_size=2) for r in range(2)]
    seen = [torch.cat([i for _, _, i in shard]) for shard in shards]
    assert len(seen[0]) == len(seen[1]) == 5
    assert set(seen[0].tolist()).isdisjoint(seen[1].tolist())
    assert len(shards[0]) == 3


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (20,)])
def test_synthetic_any_shape(shape):
    data = SyntheticDataModule(input_shape=shape, num_classes=5, num_samples=100)
    assert data.input_shape == shape and data.num_classes == 5
    xb, yb, _ = next(iter(data.train_dataloader()))
    assert xb.shape[1:] == shape
