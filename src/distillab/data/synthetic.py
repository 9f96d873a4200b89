from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np

from distillab.data.base import ArrayDataModule
from distillab.settings import ConfigError, Count, Range, Seed, checked

#: one dimension of an input
Size = Annotated[int, Range(1, what="a size")]


@checked
class SyntheticDataModule(ArrayDataModule):
    """Random inputs of any shape with learnable labels, for tests and speed benchmarks.

    Each class has its own random mean image; samples are that mean plus Gaussian noise of
    standard deviation ``noise``, so a model can learn the task and accuracy tests are
    meaningful. ``data_seed`` fixes the data; the other settings are ``ArrayDataModule``'s.
    """

    name = "synthetic"

    def __init__(
        self,
        input_shape: Sequence[Size],
        num_classes: Annotated[int, Range(2)],
        num_samples: Count,
        noise: Annotated[float, Range(0)],
        data_seed: Seed,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not input_shape:
            raise ConfigError(f"input_shape={list(input_shape)!r} is not allowed: a list of sizes, e.g. [3, 32, 32]")
        if num_samples < 10 * num_classes:
            raise ConfigError(
                f"num_samples={num_samples!r} is not allowed: at least 10 per class "
                f"(>= {10 * num_classes} for {num_classes} classes)"
            )
        self._shape, self._classes = tuple(int(d) for d in input_shape), int(num_classes)
        self.num_samples, self.noise, self.data_seed = int(num_samples), float(noise), int(data_seed)

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.data_seed)
        means = rng.normal(size=(self._classes, *self._shape)).astype(np.float32)
        y = np.arange(self.num_samples) % self._classes
        x = means[y] + self.noise * rng.normal(size=(self.num_samples, *self._shape))
        return x.astype(np.float32), y.astype(np.int64)
