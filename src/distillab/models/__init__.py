"""Architectures: plain ``nn.Module``s that take ``(input_shape, num_classes, ...)`` and return logits.

Features inside a model are reached by module path with forward hooks, never through a
private forward signature, so any architecture can be a teacher or a student.
"""

from distillab.models.cnn import CNN
from distillab.models.mlp import MLP

__all__ = ["CNN", "MLP"]
