"""CIFAR ResNets of He et al. (2016), as used by the CIFAR-100 distillation benchmarks.

He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2:
a 3×3 stem, then three stages of ``n`` basic blocks (two 3×3 convs each) with
``depth = 6n + 2``; stages 2 and 3 halve the resolution with a stride-2 first conv. The
distillation benchmarks of Tian et al. (CRD, ICLR 2020) and Zhao et al. (DKD, CVPR 2022) use
projection shortcuts (1×1 conv + BN, "option B") wherever the shape changes, stage widths
16/32/64 after a 16-channel stem for ``resnet8`` … ``resnet110``, and a 32-channel stem with
stage widths 64/128/256 for the four-times-wider ``resnet8x4`` / ``resnet32x4``.

Module paths for feature hooks: ``stem`` (conv-BN-ReLU), ``layer1``, ``layer2``, ``layer3``
(each an ``nn.Sequential`` of :class:`BasicBlock`), ``pool`` (global average pooling +
flatten, output is the penultimate feature vector) and ``fc``. Inside a block the
pre-activation sum (residual + shortcut) is the *input* of the block's ``act`` module, and the
block output is its output.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from distillab.models.init import init_conv_bn


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity or 1×1 conv-BN projection shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                nn.BatchNorm2d(c_out),
            )
        else:
            self.downsample = nn.Identity()
        # Not in-place, so a forward hook on ``act`` sees the pre-activation sum as its input.
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.downsample(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet (He et al., CVPR 2016) with ``depth = 6n + 2`` and basic blocks.

    ``widths`` are the stage widths (one stage per entry, the first at stride 1, the others at
    stride 2) and ``stem_width`` the channels of the 3×3 stem conv. Global average pooling
    makes any input size work (8×8 digits, 28×28 MNIST, 32×32 CIFAR).

    Parameters on CIFAR-100 (3×32×32 input, 100 classes), identical to the benchmark code of
    Tian et al. (ICLR 2020): resnet8 83,892; resnet14 181,108; resnet20 278,324;
    resnet32 472,756; resnet44 667,188; resnet56 861,620; resnet110 1,736,564;
    resnet8x4 1,233,540; resnet32x4 7,433,860.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        depth: int = 20,
        widths: Sequence[int] = (16, 32, 64),
        stem_width: int = 16,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CifarResNet depth must be 6n + 2 with n >= 1, got {depth}")
        if len(widths) < 1 or any(int(w) < 1 for w in widths) or stem_width < 1:
            raise ValueError(f"CifarResNet widths must be positive, got widths={list(widths)}, stem_width={stem_width}")
        blocks_per_stage = (depth - 2) // 6
        self.depth = depth
        channels = int(input_shape[0])
        self.stem = nn.Sequential(
            nn.Conv2d(channels, stem_width, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
        )
        c_in = stem_width
        self.stage_names: list[str] = []
        for i, width in enumerate(int(w) for w in widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(c_in, width, stride))
                c_in = width
            name = f"layer{i + 1}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, num_classes)
        init_conv_bn(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.fc(self.pool(x))


_PLAIN = (16, 32, 64)
_X4 = (64, 128, 256)


def resnet8(input_shape: Sequence[int], num_classes: int) -> CifarResNet:
    """ResNet-8 (n=1), widths 16/32/64; 83,892 parameters on CIFAR-100."""
    return CifarResNet(input_shape, num_classes, depth=8, widths=_PLAIN, stem_width=16)


def resnet14(input_shape: Sequence[int], num_classes: int) -> CifarResNet:
    """ResNet-14 (n=2), widths 16/32/64; 181,108 parameters on CIFAR-100."""
    return CifarResNet(input_shape, num_classes, depth=14, widths=_PLAIN, stem_width=16)


def resnet20(input_shape: Sequence[int], num_classes: int) -> CifarResNet:
    """ResNet-20 (n=3), widths 16/32/64; 278,324 parameters on CIFAR-100."""
    return CifarResNet(input_shape, num_classes, depth=20, widths=_PLAIN, stem_width=16)


def resnet32(input_shape: Sequence[int], num_classes: int) -> CifarResNet:
    """ResNet-32 (n=5), widths 16/32/64; 472,756 parameters on CIFAR-100."""
    return CifarResNet(input_shape, num_classes, depth=32, widths=_PLAIN, stem_width=16)


def resnet44(input_shape: Sequence[int], num_classes: int) -> CifarResNet:
    """ResNet-44 (n=7), widths 16/32/64; 667,188 parameters on CIFAR-100."""
    return CifarResNet(input_shape, num_classes, depth=44, widths=_PLAIN, stem_width=16)


def resnet56(input_shape: Sequence[int], num_classes: int) -> CifarResNet:
    """ResNet-56 (n=9), widths 16/32/64; 861,620 parameters on CIFAR-100."""
    return CifarResNet(input_shape, num_classes, depth=56, widths=_PLAIN, stem_width=16)


def resnet110(input_shape: Sequence[int], num_classes: int) -> CifarResNet:
    """ResNet-110 (n=18), widths 16/32/64; 1,736,564 parameters on CIFAR-100."""
    return CifarResNet(input_shape, num_classes, depth=110, widths=_PLAIN, stem_width=16)


def resnet8x4(input_shape: Sequence[int], num_classes: int) -> CifarResNet:
    """ResNet-8x4: stem 32, widths 64/128/256 (n=1); 1,233,540 parameters on CIFAR-100."""
    return CifarResNet(input_shape, num_classes, depth=8, widths=_X4, stem_width=32)


def resnet32x4(input_shape: Sequence[int], num_classes: int) -> CifarResNet:
    """ResNet-32x4: stem 32, widths 64/128/256 (n=5); 7,433,860 parameters on CIFAR-100."""
    return CifarResNet(input_shape, num_classes, depth=32, widths=_X4, stem_width=32)
