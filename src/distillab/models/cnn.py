from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from torch import Tensor, nn

from distillab.settings import Count, Range, checked

#: a dropout probability
Dropout = Annotated[float, Range(0, 1, high_open=True, what="a probability", note="0 = no dropout")]


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    # The ReLU is not in-place, so a hook on its input (``stages.i.1.2:in``) reads the pre-activation
    # BN output, which distill=ofd distils; it has no state, so parameters and state_dict are as before.
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


@checked
class CNN(nn.Module):
    """Small VGG-style convolutional classifier: ``blocks`` stages of two 3×3 conv-BN-ReLU.

    Stage ``i`` has ``width * 2**i`` channels and halves the spatial size with a max-pool
    while the map is larger than 1×1, so 8×8 digits and 32×32 CIFAR images both fit; global
    average pooling then feeds a linear classifier. Stages are ``stages.0``, ``stages.1``, …
    for feature hooks; ``stages.i.1.2`` is the stage's last ReLU, whose input (``stages.i.1.2:in``)
    is the pre-activation output of the BN ``stages.i.1.1``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        width: Count,
        blocks: Count,
        dropout: Dropout,
    ) -> None:
        super().__init__()
        channels, height, wide = int(input_shape[0]), int(input_shape[1]), int(input_shape[2])
        stages = []
        for i in range(blocks):
            c_out = width * 2**i
            stage = [_conv_bn_relu(channels, c_out), _conv_bn_relu(c_out, c_out)]
            if min(height, wide) > 1:
                stage.append(nn.MaxPool2d(2))
                height, wide = height // 2, wide // 2
            stages.append(nn.Sequential(*stage))
            channels = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.pool(self.stages(x))))
