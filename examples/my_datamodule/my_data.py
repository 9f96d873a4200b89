"""A dataset of your own for distillab: a plain LightningDataModule, nothing distillab-specific.

distillab calls ``setup()`` and the three dataloaders, whose batches are ``(inputs, labels)``
pairs (float inputs, int64 class indices). It reads ``num_classes`` when the module has it
(after ``setup``); the input shape it takes from the first training batch and the dataset's
name from the class name. The training loader shuffles without a generator of its own, so
the order of its batches follows the seed of the run. Because the training set is a map-style
``TensorDataset`` without random transforms, a distillation run computes the teacher's logits
once and reads them by sample index instead of running the teacher at every step.
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

    def __init__(self, path: str | None, batch_size: int, eval_batch_size: int, split_seed: int) -> None:
        super().__init__()
        self.path, self.split_seed = path, split_seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        x, y = self._load()
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.split_seed))
        n_holdout = len(y) * 15 // 100
        parts = {"train": order[2 * n_holdout :], "val": order[:n_holdout], "test": order[n_holdout : 2 * n_holdout]}
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
    def num_classes(self) -> int:
        """The number of classes, known once ``setup()`` has loaded the labels."""
        return int(self.splits["train"].tensors[1].max()) + 1

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=True)

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
