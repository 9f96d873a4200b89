"""A small depthwise-separable CNN (MobileNet v1, Howard et al. 2017), ``teacher=separable_cnn`` or
``student=separable_cnn``.

A 3×3 stem, then ``depth`` stages: stage i has ``width·2^i`` channels and is a depthwise 3×3 conv
(stride 2 while the map is larger than 1×1) and a pointwise 1×1 conv, each with BN and ReLU,
so it costs about 1/9 of a plain 3×3 conv's multiply-adds. Global average pooling feeds a
linear classifier. The stages are ``stages.0``, ``stages.1``, … and the embedding is the input of
``classifier`` (``classifier:in``): the feature methods find them without being told.

A model is any ``nn.Module`` that returns logits, built with ``input_shape`` and ``num_classes``
(given by the run) and its own settings, the typed parameters after them; their values (the
defaults) are in ``conf/model/separable_cnn.yaml``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from distillab.settings import Count, checked


def conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


@checked  # built from Python, it checks its settings as the config check does
class SeparableCNN(nn.Module):
    """Depthwise-separable CNN: stem, ``depth`` stages of channels ``width·2^i``, pooling, classifier."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: Count, depth: Count) -> None:
        super().__init__()
        channels, size = int(input_shape[0]), min(int(input_shape[1]), int(input_shape[2]))
        self.stem = conv_bn_relu(channels, width, 3)
        stages, channels = [], width
        for i in range(depth):
            stride = 2 if size > 1 else 1
            size = (size + 1) // 2 if stride == 2 else size
            out = width * 2**i
            stages.append(
                nn.Sequential(
                    conv_bn_relu(channels, channels, 3, stride, groups=channels), conv_bn_relu(channels, out, 1)
                )
            )
            channels = out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.stages(self.stem(x))))
