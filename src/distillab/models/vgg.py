"""VGG networks with batch normalisation, in their CIFAR form.

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR 2015 (configurations A = VGG-11, B = VGG-13, D = VGG-16, E = VGG-19), with a BN after
every 3×3 conv (Ioffe & Szegedy, 2015). The CIFAR-100 distillation benchmarks (Tian et al.,
ICLR 2020; Zhao et al., CVPR 2022) add the shallow VGG-8 (one conv per stage, widths
64/128/256/512/512), keep the conv biases, max-pool after the first three stages only (on
32×32 inputs the fourth pool is skipped, so the last two stages run at 4×4), average-pool
globally and replace the three fully connected layers by a single ``Linear(512, classes)``.

Module paths for feature hooks: ``block0`` … ``block4`` (conv-BN-ReLU stacks; outputs are
activated feature maps, the pre-activation is the output of the block's last BN, which is also
the input of its last ReLU, e.g. ``block0.2:in``: the ReLUs are not in-place),
``pool0`` … ``pool3`` (max-pools, ``nn.Identity`` when skipped), ``pool`` (global average
pooling + flatten) and ``classifier``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from distillab.models.init import init_conv_bn

#: Conv widths per stage for each depth (number of weight layers including the classifier).
VGG_CONFIGS: dict[int, tuple[tuple[int, ...], ...]] = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class VGG(nn.Module):
    """VGG-``depth`` with BN for small images; ``depth`` in 8, 11, 13, 16, 19.

    Max-pool placement, computed in ``__init__`` from ``input_shape``: ``pool0``, ``pool1`` and
    ``pool2`` halve the map after stages 0-2 unless it is already 1 pixel high or wide (then
    they are skipped, so 8×8 digits work); ``pool3`` halves it after stage 3 only while the map
    is still at least 8×8 there, which reproduces the benchmark (skipped for 32×32 inputs,
    applied for 64×64 ones). Global average pooling then feeds the classifier.

    Parameters on CIFAR-100 (3×32×32 input, 100 classes), identical to the benchmark code of
    Tian et al. (ICLR 2020): VGG-8 3,965,028; VGG-11 9,277,284; VGG-13 9,462,180.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, depth: int = 8) -> None:
        super().__init__()
        if depth not in VGG_CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_CONFIGS)}, got {depth}")
        self.depth = depth
        channels, height, width = (int(d) for d in input_shape)
        for i, stage in enumerate(VGG_CONFIGS[depth]):
            layers: list[nn.Module] = []
            for c_out in stage:
                # not in-place: the input of a block's last ReLU is the pre-activation a hook reads
                layers += [
                    nn.Conv2d(channels, c_out, 3, padding=1),
                    nn.BatchNorm2d(c_out),
                    nn.ReLU(),
                ]
                channels = c_out
            self.add_module(f"block{i}", nn.Sequential(*layers))
            if i < 4:
                smallest = 2 if i < 3 else 8
                if min(height, width) >= smallest:
                    pool: nn.Module = nn.MaxPool2d(2, 2)
                    height, width = height // 2, width // 2
                else:
                    pool = nn.Identity()
                self.add_module(f"pool{i}", pool)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(channels, num_classes)
        init_conv_bn(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.pool3(self.block3(x))
        x = self.block4(x)
        return self.classifier(self.pool(x))


def vgg8(input_shape: Sequence[int], num_classes: int) -> VGG:
    """VGG-8 with BN (one conv per stage); 3,965,028 parameters on CIFAR-100."""
    return VGG(input_shape, num_classes, depth=8)


def vgg11(input_shape: Sequence[int], num_classes: int) -> VGG:
    """VGG-11 with BN (configuration A); 9,277,284 parameters on CIFAR-100."""
    return VGG(input_shape, num_classes, depth=11)


def vgg13(input_shape: Sequence[int], num_classes: int) -> VGG:
    """VGG-13 with BN (configuration B); 9,462,180 parameters on CIFAR-100."""
    return VGG(input_shape, num_classes, depth=13)


def vgg16(input_shape: Sequence[int], num_classes: int) -> VGG:
    """VGG-16 with BN (configuration D); 14,774,436 parameters on CIFAR-100."""
    return VGG(input_shape, num_classes, depth=16)


def vgg19(input_shape: Sequence[int], num_classes: int) -> VGG:
    """VGG-19 with BN (configuration E); 20,086,692 parameters on CIFAR-100."""
    return VGG(input_shape, num_classes, depth=19)
