"""OFD (Heo et al., ICCV 2019) and ReviewKD (Chen et al., CVPR 2021) against independent
computations: the margin against a numeric integral of the Gaussian, the partial L2 distance and
the hierarchical context loss against explicit float64 loops, the attention-based fusion against
a step-by-step recomputation. Then the layers each method finds on the zoo models, gradient flow,
one-line failures, the settings against the YAML, one short digits run per method, and the zoo
models whose stage-final ReLUs stopped working in place (same state_dict, same outputs)."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import get_class
from omegaconf import OmegaConf
from torch import nn

from distillab import conf, settings
from distillab.distill import hooks
from distillab.distill.hooks import FeatureTaps
from distillab.distill.methods.ofd import (
    OFD,
    bn_margin,
    margin_target,
    ofd_loss,
    partial_l2,
    preactivation_paths,
    preceding_batchnorms,
)
from distillab.distill.methods.reviewkd import ABF, ReviewKD, as_map, hcl_loss, review
from distillab.models import (
    CNN,
    MLP,
    cifar_resnet,
    mobilenetv2,
    resnet8,
    resnet20,
    torchvision_model,
    vgg,
    vgg8,
    vgg13,
    wrn,
    wrn_16_1,
    wrn_16_2,
)
from distillab.settings import ConfigError
from distillab.zoo import PUBLISHED_PARAMS
from tests.conftest import as_numpy as _np
from tests.conftest import randn as _randn

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER_ERRORS = tuple({ConfigError, hooks.ConfigError})


def _method(option: str, **overrides):
    return conf.build("distill", option, **overrides)


def _cnn(width: int, channels: int = 1, blocks: int = 2) -> CNN:
    return CNN((channels, 8, 8), 10, width=width, blocks=blocks, dropout=0.0)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- OFD: the margin -----------------------------------------------------------------------------------
def _negative_mean(gamma: float, beta: float) -> tuple[float, float]:
    """(P(x < 0), E[x | x < 0]) for x ~ N(β, γ²), by the trapezoid rule on a fine grid."""
    s = abs(gamma)
    x = np.linspace(min(beta, 0.0) - 40 * s, 0.0, 400_001)
    density = np.exp(-0.5 * ((x - beta) / s) ** 2) / (s * math.sqrt(2 * math.pi))
    mass = np.trapezoid(density, x)
    return mass, np.trapezoid(x * density, x) / mass


@pytest.mark.parametrize(
    "gamma, beta", [(1.0, 0.0), (2.0, 1.0), (-1.5, -0.5), (0.3, -1.0), (0.7, 1.8), (0.5, 2.0), (1.0, 5.0)]
)
def test_margin_is_the_mean_of_the_negative_part_by_numeric_integration(gamma, beta):
    probability, expected = _negative_mean(gamma, beta)
    margin = bn_margin(torch.tensor([gamma]), torch.tensor([beta])).item()
    if probability > 1e-3:  # the expectation of the negative part of N(β, γ²)
        assert margin == pytest.approx(expected, rel=1e-5, abs=1e-6)
    else:  # a negative output is too unlikely: −3|γ|, as the authors' code
        assert margin == pytest.approx(-3 * abs(gamma), rel=1e-6)
    assert margin <= 0


def test_margin_closed_forms_and_edge_cases():
    # γ = 1, β = 0: E[x | x < 0] of a standard normal is −√(2/π)
    assert bn_margin(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(-math.sqrt(2 / math.pi))
    # γ = 0: a constant β, whose negative part is β itself or 0
    assert bn_margin(torch.tensor([0.0, 0.0]), torch.tensor([-0.7, 0.4])).tolist() == pytest.approx([-0.7, 0.0])
    # a BN without affine parameters is γ = 1, β = 0
    assert bn_margin(None, None, 3).tolist() == pytest.approx([-math.sqrt(2 / math.pi)] * 3)
    assert bn_margin(torch.ones(2, dtype=torch.float64), torch.zeros(2)).dtype == torch.float64


# -- OFD: the distance -----------------------------------------------------------------------------------
def _partial_l2_loop(student: np.ndarray, teacher: np.ndarray, margin: np.ndarray) -> float:
    total = 0.0
    n, c, h, w = student.shape
    for i in range(n):
        for j in range(c):
            for y in range(h):
                for x in range(w):
                    s, t = student[i, j, y, x], max(teacher[i, j, y, x], margin[j])
                    if not (s <= t and t <= 0):
                        total += (s - t) ** 2
    return total


def test_partial_l2_on_hand_chosen_values():
    margin = torch.tensor([-1.0])
    teacher = torch.tensor([-3.0, -0.5, -0.5, 2.0, 2.0, -2.0]).view(1, 1, 1, 6)
    student = torch.tensor([-4.0, -1.0, 0.5, 1.0, 3.0, 0.0]).view(1, 1, 1, 6)
    # targets max(t, −1): −1, −0.5, −0.5, 2, 2, −1
    # skipped: s = −4 ≤ −1 ≤ 0 and s = −1 ≤ −0.5 ≤ 0; counted: (0.5 + 0.5)², (1 − 2)², (3 − 2)², (0 + 1)²
    target = margin_target(teacher, margin)
    assert target.flatten().tolist() == [-1.0, -0.5, -0.5, 2.0, 2.0, -1.0]
    assert partial_l2(student, target).item() == pytest.approx(1.0 + 1.0 + 1.0 + 1.0)


def test_partial_l2_against_an_explicit_loop():
    student, teacher = _randn(3, 4, 5, 5, seed=1), _randn(3, 4, 5, 5, seed=2) * 1.5
    margin = -_randn(4, seed=3).abs()
    expected = _partial_l2_loop(_np(student), _np(teacher), _np(margin))
    assert partial_l2(student, margin_target(teacher, margin)).item() == pytest.approx(expected, rel=1e-5)


def test_ofd_loss_halves_each_shallower_stage_and_divides_by_the_batch():
    shapes = [(4, 2, 8, 8), (4, 3, 4, 4), (4, 5, 2, 2)]
    students = [_randn(*s, seed=10 + i) for i, s in enumerate(shapes)]
    teachers = [_randn(*s, seed=20 + i) for i, s in enumerate(shapes)]
    margins = [-_randn(s[1], seed=30 + i).abs() for i, s in enumerate(shapes)]
    parts = [_partial_l2_loop(_np(s), _np(t), _np(m)) for s, t, m in zip(students, teachers, margins)]
    expected = (parts[0] / 4 + parts[1] / 2 + parts[2]) / 4
    assert ofd_loss(students, teachers, margins).item() == pytest.approx(expected, rel=1e-5)


# -- OFD: layers and BatchNorms on the zoo --------------------------------------------------------------
ZOO_PREACTIVATIONS = {
    "cnn": (
        lambda s: _cnn(4, s[0]),
        ["stages.0.1.2:in", "stages.1.1.2:in"],
        ["stages.0.1.1", "stages.1.1.1"],
    ),
    # the sum of the last block of each stage; the residual branch's bn2, never the projection's BN
    "resnet8": (
        lambda s: resnet8(s, 10),
        ["layer1.0.act:in", "layer2.0.act:in", "layer3.0.act:in"],
        ["layer1.0.bn2", "layer2.0.bn2", "layer3.0.bn2"],
    ),
    "resnet20": (
        lambda s: resnet20(s, 10),
        ["layer1.2.act:in", "layer2.2.act:in", "layer3.2.act:in"],
        ["layer1.2.bn2", "layer2.2.bn2", "layer3.2.bn2"],
    ),
    # pre-activation blocks: the BN-ReLU that reads each stage's output, as the authors' code
    "wrn_16_2": (
        lambda s: wrn_16_2(s, 10),
        ["layer2.0.relu1:in", "layer3.0.relu1:in", "relu:in"],
        ["layer2.0.bn1", "layer3.0.bn1", "bn"],
    ),
    "vgg8": (lambda s: vgg8(s, 10), [f"block{i}.2:in" for i in range(5)], [f"block{i}.1" for i in range(5)]),
    "vgg13": (lambda s: vgg13(s, 10), [f"block{i}.5:in" for i in range(5)], [f"block{i}.4" for i in range(5)]),
    # linear bottlenecks: the stage output itself; the last block's projection BN, never the BN
    # output the residual adds to it
    "mobilenetv2": (
        lambda s: mobilenetv2.mobilenetv2(s, 10),
        [f"stages.{i}" for i in range(7)],
        [f"stages.{i}.{j}.conv.7" for i, j in enumerate([0, 1, 2, 3, 2, 2, 0])],
    ),
}


@pytest.mark.parametrize("name", list(ZOO_PREACTIVATIONS))
def test_pre_activations_and_their_batchnorms_on_zoo_models(name):
    build, paths, norms = ZOO_PREACTIVATIONS[name]
    shape = (3, 32, 32) if name != "cnn" else (1, 8, 8)
    model, x = build(shape), _randn(2, *shape, seed=4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert preactivation_paths(model, x, "k") == paths
    assert preceding_batchnorms(model, paths, x, "k") == norms
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # BN statistics untouched
    assert model.training  # the mode is restored
    # where the pre-activation is a BN's output, the captured feature is exactly that output
    modules = dict(model.named_modules())
    if name in ("cnn", "wrn_16_2", "vgg8"):
        seen = {}
        taps = FeatureTaps(model.eval(), paths)
        for norm in norms:
            modules[norm].register_forward_hook(lambda m, a, out, norm=norm: seen.__setitem__(norm, out.clone()))
        with torch.no_grad():
            model(x)
        for feature, norm in zip(taps.take(), norms):
            assert torch.equal(feature, seen[norm]) and (feature < 0).any()  # before the ReLU


def test_ofd_binds_zoo_pairs_by_position_from_the_output_side():
    shape, x = (3, 8, 8), _randn(4, 3, 8, 8, seed=5)
    pairs = [
        (_cnn(4, 3), _cnn(8, 3), ["stages.0.1.2:in", "stages.1.1.2:in"], ["stages.0.1.2:in", "stages.1.1.2:in"]),
        (resnet8(shape, 10), resnet20(shape, 10), None, ["layer1.2.act:in", "layer2.2.act:in", "layer3.2.act:in"]),
        (wrn_16_1(shape, 10), wrn_16_2(shape, 10), None, ["layer2.0.relu1:in", "layer3.0.relu1:in", "relu:in"]),
        (vgg8(shape, 10), vgg13(shape, 10), None, [f"block{i}.5:in" for i in range(5)]),
        # 2 student stages, 3 teacher stages: the last two of each
        (_cnn(4, 3), resnet20(shape, 10), None, ["layer2.2.act:in", "layer3.2.act:in"]),
    ]
    for student, teacher, student_paths, teacher_paths in pairs:
        loss = _method("ofd")
        loss.bind(student, teacher, x)
        assert loss.teacher_paths == teacher_paths
        if student_paths is not None:
            assert loss.student_paths == student_paths
        assert loss.student_layers is None and loss.teacher_layers is None  # the configured values stay
        assert len(loss.connectors) == len(teacher_paths) == len(loss.teacher_norms)
    # fine-tuning a compressed copy: the student's layers on both sides
    loss = _method("ofd")
    loss.bind(resnet8(shape, 10), resnet8(shape, 10), x, same_architecture=True)
    assert loss.teacher_paths == loss.student_paths == ["layer1.0.act:in", "layer2.0.act:in", "layer3.0.act:in"]
    assert loss.teacher_norm_paths == ["layer1.0.bn2", "layer2.0.bn2", "layer3.0.bn2"]
    # explicit layers win and their BatchNorm is found the same way
    loss = _method("ofd", student_layers=["stages.1.1.2:in"], teacher_layers=["layer3.0.act:in"])
    loss.bind(_cnn(4, 3), resnet8(shape, 10), x)
    assert loss.teacher_norm_paths == ["layer3.0.bn2"]


def test_ofd_without_a_batchnorm_before_the_teacher_feature_fails_in_one_line():
    x = _randn(4, 1, 8, 8, seed=6)
    no_bn = nn.Sequential()
    no_bn.stages = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
    )
    no_bn.classifier = nn.Linear(8, 10)
    mlp = MLP((1, 8, 8), 10, hidden=[32], dropout=0.0, input_dropout=0.0)
    for teacher, path in ((no_bn, "'stages.0.1:in'"), (mlp, "'features.2:in'")):
        with pytest.raises(ConfigError) as error:
            _method("ofd").bind(_cnn(4), teacher, x)
        message = str(error.value)
        assert "\n" not in message and message.startswith("distill.teacher_layers:") and path in message
        assert "BatchNorm" in message
    # a configured post-ReLU output has no BN output behind it either
    with pytest.raises(ConfigError, match=r"^distill\.teacher_layers: .*'layer2'") as error:
        _method("ofd", teacher_layers=["layer2", "layer3"]).bind(_cnn(4), resnet8((1, 8, 8), 10), x)
    assert "\n" not in str(error.value)


def test_an_in_place_relu_fails_in_one_line():
    teacher = torchvision_model((3, 8, 8), 10, name="resnet18", pretrained=False, weights=None)
    with pytest.raises(LAYER_ERRORS) as error:
        _method("ofd").bind(_cnn(4, 3), teacher, _randn(4, 3, 8, 8, seed=7))
    message = str(error.value)
    assert "\n" not in message and message.startswith("distill.teacher_layers") and "in place" in message


def test_ofd_terms_follow_the_live_teacher_and_match_a_loop():
    torch.manual_seed(0)
    student, teacher = _cnn(4), _cnn(8)
    x = _randn(6, 1, 8, 8, seed=8)
    loss = _method("ofd", ofd_weight=0.5)
    loss.bind(student, teacher, x[:4])
    # the teacher is trained or loaded after bind: the margins come from its own BNs at each step
    modules = dict(teacher.named_modules())
    assert all(norm is modules[path] for norm, path in zip(loss.teacher_norms, loss.teacher_norm_paths))
    for i, norm in enumerate(loss.teacher_norms):
        norm.weight.data = _randn(norm.num_features, seed=40 + i)
        norm.bias.data = _randn(norm.num_features, seed=50 + i)
    teacher.eval()
    taps = [FeatureTaps(student, loss.student_paths), FeatureTaps(teacher, loss.teacher_paths)]
    with torch.no_grad():
        student(x), teacher(x)
    s_feats, t_feats = taps[0].take(), taps[1].take()
    loss.eval()  # the connectors' BN on running statistics: a fixed map to recompute
    with torch.no_grad():
        got = loss.feature_terms(s_feats, t_feats)["ofd"].item()
    expected = 0.0
    for i, (s, t, connector, norm) in enumerate(zip(s_feats, t_feats, loss.connectors, loss.teacher_norms)):
        w = _np(connector.conv.weight)[:, :, 0, 0]
        mapped = np.einsum("oc,nchw->nohw", w, _np(s))
        bn = connector.bn
        scale = _np(bn.weight) / np.sqrt(_np(bn.running_var) + bn.eps)
        mapped = (mapped - _np(bn.running_mean)[None, :, None, None]) * scale[None, :, None, None]
        mapped = mapped + _np(bn.bias)[None, :, None, None]
        margin = np.array([_negative_mean(g, b)[1] for g, b in zip(_np(norm.weight), _np(norm.bias))])
        probability = np.array([_negative_mean(g, b)[0] for g, b in zip(_np(norm.weight), _np(norm.bias))])
        margin = np.where(probability > 1e-3, margin, -3 * np.abs(_np(norm.weight)))
        expected += _partial_l2_loop(mapped, _np(t), margin) / 2 ** (len(s_feats) - 1 - i)
    assert got == pytest.approx(0.5 * expected / len(x), rel=1e-4)


def test_ofd_gradients_reach_the_student_and_connectors_never_the_teacher():
    torch.manual_seed(0)
    student, teacher = _cnn(4), _cnn(8)
    x, y = _randn(8, 1, 8, 8, seed=9), torch.arange(8) % 10
    loss = _method("ofd")
    loss.bind(student, teacher, x[:4])
    taps = [FeatureTaps(student, loss.student_paths), FeatureTaps(teacher, loss.teacher_paths)]
    logits, teacher_logits = student(x), teacher(x)  # the teacher with gradients on: the loss must cut them
    terms = loss(logits, teacher_logits, y, taps[0].take(), taps[1].take())
    assert torch.isfinite(terms["ofd"]) and terms["ofd"] > 0
    terms["ofd"].backward()
    assert student.stages[0][0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())
    assert all(p.grad is None for p in teacher.parameters())  # the margins' BNs included
    # the teacher's BNs are read, not owned: neither trained nor counted with the method
    assert _params(loss) == (4 * 8 + 2 * 8) + (8 * 16 + 2 * 16)  # 4 → 8 and 8 → 16 channels
    assert not any(name.startswith("teacher") for name, _ in loss.named_parameters())


# -- ReviewKD: the hierarchical context loss ----------------------------------------------------------
def _pool(x: np.ndarray, k: int) -> np.ndarray:
    """Adaptive average pooling to k×k by explicit loops over the bins."""
    n, c, h, w = x.shape
    out = np.zeros((n, c, k, k))
    for i in range(k):
        for j in range(k):
            r0, r1 = (i * h) // k, -((-(i + 1) * h) // k)
            c0, c1 = (j * w) // k, -((-(j + 1) * w) // k)
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    return out


def _hcl_loop(s: np.ndarray, t: np.ndarray) -> float:
    size = s.shape[2]
    terms = [(1.0, ((s - t) ** 2).mean())]
    for k in (4, 2, 1):
        if k < size:
            terms.append((terms[-1][0] / 2, ((_pool(s, k) - _pool(t, k)) ** 2).mean()))
    return sum(w * v for w, v in terms) / sum(w for w, _ in terms)


@pytest.mark.parametrize("size", [8, 6, 4, 2, 1])
def test_hcl_against_explicit_pooling_loops(size):
    s, t = _randn(3, 5, size, size, seed=11), _randn(3, 5, size, size, seed=12)
    assert hcl_loss(s, t).item() == pytest.approx(_hcl_loop(_np(s), _np(t)), rel=1e-5)


def test_hcl_closed_forms():
    # a constant difference a: every level's MSE is a², so their weighted mean is a² too
    s, t = torch.full((2, 3, 8, 8), 1.5), torch.zeros(2, 3, 8, 8)
    assert hcl_loss(s, t).item() == pytest.approx(2.25)
    # zero-mean ±1 checkerboard on 8×8: full-size MSE 1, every pooled MSE 0; weights 1, ½, ¼, ⅛
    board = torch.tensor([[(-1.0) ** (i + j) for j in range(8)] for i in range(8)]).expand(1, 1, 8, 8)
    assert hcl_loss(board, torch.zeros_like(board)).item() == pytest.approx(1 / 1.875)
    # on 4×4 the 4×4 pooling is skipped and 2×2, 1×1 take ½, ¼ (the authors' rule)
    assert hcl_loss(board[..., :4, :4], torch.zeros(1, 1, 4, 4)).item() == pytest.approx(1 / 1.75)


# -- ReviewKD: attention-based fusion ------------------------------------------------------------------
def test_abf_fuses_the_deeper_level_as_a_step_by_step_recomputation():
    torch.manual_seed(1)
    abf = ABF(3, 4, 5, fuse=True).eval()
    for module in abf.modules():  # BNs with non-trivial statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5), module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5), module.bias.data.uniform_(-0.5, 0.5)
    x, deeper = _randn(2, 3, 4, 4, seed=13), _randn(2, 4, 2, 2, seed=14)
    with torch.no_grad():
        out, fused = abf(x, deeper, (8, 8))

    def bn(v, m):
        scale = _np(m.weight) / np.sqrt(_np(m.running_var) + m.eps)
        return (v - _np(m.running_mean)[None, :, None, None]) * scale[None, :, None, None] + _np(m.bias)[
            None, :, None, None
        ]

    mid = bn(np.einsum("oc,nchw->nohw", _np(abf.to_mid[0].weight)[:, :, 0, 0], _np(x)), abf.to_mid[1])
    up = _np(deeper).repeat(2, axis=2).repeat(2, axis=3)  # nearest, 2×2 → 4×4
    att = abf.attention[0]
    logits = np.einsum("oc,nchw->nohw", _np(att.weight)[:, :, 0, 0], np.concatenate([mid, up], 1))
    a = 1 / (1 + np.exp(-(logits + _np(att.bias)[None, :, None, None])))
    mixed = mid * a[:, :1] + up * a[:, 1:]
    big = mixed.repeat(2, axis=2).repeat(2, axis=3)  # to the teacher's 8×8
    padded, kernel = np.pad(big, ((0, 0), (0, 0), (1, 1), (1, 1))), _np(abf.to_teacher[0].weight)
    conv = sum(
        np.einsum("oc,nchw->nohw", kernel[:, :, dy, dx], padded[:, :, dy : dy + 8, dx : dx + 8])
        for dy in range(3)
        for dx in range(3)
    )
    expected = bn(conv, abf.to_teacher[1])
    assert np.allclose(_np(fused), big, atol=1e-5) and np.allclose(_np(out), expected, atol=1e-4)


def test_abf_shapes_and_parameters_through_a_zoo_pair():
    shape, x = (3, 32, 32), _randn(4, 3, 32, 32, seed=15)
    student, teacher = resnet8(shape, 100), resnet20(shape, 100)
    loss = _method("reviewkd")
    loss.bind(student, teacher, x)
    assert loss.student_paths == ["layer1", "layer2", "layer3", "fc:in"]
    assert loss.teacher_paths == ["layer1.2.act:in", "layer2.2.act:in", "layer3.2.act:in", "fc:in"]
    taps = [FeatureTaps(student, loss.student_paths), FeatureTaps(teacher, loss.teacher_paths)]
    with torch.no_grad():
        student(x), teacher(x)
    s_feats, t_feats = taps[0].take(), taps[1].take()
    fused = review(loss.abfs, s_feats, loss.teacher_sizes)
    assert [tuple(f.shape) for f in fused] == [(4, 16, 32, 32), (4, 32, 16, 16), (4, 64, 8, 8), (4, 64, 1, 1)]
    assert [f.shape for f in fused] == [as_map(t).shape for t in t_feats]  # each the teacher's shape
    # mid = min(512, 64 channels of the student's last level); the deepest level does not fuse
    mid = 64

    def abf(c_in: int, c_out: int, fuse: bool) -> int:
        return c_in * mid + 2 * mid + mid * c_out * 9 + 2 * c_out + (2 * mid * 2 + 2 if fuse else 0)

    assert _params(loss) == abf(16, 16, True) + abf(32, 32, True) + abf(64, 64, True) + abf(64, 64, False)
    assert _params(loss) == 114_278  # the same ABFs as the authors' resnet20 student: in/out 16, 32, 64, 64


def test_reviewkd_resizes_the_student_to_the_teacher_and_pairs_from_the_output_side():
    x = _randn(4, 1, 8, 8, seed=16)
    loss = _method("reviewkd")
    loss.bind(_cnn(4), _cnn(8), x)
    # the CNN's stage outputs are pooled (4×4, 2×2); the teacher's pre-activations are not (8×8, 4×4)
    assert loss.student_paths == ["stages.0", "stages.1", "classifier:in"]
    assert loss.teacher_paths == ["stages.0.1.2:in", "stages.1.1.2:in", "classifier:in"]
    assert loss.teacher_sizes == [(8, 8), (4, 4), (1, 1)]
    loss = _method("reviewkd")
    loss.bind(_cnn(4), resnet8((1, 8, 8), 10), x)  # 2 + 1 student levels, 3 + 1 teacher levels
    assert loss.teacher_paths == ["layer2.0.act:in", "layer3.0.act:in", "fc:in"]
    loss = _method("reviewkd")
    loss.bind(wrn_16_1((1, 8, 8), 10), vgg8((1, 8, 8), 10), x)
    assert loss.student_paths == ["layer1", "layer2", "layer3", "fc:in"]
    assert loss.teacher_paths == ["block2.2:in", "block3.2:in", "block4.2:in", "classifier:in"]


def test_reviewkd_warm_up_scales_the_term():
    torch.manual_seed(0)
    student, teacher = _cnn(4), _cnn(8)
    x = _randn(6, 1, 8, 8, seed=17)
    loss = _method("reviewkd", warmup_epochs=4, hcl_weight=2.0)
    loss.bind(student, teacher, x[:4])
    taps = [FeatureTaps(student, loss.student_paths), FeatureTaps(teacher, loss.teacher_paths)]
    with torch.no_grad():
        student(x), teacher(x)
    s_feats, t_feats = taps[0].take(), taps[1].take()
    loss.eval()
    with torch.no_grad():
        full = sum(
            hcl_loss(f, t if t.dim() == 4 else t[:, :, None, None])
            for f, t in zip(review(loss.abfs, s_feats, loss.teacher_sizes), t_feats)
        )
        for epoch, w in ((0, 0.25), (1, 0.5), (3, 1.0), (10, 1.0)):
            loss.on_epoch_start(epoch)
            assert loss.feature_terms(s_feats, t_feats)["hcl"].item() == pytest.approx(w * 2.0 * full.item(), rel=1e-6)


def test_reviewkd_gradients_reach_the_student_and_abfs_never_the_teacher():
    torch.manual_seed(0)
    student, teacher = _cnn(4), _cnn(8)
    x, y = _randn(8, 1, 8, 8, seed=18), torch.arange(8) % 10
    loss = _method("reviewkd", warmup_epochs=0)
    loss.bind(student, teacher, x[:4])
    taps = [FeatureTaps(student, loss.student_paths), FeatureTaps(teacher, loss.teacher_paths)]
    logits, teacher_logits = student(x), teacher(x)
    terms = loss(logits, teacher_logits, y, taps[0].take(), taps[1].take())
    assert torch.isfinite(terms["hcl"]) and terms["hcl"] > 0
    terms["hcl"].backward()
    assert student.stages[0][0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_reviewkd_needs_maps_or_vectors():
    x = _randn(4, 1, 8, 8, seed=19)
    loss = _method("reviewkd", student_layers=["stages.1", "classifier"], teacher_layers=["stages.1", "classifier"])
    loss.bind(_cnn(4), _cnn(8), x)  # logits are vectors too: 1×1 maps
    assert [a.to_mid[0].in_channels for a in loss.abfs] == [8, 10] and loss.teacher_sizes == [(2, 2), (1, 1)]
    tokens = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(2))  # N×C×L: neither
    with pytest.raises(ConfigError) as error:
        _method("reviewkd", student_layers=["stages.1"], teacher_layers=["1"]).bind(_cnn(4), tokens, x)
    message = str(error.value)
    assert "\n" not in message and message.startswith("distill.teacher_layers") and "[4, 4, 64]" in message


# -- settings: declared on the constructor, valued in conf/distill/ ------------------------------------
def _yaml(option: str) -> tuple[str, dict]:
    values = OmegaConf.to_container(conf.load("distill", option))
    return values.pop("_target_"), values


def test_the_options_build_their_classes_with_the_yaml_values():
    ofd, review_kd = _method("ofd"), _method("reviewkd")
    assert type(ofd) is OFD and type(review_kd) is ReviewKD
    assert ofd.ofd_weight == 0.001 and ofd.lam == 0.0
    assert (review_kd.hcl_weight, review_kd.warmup_epochs, review_kd.max_mid_channels) == (1.0, 20, 512)
    assert review_kd.warmup == pytest.approx(1 / 20)


BAD = [
    ("ofd", {"ofd_weight": -1}, "ofd_weight=-1 is not allowed: a weight >= 0"),
    ("ofd", {"teacher_layers": 3}, "teacher_layers=3 is not allowed: a string or a list, or null"),
    ("ofd", {"kd": {"lam": 2, "temperature": 4.0}}, "kd.lam=2 is not allowed: a weight in [0, 1]"),
    ("reviewkd", {"hcl_weight": float("nan")}, "hcl_weight=nan is not allowed: a weight >= 0"),
    ("reviewkd", {"warmup_epochs": -1}, "warmup_epochs=-1 is not allowed: epochs >= 0 (the HCL term ramps up"),
    ("reviewkd", {"max_mid_channels": 0}, "max_mid_channels=0 is not allowed: channels >= 1"),
    ("reviewkd", {"warmup_epochs": 2.5}, "warmup_epochs=2.5 is not allowed: epochs >= 0"),
]


@pytest.mark.parametrize("option, bad, message", BAD)
def test_a_bad_value_fails_in_one_line_naming_the_key(option, bad, message):
    target, values = _yaml(option)
    values.update(bad)
    with pytest.raises(ConfigError) as error:
        settings.check("distill", values, target)
    assert str(error.value).startswith(f"distill.{message}") and "\n" not in str(error.value)
    with pytest.raises(ConfigError) as error:
        get_class(target)(**values)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


# -- one short digits run per method -------------------------------------------------------------------
def _logged(run: Path) -> list[dict[str, float]]:
    rows = csv.DictReader((run / "csv" / "student" / "metrics.csv").open())
    return [{k: float(v) for k, v in row.items() if v} for row in rows if row.get("train/loss")]


# the digits pair: teacher cnn (width 32: 32, 64 channels), student cnn width 8 (8, 16 channels)
RUNS = {
    # connectors 8 → 32 and 16 → 64: 1×1 conv + BN each
    "ofd": (["distill=ofd"], "ofd", (8 * 32 + 2 * 32) + (16 * 64 + 2 * 64)),
    # ABFs with mid = 16 (the student's embedding): levels (8 → 32), (16 → 64), embedding (16 → 64)
    "reviewkd": (
        ["distill=reviewkd", "distill.warmup_epochs=0"],
        "hcl",
        (8 * 16 + 32 + 16 * 32 * 9 + 64 + 66)
        + (16 * 16 + 32 + 16 * 64 * 9 + 128 + 66)
        + (16 * 16 + 32 + 16 * 64 * 9 + 128),
    ),
}


@pytest.mark.parametrize("method", list(RUNS))
def test_digits_run_per_method(method, make_cfg, tmp_path, teacher_cache):
    overrides, name, extra = RUNS[method]
    from distillab import pipeline

    cfg = make_cfg(*overrides, "student=cnn", "student.width=8", cache=teacher_cache)
    record = pipeline.run(cfg)
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["status"] == "ok" and on_disk["method"] == method
    epochs = _logged(tmp_path / "run")
    assert len(epochs) == 3
    values = [row[f"train/{name}"] for row in epochs]
    assert all(math.isfinite(v) and v > 0 for v in values), values
    assert values[-1] < values[0], values
    student = record["student"]
    assert student["params"] == _params(CNN((1, 8, 8), 10, width=8, blocks=2, dropout=0.0))
    assert student["extra_params"] == extra


# -- the zoo: stage-final ReLUs that no longer work in place ------------------------------------------
def _digest(model: nn.Module) -> tuple[int, str]:
    lines = [f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items()]
    return len(lines), hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


#: state_dict keys and shapes of the zoo models before their ReLUs stopped working in place
#: (count, sha256 of "key:shape" lines): checkpoints and cached teachers load as before
STATE_DIGESTS = {
    "resnet8": (56, "93ee7c7fc720b08a"),
    "resnet14": (92, "bde3d0b567dab4bf"),
    "resnet20": (128, "09f9a8fccc0d86a1"),
    "resnet32": (200, "e61b818445f802e1"),
    "resnet44": (272, "69ffecc75ba7d356"),
    "resnet56": (344, "7315f7f91537d4d1"),
    "resnet110": (668, "cc559a3a2796a6e5"),
    "resnet8x4": (62, "e5d2de8bccd5fb0f"),
    "resnet32x4": (206, "23e96a9b13dff02a"),
    "wrn_16_1": (82, "ff1cbfbb8f3ef5a7"),
    "wrn_16_2": (83, "16ae9b8a44f35122"),
    "wrn_40_1": (226, "b4636d9100f00ad3"),
    "wrn_40_2": (227, "152b577a87589c6f"),
    "vgg8": (37, "792c36c85a183c23"),
    "vgg11": (58, "7edcbfd7d4b24633"),
    "vgg13": (72, "adbafd0e22ce9038"),
    "vgg16": (93, "4b0f395fe5fbd954"),
    "vgg19": (114, "0820bef0b1c3cee0"),
    "mobilenetv2": (320, "bbe1bba49f16d0a5"),
    "cnn": (26, "9ba2ef3883566fdb"),
}


#: parameter counts of the zoo models the published table leaves out (vgg.py's docstrings; the
#: digits teacher: four 3×3 conv-BN layers of 32, 32, 64, 64 channels and a linear classifier)
OTHER_PARAMS = {
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "cnn": (9 * 32 + 64) + (9 * 32 * 32 + 64) + (9 * 32 * 64 + 128) + (9 * 64 * 64 + 128) + (64 * 10 + 10),
}


def _zoo(name: str) -> nn.Module:
    if name == "cnn":
        return CNN((1, 8, 8), 10, width=32, blocks=2, dropout=0.0)
    for module in (cifar_resnet, wrn, vgg, mobilenetv2):
        if hasattr(module, name):
            return getattr(module, name)((3, 32, 32), 100)
    raise KeyError(name)


@pytest.mark.parametrize("name", list(STATE_DIGESTS))
def test_zoo_state_dicts_and_outputs_are_unchanged(name):
    torch.manual_seed(0)
    model = _zoo(name)
    assert _digest(model) == STATE_DIGESTS[name]
    assert _params(model) == {**PUBLISHED_PARAMS, **OTHER_PARAMS}[name]
    # the same weights with every ReLU in place, as before: the same outputs, bit for bit
    before = _zoo(name)
    before.load_state_dict(model.state_dict())
    for module in before.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = True
    x = _randn(2, 1, 8, 8, seed=20) if name == "cnn" else _randn(2, 3, 32, 32, seed=20)
    model.eval(), before.eval()
    with torch.no_grad():
        assert torch.equal(model(x), before(x))
    # the stage-final ReLUs OFD reads are not in place
    for path in preactivation_paths(model, x, "k"):
        module, use_input = hooks.resolve(model, path, "k"), hooks.split_path(path)[1]
        assert not (use_input and getattr(module, "inplace", False))
