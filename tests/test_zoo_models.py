"""CIFAR-100 distillation-benchmark architectures: sizes, shapes, hook paths and gradients."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from distillab.models import cifar_resnet, mobilenetv2, vgg, wrn
from distillab.models.cifar_resnet import CifarResNet
from distillab.models.mobilenetv2 import MobileNetV2
from distillab.models.vgg import VGG
from distillab.models.wrn import WideResNet
from distillab.zoo import PUBLISHED_PARAMS

pytestmark = pytest.mark.usefixtures("one_thread")

BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet8": cifar_resnet.resnet8,
    "resnet14": cifar_resnet.resnet14,
    "resnet20": cifar_resnet.resnet20,
    "resnet32": cifar_resnet.resnet32,
    "resnet44": cifar_resnet.resnet44,
    "resnet56": cifar_resnet.resnet56,
    "resnet110": cifar_resnet.resnet110,
    "resnet8x4": cifar_resnet.resnet8x4,
    "resnet32x4": cifar_resnet.resnet32x4,
    "wrn_16_1": wrn.wrn_16_1,
    "wrn_16_2": wrn.wrn_16_2,
    "wrn_40_1": wrn.wrn_40_1,
    "wrn_40_2": wrn.wrn_40_2,
    "vgg8": vgg.vgg8,
    "vgg11": vgg.vgg11,
    "vgg13": vgg.vgg13,
    "vgg16": vgg.vgg16,
    "vgg19": vgg.vgg19,
    "mobilenetv2": mobilenetv2.mobilenetv2,
}

BENCHMARK_PARAMS = PUBLISHED_PARAMS  # the published counts, kept once in distillab.zoo

# Feature-hook paths, the first conv of the network, and the feature shapes (C, H, W) the
# named modules produce on a 3×32×32 input.
FEATURES = {
    "resnet20": (
        "stem.0",
        {
            "stem": (16, 32, 32),
            "layer1": (16, 32, 32),
            "layer2": (32, 16, 16),
            "layer3": (64, 8, 8),
            "layer3.2.act": (64, 8, 8),
            "pool": (64,),
        },
    ),
    "resnet8x4": (
        "stem.0",
        {
            "stem": (32, 32, 32),
            "layer1": (64, 32, 32),
            "layer2": (128, 16, 16),
            "layer3": (256, 8, 8),
            "pool": (256,),
        },
    ),
    "wrn_40_2": (
        "stem",
        {
            "stem": (16, 32, 32),
            "layer1": (32, 32, 32),
            "layer2": (64, 16, 16),
            "layer3": (128, 8, 8),
            "relu": (128, 8, 8),
            "pool": (128,),
        },
    ),
    "vgg13": (
        "block0.0",
        {
            "block0": (64, 32, 32),
            "pool0": (64, 16, 16),
            "block1": (128, 16, 16),
            "block2": (256, 8, 8),
            "block3": (512, 4, 4),
            "pool3": (512, 4, 4),
            "block4": (512, 4, 4),
            "pool": (512,),
        },
    ),
    "mobilenetv2": (
        "stem.0",
        {
            "stem": (16, 16, 16),
            "stages.0": (8, 16, 16),
            "stages.1": (12, 16, 16),
            "stages.2": (16, 8, 8),
            "stages.3": (32, 4, 4),
            "stages.4": (48, 4, 4),
            "stages.5": (80, 2, 2),
            "stages.6": (160, 2, 2),
            "conv_last": (1280, 2, 2),
            "pool": (1280,),
        },
    ),
}
FIRST_CONV = {
    **{name: "stem.0" for name in BUILDERS if name.startswith("resnet")},
    **{name: "stem" for name in BUILDERS if name.startswith("wrn")},
    **{name: "block0.0" for name in BUILDERS if name.startswith("vgg")},
    "mobilenetv2": "stem.0",
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(BENCHMARK_PARAMS))
def test_parameter_count_matches_benchmark(name: str) -> None:
    count = n_params(BUILDERS[name]((3, 32, 32), 100))
    print(f"{name}: {count:,} parameters (benchmark {BENCHMARK_PARAMS[name]:,})")
    assert count == BENCHMARK_PARAMS[name]


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_forward_returns_logits(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = BUILDERS[name](shape, 7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(FEATURES))
def test_feature_hook_paths(name: str) -> None:
    first_conv, expected = FEATURES[name]
    model = BUILDERS[name]((3, 32, 32), 100).eval()
    modules = dict(model.named_modules())
    assert isinstance(modules[first_conv], nn.Conv2d)
    assert modules[first_conv].in_channels == 3
    assert set(expected) <= set(modules)
    seen: dict[str, tuple[int, ...]] = {}
    for path in expected:
        modules[path].register_forward_hook(lambda _m, _i, out, path=path: seen.__setitem__(path, tuple(out.shape[1:])))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert seen == expected


@pytest.mark.parametrize("name", list(BUILDERS))
def test_train_mode_backward_reaches_first_conv(name: str) -> None:
    torch.manual_seed(0)
    model = BUILDERS[name]((1, 8, 8), 5).train()
    first_conv = dict(model.named_modules())[FIRST_CONV[name]]
    assert isinstance(first_conv, nn.Conv2d) and first_conv.in_channels == 1
    loss = nn.functional.cross_entropy(model(torch.randn(2, 1, 8, 8)), torch.tensor([0, 3]))
    loss.backward()
    grad = first_conv.weight.grad
    assert grad is not None
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_resnet_shortcuts_are_projections_only_where_shape_changes() -> None:
    plain = cifar_resnet.resnet20((3, 32, 32), 10)
    wide = cifar_resnet.resnet8x4((3, 32, 32), 10)
    for model, first_stage_projects in ((plain, False), (wide, True)):
        for stage in ("layer1", "layer2", "layer3"):
            blocks = list(getattr(model, stage))
            projects = stage != "layer1" or first_stage_projects
            assert isinstance(blocks[0].downsample, nn.Sequential) == projects
            assert all(isinstance(b.downsample, nn.Identity) for b in blocks[1:])
    assert len(plain.layer1) == 3 and len(cifar_resnet.resnet110((3, 32, 32), 10).layer3) == 18


def test_wrn_shortcut_convs_and_dropout() -> None:
    model = wrn.wrn_16_1((3, 32, 32), 10)
    assert [b.shortcut is not None for s in ("layer1", "layer2", "layer3") for b in getattr(model, s)] == [
        False,
        False,
        True,
        False,
        True,
        False,
    ]
    wide = wrn.wrn_16_2((3, 32, 32), 10)
    assert wide.layer1[0].shortcut is not None and wide.layer1[1].shortcut is None
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    dropped = WideResNet((3, 32, 32), 10, depth=16, widen_factor=1, dropout=0.3)
    assert sum(isinstance(m, nn.Dropout) for m in dropped.modules()) == 6


def test_residual_paths_carry_the_shortcut() -> None:
    torch.manual_seed(0)
    # With the residual branch silenced, each block reduces to its shortcut.
    x = torch.randn(2, 16, 8, 8)
    res_block = cifar_resnet.BasicBlock(16, 32, stride=2).eval()
    nn.init.zeros_(res_block.bn2.weight)
    with torch.no_grad():
        assert torch.allclose(res_block(x), torch.relu(res_block.downsample(x)))
        identity = cifar_resnet.BasicBlock(16, 16).eval()
        nn.init.zeros_(identity.bn2.weight)
        assert torch.allclose(identity(x), torch.relu(x))
    for c_out, stride in ((16, 1), (32, 2)):
        block = wrn.WideBasicBlock(16, c_out, stride).eval()
        nn.init.zeros_(block.conv2.weight)
        with torch.no_grad():
            activated = block.relu1(block.bn1(x))
            expected = x if block.shortcut is None else block.shortcut(activated)
            assert torch.allclose(block(x), expected)
    for c_out, residual in ((16, True), (24, False)):
        inverted = mobilenetv2.InvertedResidual(16, c_out, 1, 6).eval()
        nn.init.zeros_(inverted.conv[-1].weight)
        with torch.no_grad():
            assert torch.allclose(inverted(x), x if residual else torch.zeros(2, c_out, 8, 8))


@pytest.mark.parametrize(
    ("shape", "pooled"),
    [
        ((3, 32, 32), [True, True, True, False]),
        ((3, 64, 64), [True, True, True, True]),
        ((1, 8, 8), [True, True, True, False]),
        ((1, 2, 2), [True, False, False, False]),
        ((1, 28, 28), [True, True, True, False]),
    ],
)
def test_vgg_pool_placement(shape: tuple[int, int, int], pooled: list[bool]) -> None:
    model = vgg.vgg8(shape, 10).eval()
    assert [isinstance(getattr(model, f"pool{i}"), nn.MaxPool2d) for i in range(4)] == pooled
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, 10)


def test_mobilenetv2_layer_choices() -> None:
    model = mobilenetv2.mobilenetv2((3, 32, 32), 100)
    assert model.last_channels == 1280
    first = model.stages[0][0]
    assert isinstance(first.conv[0], nn.Conv2d) and first.conv[0].kernel_size == (1, 1)
    assert (first.conv[0].in_channels, first.conv[0].out_channels) == (16, 16)
    # One letter per block, stages (t, c, n, s) in order: R = identity shortcut, - = none.
    residual = "".join("R" if b.use_residual else "-" for stage in model.stages for b in stage)
    assert residual == "-" + "-R" + "-RR" + "-RRR" + "-RR" + "-RR" + "-"
    assert not any(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    full = MobileNetV2((3, 32, 32), 10, width_mult=1.0)
    assert full.last_channels == 1280 and full.stem[0].out_channels == 32
    assert MobileNetV2((3, 32, 32), 10, width_mult=1.5).last_channels == 1920


def test_weight_init() -> None:
    model = cifar_resnet.resnet20((3, 32, 32), 10)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
    conv = model.layer3[1].conv1
    expected_std = math.sqrt(2.0 / (conv.out_channels * 9))
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)
    vgg_conv = vgg.vgg8((3, 32, 32), 10).block2[0]
    assert torch.all(vgg_conv.bias == 0)
    assert vgg_conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / (256 * 9)), rel=0.05)


@pytest.mark.parametrize(
    "build",
    [
        lambda: CifarResNet((3, 32, 32), 10, depth=21),
        lambda: CifarResNet((3, 32, 32), 10, depth=2),
        lambda: WideResNet((3, 32, 32), 10, depth=15),
        lambda: WideResNet((3, 32, 32), 10, depth=16, widen_factor=0),
        lambda: VGG((3, 32, 32), 10, depth=10),
        lambda: MobileNetV2((3, 32, 32), 10, width_mult=0.0),
    ],
)
def test_invalid_options_raise(build: Callable[[], nn.Module]) -> None:
    with pytest.raises(ValueError):
        build()
