"""Datamodules: one LightningDataModule per dataset family, all exposing ``input_shape``,
``num_classes``, ``split_sizes`` and train/val/test loaders."""

from distillab.data.base import InMemoryDataModule, TensorBatches
from distillab.data.digits import DigitsDataModule
from distillab.data.synthetic import SyntheticDataModule

__all__ = ["DigitsDataModule", "InMemoryDataModule", "SyntheticDataModule", "TensorBatches"]
