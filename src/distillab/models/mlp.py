from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from distillab.models.cnn import Dropout
from distillab.settings import Count, checked


@checked
class MLP(nn.Module):
    """Fully connected classifier on flattened inputs.

    ``hidden=[]`` is multinomial logistic regression; ``hidden=[1200, 1200]`` with dropout is
    the MNIST teacher of Hinton, Vinyals & Dean (2015).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden: Sequence[Count],
        dropout: Dropout,
        input_dropout: Dropout,
    ) -> None:
        super().__init__()
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
