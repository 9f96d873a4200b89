"""distillab: configuration-driven knowledge distillation and model compression experiments."""

__version__ = "0.1.0"
