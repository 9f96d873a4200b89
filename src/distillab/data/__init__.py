"""Datamodules. Any LightningDataModule can be a run's data (``adapter``: what the run reads
from it or infers); the built-in ones hold their splits in memory and serve batches
``(x, y, index)`` without a DataLoader (``InMemoryDataModule``)."""

from distillab.data.base import ArrayDataModule, InMemoryDataModule, TensorBatches
from distillab.data.digits import DigitsDataModule
from distillab.data.synthetic import SyntheticDataModule

__all__ = ["ArrayDataModule", "DigitsDataModule", "InMemoryDataModule", "SyntheticDataModule", "TensorBatches"]
