"""Architectures: plain ``nn.Module``s that take ``(input_shape, num_classes, ...)`` and return logits.

Features inside a model are reached by module path with forward hooks, never through a
private forward signature, so any architecture can be a teacher or a student.

``conf/model/<name>.yaml`` points at these classes and builders (one file per architecture
serves the teacher and the student): the small ``CNN`` and ``MLP``, the CIFAR-100
distillation-benchmark architectures (CIFAR ResNets, Wide ResNets, VGG with BN, MobileNetV2)
and library models by name (``torchvision_model``, ``timm_model``). A model's settings are the
typed parameters of its constructor; their values are in its YAML file. A new architecture is
one module here (or anywhere importable) plus one YAML whose ``_target_`` names it.
"""

from distillab.models.cifar_resnet import (
    CifarResNet,
    resnet8,
    resnet8x4,
    resnet14,
    resnet20,
    resnet32,
    resnet32x4,
    resnet44,
    resnet56,
    resnet110,
)
from distillab.models.cnn import CNN
from distillab.models.hub import timm_model, torchvision_model
from distillab.models.mlp import MLP
from distillab.models.mobilenetv2 import MobileNetV2
from distillab.models.vgg import VGG, vgg8, vgg11, vgg13, vgg16, vgg19
from distillab.models.wrn import WideResNet, wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2

__all__ = [
    "CNN",
    "MLP",
    "CifarResNet",
    "MobileNetV2",
    "VGG",
    "WideResNet",
    "resnet8",
    "resnet8x4",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet32x4",
    "resnet44",
    "resnet56",
    "resnet110",
    "timm_model",
    "torchvision_model",
    "vgg8",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
    "wrn_16_1",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
]
