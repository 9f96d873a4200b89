from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from distillab.data.base import InMemoryDataModule


class SyntheticDataModule(InMemoryDataModule):
    """Random inputs of any shape with learnable labels, for tests and speed benchmarks.

    Each class has its own random mean image; samples are that mean plus Gaussian noise, so a
    model can learn the task and accuracy tests are meaningful. ``data_seed`` fixes the data.
    """

    name = "synthetic"

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 8, 8),
        num_classes: int = 10,
        num_samples: int = 1000,
        noise: float = 1.0,
        data_seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self._shape, self._classes = tuple(int(d) for d in input_shape), int(num_classes)
        self.num_samples, self.noise, self.data_seed = int(num_samples), float(noise), data_seed

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.data_seed)
        means = rng.normal(size=(self._classes, *self._shape)).astype(np.float32)
        y = np.arange(self.num_samples) % self._classes
        x = means[y] + self.noise * rng.normal(size=(self.num_samples, *self._shape))
        return x.astype(np.float32), y.astype(np.int64)
