"""A dataset of your own for distillab, as a plain LightningDataModule.

The pipeline uses exactly these members of a datamodule:

* ``name``: the dataset's name in results.json;
* ``setup()``: called once before anything else (load the data here);
* ``describe()``: one line for the log;
* ``input_shape`` and ``num_classes``: to build the teacher and the student;
* ``shuffle_seed``: set by the pipeline to the run's seed (the order of training batches);
* ``train_dataloader()``, ``val_dataloader()``, ``test_dataloader()``: batches ``(x, y)``
  with float inputs and int64 class indices (the best validation accuracy picks the
  checkpoint; test is evaluated once at the end).

``split_sizes`` is not needed by the pipeline; it is here for ``describe()``.
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class MyDataModule(pl.LightningDataModule):
    """Images from an ``.npz`` file (``x``: N×C×H×W or N×H×W, ``y``: N class indices), split
    70/15/15 with a fixed seed and standardised with the training split's statistics.

    Without ``path`` it makes a demo set: 12×12 images of a bar that is horizontal, vertical,
    diagonal or anti-diagonal (4 classes), at a random place, with noise.
    """

    name = "my_data"

    def __init__(self, path: str | None = None, batch_size: int = 32, eval_batch_size: int = 256,
                 split_seed: int = 0) -> None:
        super().__init__()
        self.path, self.split_seed = path, split_seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.shuffle_seed = 0
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        x, y = self._load()
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.split_seed))
        n_holdout = len(y) * 15 // 100
        parts = {"val": order[:n_holdout], "test": order[n_holdout : 2 * n_holdout], "train": order[2 * n_holdout :]}
        mean, std = x[parts["train"]].mean(), x[parts["train"]].std()
        self.splits = {name: TensorDataset((x[idx] - mean) / std, y[idx]) for name, idx in parts.items()}

    def _load(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.path:
            arrays = np.load(self.path)
            x, y = arrays["x"], arrays["y"]
        else:
            x, y = _bars(per_class=150, size=12, seed=0)
        x = x[:, None] if x.ndim == 3 else x  # grey images get their channel axis
        return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.splits["train"].tensors[0].shape[1:])

    @property
    def num_classes(self) -> int:
        return int(self.splits["train"].tensors[1].max()) + 1

    @property
    def split_sizes(self) -> dict[str, int]:
        return {name: len(split) for name, split in self.splits.items()}

    def describe(self) -> str:
        sizes = self.split_sizes
        return (f"{self.name}: input {self.input_shape}, {self.num_classes} classes; "
                f"train/val/test = {sizes['train']}/{sizes['val']}/{sizes['test']}")

    def train_dataloader(self) -> DataLoader:
        order = torch.Generator().manual_seed(self.shuffle_seed)
        return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=True, generator=order)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=self.eval_batch_size)


def _bars(per_class: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(4), per_class)
    x = rng.normal(0.0, 0.3, size=(len(y), size, size)).astype(np.float32)
    line = np.arange(size)
    for i, k in enumerate(y):
        at = rng.integers(size)
        rows, cols = [(at, line), (line, at), (line, line), (line, size - 1 - line)][k]
        x[i, rows, cols] += 1.0
    return x, y
