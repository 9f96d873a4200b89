"""MobileNetV2 of Sandler et al. (2018) in the CIFAR form of the distillation benchmarks.

Sandler, Howard, Zhu, Zhmoginov & Chen, "MobileNetV2: Inverted Residuals and Linear
Bottlenecks", CVPR 2018: a 3×3 conv stem, a stack of inverted-residual blocks (1×1 expansion by
``t``, 3×3 depthwise conv, linear 1×1 projection; identity shortcut when the stride is 1 and the
width is unchanged), a final 1×1 conv to 1280 channels, global average pooling and a linear
classifier. Stage settings ``(t, c, n, s)`` follow the CIFAR-100 benchmarks of Tian et al.
(ICLR 2020) and Zhao et al. (CVPR 2022)::

    (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)

with a stride-2 stem of ``int(32 * width_mult)`` channels and the stage widths scaled to
``int(c * width_mult)``.

Layer choices, fixed by matching the benchmark's 812,836 parameters (width 0.5, CIFAR-100):

* the final 1×1 conv keeps **1280** channels for ``width_mult <= 1`` (it is widened to
  ``1280 * width_mult``, rounded to a multiple of 8, only for ``width_mult > 1``); scaling it
  down to 640 would give 645,156 parameters;
* the first block (``t = 1``) still has its 1×1 expansion conv + BN (16 → 16 channels);
  dropping it, as the ImageNet reference does, would give 812,548 parameters;
* every conv is bias-free and followed by BN; activations are ReLU, as in the benchmark
  (the paper uses ReLU6, which has no parameters and does not change the count).

Module paths for feature hooks: ``stem`` (conv-BN-ReLU), ``stages.0`` … ``stages.6``
(``nn.Sequential`` of :class:`InvertedResidual`, one per setting row), ``conv_last``
(1×1 conv-BN-ReLU), ``pool`` (global average pooling + flatten) and ``classifier``.
The map resolution drops after ``stem``, ``stages.2``, ``stages.3`` and ``stages.5``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from distillab.models.init import init_conv_bn
from distillab.settings import Positive, checked

#: ``(expansion t, output channels c, blocks n, first stride s)`` per stage.
STAGE_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1×1 expand (×``expansion``)-BN-ReLU, 3×3 depthwise-BN-ReLU, 1×1 project-BN (linear).

    The expansion conv is present even for ``expansion == 1``. The identity shortcut is used
    when ``stride == 1`` and ``c_in == c_out``.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"InvertedResidual stride must be 1 or 2, got {stride}")
        hidden = c_in * expansion
        self.use_residual = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


def _last_channels(width_mult: float) -> int:
    if width_mult <= 1.0:
        return 1280
    scaled = 1280 * width_mult
    return max(8, int(scaled + 4) // 8 * 8)


@checked
class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al., CVPR 2018), CIFAR variant of the distillation benchmarks.

    Global average pooling makes any input size work (8×8 digits, 28×28 MNIST, 32×32 CIFAR;
    a stride-2 conv on a 1×1 map keeps it 1×1).

    Parameters on CIFAR-100 (3×32×32 input, 100 classes) at ``width_mult=0.5``: 812,836,
    identical to the benchmark code of Tian et al. (ICLR 2020).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, width_mult: Positive) -> None:
        super().__init__()
        self.width_mult = width_mult
        c_in = max(1, int(32 * width_mult))
        self.stem = _conv_bn_relu(int(input_shape[0]), c_in, 3, stride=2)
        stages = []
        for expansion, channels, blocks, stride in STAGE_SETTINGS:
            c_out = max(1, int(channels * width_mult))
            stage = []
            for j in range(blocks):
                stage.append(InvertedResidual(c_in, c_out, stride if j == 0 else 1, expansion))
                c_in = c_out
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.last_channels = _last_channels(width_mult)
        self.conv_last = _conv_bn_relu(c_in, self.last_channels, 1)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(self.last_channels, num_classes)
        init_conv_bn(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_last(self.stages(self.stem(x)))
        return self.classifier(self.pool(x))


def mobilenetv2(input_shape: Sequence[int], num_classes: int) -> MobileNetV2:
    """The benchmark student, MobileNetV2 at width 0.5: 812,836 params on CIFAR-100
    (``conf/model/mobilenetv2.yaml`` builds the class with a configurable ``width_mult``)."""
    return MobileNetV2(input_shape, num_classes, width_mult=0.5)
