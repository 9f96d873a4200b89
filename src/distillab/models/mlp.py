from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn


class MLP(nn.Module):
    """Fully connected classifier on flattened inputs.

    ``hidden=[]`` is multinomial logistic regression; ``hidden=[1200, 1200]`` with dropout is
    the MNIST teacher of Hinton, Vinyals & Dean (2015).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden: Sequence[int] = (32,),
        dropout: float = 0.0,
        input_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if any(int(width) < 1 for width in hidden):
            raise ValueError(f"hidden={list(hidden)}: layer sizes must be positive integers")
        layers: list[nn.Module] = [nn.Flatten()]
        if input_dropout > 0:
            layers.append(nn.Dropout(input_dropout))
        width_in = math.prod(input_shape)
        for width in hidden:
            layers += [nn.Linear(width_in, int(width)), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width_in = int(width)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
