from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

from distillab.data.base import ArrayDataModule


class DigitsDataModule(ArrayDataModule):
    """scikit-learn's bundled handwritten digits: 1,797 grey 8×8 images, 10 classes, offline.
    Settings: those of ``ArrayDataModule`` (values in conf/data/digits.yaml)."""

    name = "digits"

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        bunch = load_digits()
        return bunch.images[:, None, :, :].astype(np.float32), bunch.target.astype(np.int64)
