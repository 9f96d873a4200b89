"""Wide residual networks (WRN-d-k) of Zagoruyko & Komodakis (2016).

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016: a 3×3 conv stem of 16 channels,
three stages of ``n = (d - 4) / 6`` pre-activation basic blocks (BN-ReLU-3×3 conv, twice) of
widths ``16k``, ``32k``, ``64k`` (stages 2 and 3 at stride 2), a 1×1 conv shortcut where the
shape changes, then a final BN-ReLU, global average pooling and a linear classifier. Dropout
between the two convs of a block is off by default, as in the CIFAR-100 distillation
benchmarks (Tian et al., ICLR 2020; Zhao et al., CVPR 2022).

Module paths for feature hooks: ``stem`` (a bare conv: pre-activation design),
``layer1``, ``layer2``, ``layer3`` (``nn.Sequential`` of :class:`WideBasicBlock`; their outputs
are pre-activation sums), ``bn`` and ``relu`` (final BN-ReLU, the output of ``relu`` is the
last activated feature map, its input ``relu:in`` the BN output before it), ``pool`` (global
average pooling + flatten) and ``fc``. The BN-ReLU that opens stages 2 and 3 reads the previous
stage's output: ``layer2.0.relu1:in`` is ``layer2.0.bn1`` applied to the output of ``layer1``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from distillab.models.init import init_conv_bn


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3×3 (stride), BN-ReLU-[dropout]-conv3×3, plus shortcut.

    When the shape changes, the shortcut is a 1×1 conv applied to the activated input
    (the output of ``relu1``), as in the WRN paper; otherwise it is the identity on ``x``.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        # Not in-place: the identity shortcut needs the un-activated input.
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.equal_in_out = stride == 1 and c_in == c_out
        self.shortcut: nn.Module | None = (
            None if self.equal_in_out else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv1(activated)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        residual = x if self.shortcut is None else self.shortcut(activated)
        return out + residual


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` (Zagoruyko & Komodakis, BMVC 2016), ``depth = 6n + 4``.

    Global average pooling makes any input size work (8×8 digits, 28×28 MNIST, 32×32 CIFAR).

    Parameters on CIFAR-100 (3×32×32 input, 100 classes), identical to the benchmark code of
    Tian et al. (ICLR 2020): WRN-16-1 180,916; WRN-16-2 703,284; WRN-40-1 569,780;
    WRN-40-2 2,255,156.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        depth: int = 16,
        widen_factor: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"WideResNet widen_factor must be >= 1, got {widen_factor}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"WideResNet dropout must be in [0, 1), got {dropout}")
        blocks_per_stage = (depth - 4) // 6
        self.depth = depth
        self.widen_factor = widen_factor
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.stem = nn.Conv2d(int(input_shape[0]), 16, 3, padding=1, bias=False)
        c_in = 16
        stages = []
        for i, width in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(WideBasicBlock(c_in, width, stride, dropout))
                c_in = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(c_in)
        # Not in-place: its input, the final BN's output, is the last pre-activation feature map.
        self.relu = nn.ReLU()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, num_classes)
        init_conv_bn(self, zero_linear_bias=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(self.relu(self.bn(x))))


def wrn_16_1(input_shape: Sequence[int], num_classes: int) -> WideResNet:
    """WRN-16-1; 180,916 parameters on CIFAR-100."""
    return WideResNet(input_shape, num_classes, depth=16, widen_factor=1)


def wrn_16_2(input_shape: Sequence[int], num_classes: int) -> WideResNet:
    """WRN-16-2; 703,284 parameters on CIFAR-100."""
    return WideResNet(input_shape, num_classes, depth=16, widen_factor=2)


def wrn_40_1(input_shape: Sequence[int], num_classes: int) -> WideResNet:
    """WRN-40-1; 569,780 parameters on CIFAR-100."""
    return WideResNet(input_shape, num_classes, depth=40, widen_factor=1)


def wrn_40_2(input_shape: Sequence[int], num_classes: int) -> WideResNet:
    """WRN-40-2; 2,255,156 parameters on CIFAR-100."""
    return WideResNet(input_shape, num_classes, depth=40, widen_factor=2)
