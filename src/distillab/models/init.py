"""Weight initialisation shared by the convolutional architectures of the zoo."""

from __future__ import annotations

from torch import nn


def init_conv_bn(model: nn.Module, zero_linear_bias: bool = False) -> None:
    """He (fan-out) initialisation for convolutions, unit scale and zero shift for batch norm,
    as the CIFAR benchmark models use; optionally zero biases of linear layers (WRN)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and zero_linear_bias and module.bias is not None:
            nn.init.zeros_(module.bias)
