"""Weight transfer from the teacher (``student.init=from_teacher``): which tensors are copied,
the interpolation, the errors, and a run end to end."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from distillab import pipeline
from distillab.config import ConfigError
from distillab.distill import transfer
from distillab.distill.transfer import NoMatchingTensors, block_indices, init_from_teacher, plan
from distillab.models import CNN, MLP, WideResNet, resnet8, resnet20, resnet32, resnet56
from distillab.steps.teacher import cache
from tests.conftest import teacher_folder

SHAPE, CLASSES = (3, 8, 8), 10


def trained_like(model: nn.Module, seed: int) -> nn.Module:
    """``model`` with weights and BatchNorm statistics unlike any fresh initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator).abs() + 0.1)
    model.train()
    with torch.no_grad():
        for _ in range(3):  # counts batches in num_batches_tracked
            model(torch.randn(4, *SHAPE, generator=generator))
    return model.eval()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


# -- which tensors ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build",
    [
        lambda: MLP(SHAPE, CLASSES, hidden=[16, 16], dropout=0.0, input_dropout=0.0),
        lambda: CNN(SHAPE, CLASSES, width=8, blocks=2, dropout=0.0),
        lambda: resnet8(SHAPE, CLASSES),
        lambda: WideResNet(SHAPE, CLASSES, depth=16, widen_factor=1),
    ],
    ids=["mlp", "cnn", "resnet8", "wrn_16_1"],
)
def test_the_same_architecture_copies_every_tensor_exactly(build):
    torch.manual_seed(0)
    student = build()
    teacher = trained_like(build(), seed=1)
    report = init_from_teacher(student, teacher)
    names = list(student.state_dict())
    assert report.copied == [(name, name) for name in names] and report.kept == []
    for name, tensor in student.state_dict().items():
        assert torch.equal(tensor, teacher.state_dict()[name]), name


# the teacher block each student block takes: floor(j·n_t/n_s + 1/2), written out by hand
DEEPER = {
    "resnet56->resnet20": (resnet56, resnet20, [0, 3, 6]),  # 9 → 3 blocks a stage
    "resnet32->resnet20": (resnet32, resnet20, [0, 2, 3]),  # 5 → 3
    "resnet20->resnet8": (resnet20, resnet8, [0]),  # 3 → 1
}


@pytest.mark.parametrize("pair", DEEPER, ids=list(DEEPER))
def test_a_shallower_resnet_takes_every_kth_block_of_the_deeper_one(pair):
    build_teacher, build_student, taken = DEEPER[pair]
    teacher = trained_like(build_teacher(SHAPE, CLASSES), seed=2)
    student = build_student(SHAPE, CLASSES)
    before = snapshot(teacher)

    def counterpart(name: str) -> str:
        match = re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", name)
        return f"layer{match[1]}.{taken[int(match[2])]}.{match[3]}" if match else name

    expected = [(name, counterpart(name)) for name in student.state_dict()]
    report = init_from_teacher(student, teacher)
    assert report.copied == expected and report.kept == []
    for student_name, teacher_name in expected:
        assert torch.equal(student.state_dict()[student_name], teacher.state_dict()[teacher_name])
    assert all(torch.equal(before[name], tensor) for name, tensor in teacher.state_dict().items())


def test_only_layers_whose_every_tensor_has_the_same_shape_are_copied():
    # stage 1 of the student (16 channels) takes stage 2 of the teacher (32): shapes differ, as
    # do the classifiers; only stage 0 matches, BatchNorm buffers included
    teacher = trained_like(CNN(SHAPE, CLASSES, width=8, blocks=3, dropout=0.0), seed=3)
    student = CNN(SHAPE, CLASSES, width=8, blocks=2, dropout=0.0)
    init = snapshot(student)
    report = init_from_teacher(student, teacher)
    names = list(init)
    assert report.copied == [(name, name) for name in names if name.startswith("stages.0.")]
    assert report.kept == [name for name in names if not name.startswith("stages.0.")]
    assert any(name.endswith("num_batches_tracked") for name, _ in report.copied)
    for name, tensor in student.state_dict().items():
        source = teacher.state_dict()[name] if name.startswith("stages.0.") else init[name]
        assert torch.equal(tensor, source), name


def test_an_mlp_student_takes_the_first_hidden_layer_and_classifier_of_a_deeper_mlp():
    # ReLU and dropout hold no tensors and do not count as blocks
    teacher = trained_like(MLP(SHAPE, CLASSES, hidden=[16, 16], dropout=0.1, input_dropout=0.0), seed=4)
    student = MLP(SHAPE, CLASSES, hidden=[16], dropout=0.0, input_dropout=0.0)
    names = ["features.1.weight", "features.1.bias", "classifier.weight", "classifier.bias"]
    assert plan(student, teacher) == [(name, name) for name in names]


def test_block_indices_follow_the_rule():
    assert block_indices(3, 9) == [0, 3, 6]
    assert block_indices(6, 12) == [0, 2, 4, 6, 8, 10]
    assert block_indices(2, 3) == [0, 2]  # 1.5 rounds up
    assert block_indices(4, 4) == [0, 1, 2, 3]
    assert block_indices(3, 2) == [0, 1]  # a deeper student keeps its last block


# -- interpolation ------------------------------------------------------------------------------
@pytest.mark.parametrize("weight", [0.25, 0.0])
def test_interpolation_is_exactly_the_weighted_sum(weight):
    torch.manual_seed(0)
    student = resnet8(SHAPE, CLASSES)
    teacher = trained_like(resnet8(SHAPE, CLASSES), seed=5)
    init = snapshot(student)
    report = init_from_teacher(student, teacher, weight=weight)
    assert len(report.copied) == len(init) and report.weight == weight
    for name, tensor in student.state_dict().items():
        theirs = teacher.state_dict()[name]
        if tensor.is_floating_point():
            assert torch.equal(tensor, weight * theirs + (1 - weight) * init[name]), name
        else:  # batch counters are copied unchanged
            assert name.endswith("num_batches_tracked") and int(theirs) == 3
            assert torch.equal(tensor, theirs)
    if weight == 0.0:
        assert all(torch.equal(student.state_dict()[n], init[n]) for n in init if init[n].is_floating_point())


# -- errors -------------------------------------------------------------------------------------
def test_architectures_without_a_common_layer_are_a_one_line_error():
    with pytest.raises(NoMatchingTensors) as info:
        init_from_teacher(
            MLP(SHAPE, CLASSES, hidden=[32], dropout=0.0, input_dropout=0.0),
            CNN(SHAPE, CLASSES, width=32, blocks=2, dropout=0.0),
        )
    message = str(info.value)
    assert "\n" not in message and "(MLP)" in message and "(CNN)" in message
    with pytest.raises(ValueError, match="init_weight"):
        init_from_teacher(resnet8(SHAPE, CLASSES), resnet8(SHAPE, CLASSES), weight=1.5)


@pytest.mark.parametrize(
    ("overrides", "start"),
    [
        (["student.init=from_teacher"], "student.init=from_teacher: no layer of the student (mlp)"),
        (["student.init=copy"], "student.init='copy' is not allowed: from_teacher, or null"),
        (["student.init=from_teacher", "student.init_weight=1.5"], "student.init_weight=1.5 is not allowed"),
        (["student.init=from_teacher", "teachers=[cnn,mlp]"], "student.init=from_teacher takes the weights of one"),
    ],
)
def test_bad_init_settings_fail_before_any_training(make_cfg, tmp_path, overrides, start):
    with pytest.raises(ConfigError) as info:
        pipeline.run(make_cfg(*overrides, own_cache=True))
    assert str(info.value).startswith(start) and "\n" not in str(info.value)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


# -- end to end -------------------------------------------------------------------------------
def test_a_run_starts_the_student_from_the_trained_teacher(make_cfg, tmp_path, monkeypatch):
    seen = {}

    def spy(student, teacher, weight=1.0, names=None):
        seen["teacher"] = snapshot(teacher)
        report = init_from_teacher(student, teacher, weight, names)
        seen["student"] = snapshot(student)
        return report

    monkeypatch.setattr(transfer, "init_from_teacher", spy)
    cfg = make_cfg("teacher=cnn", "student=cnn", "student.init=from_teacher", "teacher.width=8", "student.width=8")
    record = pipeline.run(cfg)
    assert record["status"] == "ok"
    init = record["student"]["init"]
    names = list(seen["student"])
    assert init == {
        "from": "teacher",
        "weight": 1.0,
        "copied": len(names),
        "tensors": [[name, name] for name in names],
        "kept": [],
    }
    # the teacher it copied is the trained one in the cache, and the copy is exact
    cached = cache.load_state_dict(teacher_folder(cfg) / cache.CHECKPOINT)
    for name in names:
        assert torch.equal(seen["teacher"][name], cached[name])
        assert torch.equal(seen["student"][name], cached[name])
    assert record["student"]["arch"] == record["teacher"]["arch"] == "cnn"
