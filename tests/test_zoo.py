"""The model zoo: every conf/model entry works as teacher and student, library models by name
(torchvision, timm) adapt to the data and fail with one line, and the zoo table."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from distillab import build as parts
from distillab import measure, pipeline, results, zoo
from distillab.config import ROLE_KEYS, ConfigError
from distillab.data.adapter import DataInfo
from distillab.models import hub, resnet8
from distillab.models.text import reads_tokens
from distillab.zoo import PUBLISHED_PARAMS
from tests.conftest import CONF, ROOT, compose_cfg

ZOO = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
# text models read token ids: tests/test_text_models.py builds and runs them on text data
IMAGE_ZOO = [name for name in ZOO if not reads_tokens(OmegaConf.load(CONF / "model" / f"{name}.yaml")._target_)]
HAS_TIMM = importlib.util.find_spec("timm") is not None
needs_timm = pytest.mark.skipif(not HAS_TIMM, reason='timm is not installed (optional: pip install -e ".[timm]")')

PUBLISHED = PUBLISHED_PARAMS  # the published counts, kept once in distillab.zoo


def data(shape: tuple[int, ...], classes: int) -> DataInfo:
    """Data of the given geometry, as a run knows it: build.model reads its input_shape and num_classes."""
    return DataInfo("synthetic", tuple(shape), classes, "")


DIGITS = ((1, 8, 8), 10)
CIFAR100 = ((3, 32, 32), 100)


@pytest.fixture(autouse=True)
def _single_thread():
    # small models at small batches: one intra-op thread is faster and robust to a busy CPU
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network (name resolution and connections fail at once) and empty weight caches under tmp."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch_hub"))
    if importlib.util.find_spec("huggingface_hub") is not None:
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_hub"))
    return tmp_path


def build(role: str, overrides: list[str], tmp_path: Path, geometry=DIGITS) -> nn.Module:
    cfg = compose_cfg(overrides, tmp_path)
    return parts.model(role, cfg[role], data(*geometry))


# -- the zoo configs --------------------------------------------------------------------------
def test_the_zoo_has_every_benchmark_architecture():
    expected = set(PUBLISHED) | {"vgg16", "vgg19", "torchvision", "timm", "cnn", "mlp"}
    assert expected <= set(ZOO)
    assert set(ZOO) == {p.stem for p in (CONF / "model").glob("*.yaml")}  # teacher= and student= take them all


@pytest.mark.parametrize("name", IMAGE_ZOO)
def test_every_zoo_entry_builds_as_teacher_and_student(name, tmp_path):
    if name == "timm" and not HAS_TIMM:
        pytest.skip('timm is not installed (optional: pip install -e ".[timm]")')
    cfg = compose_cfg([f"student={name}", f"teacher={name}"], tmp_path)
    # each role selects its zoo entry (the student unchanged); the teacher adds its recipe
    entry = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{name}.yaml"))
    student_arch = {
        k: v for k, v in OmegaConf.to_container(cfg.student, resolve=True).items() if k not in ROLE_KEYS["student"]
    }
    assert student_arch == entry and cfg.student.init is None and cfg.student.init_weight == 1.0
    teacher_arch = {k: v for k, v in cfg.teacher.items() if k not in ROLE_KEYS["teacher"]}
    assert teacher_arch.keys() == entry.keys() and teacher_arch["_target_"] == entry["_target_"]
    assert cfg.teacher.recipe.max_epochs >= 1

    digits = data(*DIGITS)
    student = parts.model("student", cfg.student, digits).eval()
    teacher = parts.model("teacher", cfg.teacher, digits).eval()
    x = torch.randn(3, *DIGITS[0])
    with torch.no_grad():
        for model in (student, teacher):
            out = model(x)
            assert isinstance(out, torch.Tensor) and out.shape == (3, 10)
            assert torch.isfinite(out).all()


def test_a_bad_option_of_a_zoo_entry_is_one_line_naming_it(tmp_path):
    with pytest.raises(ConfigError) as info:
        build("student", ["student=torchvision", "student.name=resnet81"], tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("student.name=resnet81:")
    assert "resnet18" in message  # a near name is suggested


def test_a_zoo_student_distils_end_to_end(make_cfg, tmp_path):
    cfg = make_cfg("student=resnet8", "teacher=cnn", "trainer.max_epochs=1", "teacher.recipe.max_epochs=1")
    record = pipeline.run(cfg)
    assert record["status"] == "ok"
    assert record["student"]["arch"] == "resnet8"
    assert record["student"]["params"] == measure.params(resnet8((1, 8, 8), 10))
    assert 0.0 <= record["student"]["test"]["acc"] <= 1.0
    assert results.read(Path(cfg.paths.output_dir))["student"]["arch"] == "resnet8"


# -- torchvision -------------------------------------------------------------------------------
@pytest.mark.parametrize(("geometry", "channels"), [(DIGITS, 1), (CIFAR100, 3)])
def test_torchvision_resnet18_student_adapts_to_the_data(geometry, channels, tmp_path):
    model = build("student", ["student=torchvision", "student.name=resnet18"], tmp_path, geometry)
    shape, classes = geometry
    assert model.conv1.in_channels == channels
    assert model.fc.out_features == classes
    assert model.input_size is None  # a ResNet pools adaptively: no upsampling needed
    model.train()
    out = model(torch.randn(4, *shape))
    assert out.shape == (4, classes)
    out.sum().backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0


def test_torchvision_model_too_small_for_its_input_is_fed_upsampled_images():
    model = hub.torchvision_model((1, 8, 8), 10, name="squeezenet1_1", pretrained=False, weights=None).eval()
    assert model.input_size == (32, 32)  # SqueezeNet 1.1 needs at least 17×17
    assert model.features[0].in_channels == 1
    seen = []
    model.features[0].register_forward_hook(lambda _m, inputs, _o: seen.append(tuple(inputs[0].shape)))
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert seen == [(2, 1, 32, 32)]


def test_torchvision_model_that_cannot_take_the_input_is_one_line():
    # ViT takes exactly 224×224: a larger input cannot be fixed by upsampling
    with pytest.raises(ConfigError, match=r"^name=vit_b_32: does not accept 3×256×256 inputs"):
        hub.torchvision_model((3, 256, 256), 10, name="vit_b_32", pretrained=False, weights=None)


def test_torchvision_pretrained_offline_is_one_line_naming_the_cache(offline, tmp_path):
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        build("student", ["student=torchvision", "student.pretrained=true"], tmp_path)
    elapsed = time.perf_counter() - start
    message = str(info.value)
    folder = os.path.join(str(offline / "torch_hub"), "checkpoints")
    assert "\n" not in message
    assert message.startswith("student.pretrained=true: ")
    assert "ResNet18_Weights.IMAGENET1K_V1" in message
    assert folder in message
    assert "run once with network access" in message and "pretrained=false" in message
    assert elapsed < 20, f"took {elapsed:.1f} s"
    assert not any(Path(folder).glob("*.pth"))


def test_torchvision_pretrained_weights_come_from_the_cache_through_torchvision(offline):
    from torchvision.models import ResNet18_Weights, get_model

    # a stand-in for the downloaded file, where torchvision looks for it
    folder = offline / "torch_hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    saved = get_model("resnet18").state_dict()
    torch.save(saved, folder / os.path.basename(ResNet18_Weights.IMAGENET1K_V1.url))

    grey = hub.torchvision_model((1, 8, 8), 10, name="resnet18", pretrained=True, weights=None)
    assert torch.equal(grey.layer1[0].conv1.weight, saved["layer1.0.conv1.weight"])
    # one channel: the RGB filters summed, i.e. what the RGB model computes on a grey image
    assert torch.allclose(grey.conv1.weight, saved["conv1.weight"].sum(dim=1, keepdim=True))
    assert grey.fc.out_features == 10 and grey.fc.in_features == 512
    two = hub.torchvision_model((2, 8, 8), 10, name="resnet18", weights="IMAGENET1K_V1", pretrained=False)
    assert torch.allclose(two.conv1.weight, saved["conv1.weight"][:, :2] * 1.5)
    rgb = hub.torchvision_model((3, 32, 32), 1000, name="resnet18", pretrained=True, weights=None)
    assert torch.equal(rgb.fc.weight, saved["fc.weight"])  # 1000 classes: the ImageNet head is kept
    grey.eval()
    x = torch.randn(2, 1, 8, 8)
    rgb.eval()
    with torch.no_grad():
        assert grey(x).shape == (2, 10)
        # the summed filters see a grey image as the RGB model sees it copied into 3 channels
        features = nn.Sequential(*list(grey.children())[:-1])
        rgb_features = nn.Sequential(*list(rgb.children())[:-1])
        assert torch.allclose(features(x), rgb_features(x.repeat(1, 3, 1, 1)), atol=1e-5)


def test_unknown_torchvision_weights_are_one_line_listing_the_allowed():
    with pytest.raises(ConfigError, match=r"^weights=IMAGENET: .*IMAGENET1K_V1"):
        hub.torchvision_model((3, 32, 32), 10, name="resnet18", weights="IMAGENET", pretrained=False)


@pytest.mark.parametrize(("name", "near"), [("resnet81", "resnet18"), ("vit_b16", "vit_b_16"), ("vgg", "vgg11")])
def test_unknown_torchvision_name_suggests_near_names(name, near):
    with pytest.raises(ConfigError) as info:
        hub.torchvision_model((3, 32, 32), 10, name=name, pretrained=False, weights=None)
    message = str(info.value)
    assert message.startswith(f"name={name}: not a torchvision classification model")
    assert near in message.split("did you mean", 1)[1]


# -- timm --------------------------------------------------------------------------------------
def test_missing_timm_is_one_line_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` fail
    with pytest.raises(ConfigError) as info:
        hub.timm_model((1, 8, 8), 10, name="resnet18", pretrained=False)
    assert "\n" not in str(info.value)
    assert 'pip install -e ".[timm]"' in str(info.value)


@needs_timm
def test_timm_student_adapts_to_the_data(tmp_path):
    model = build("student", ["student=timm", "student.name=resnet18"], tmp_path)
    assert model.conv1.in_channels == 1
    assert model.get_classifier().out_features == 10
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@needs_timm
def test_unknown_timm_name_suggests_near_names():
    with pytest.raises(ConfigError) as info:
        hub.timm_model((3, 32, 32), 10, name="vit_tiny", pretrained=False)
    assert str(info.value).startswith("name=vit_tiny: not a timm model")
    assert "vit_tiny_patch16_224" in str(info.value)


@needs_timm
def test_timm_pretrained_offline_is_one_line_naming_the_cache(offline, tmp_path):
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        build("student", ["student=timm", "student.pretrained=true"], tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("student.pretrained=true: cannot load the pretrained weights of timm resnet18")
    assert str(offline / "hf_hub") in message and "pretrained=false" in message
    assert time.perf_counter() - start < 20


# -- the zoo table -----------------------------------------------------------------------------
def _rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| model"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_zoo_cli_table_reproduces_the_published_counts():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(
        [sys.executable, "-m", "distillab.zoo", "data=cifar100", "--markdown"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if line.startswith("| model"))
    assert [c.strip() for c in header.strip("|").split("|")][:6] == [
        "model",
        "builder",
        "params",
        "MACs / sample",
        "published params",
        "difference",
    ]
    rows = _rows(result.stdout)
    assert {label.split(" (")[0] for label in rows} == set(ZOO)  # timm too, noted if not installed
    for name, count in PUBLISHED.items():
        cells = rows[name]
        assert cells[2] == f"{count:,}", cells
        assert cells[4] == f"{count:,}", cells
        assert cells[5] == "0.00 %", cells
        assert int(cells[3].replace(",", "")) > 0
    assert rows["resnet20"][3] == "40,818,944"  # 40.8 M MACs, as the benchmark papers report
    assert rows["torchvision (resnet18)"][2] == "11,227,812"


def test_zoo_geometry_from_the_command_line(capsys, tmp_path):
    (tmp_path / "model").mkdir()
    for name in ("resnet8", "mlp"):  # a small zoo keeps this fast
        (tmp_path / "model" / f"{name}.yaml").write_text((CONF / "model" / f"{name}.yaml").read_text())
    assert zoo.main(["--input-shape", "1", "8", "8", "--classes", "10", "--conf", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "input 1×8×8, 10 classes" in out
    assert "published" not in out.split("\n\n", 1)[1]  # counts are published for CIFAR-100 only
    line = next(line for line in out.splitlines() if line.startswith("resnet8 "))
    assert f"{measure.params(resnet8((1, 8, 8), 10)):,}" in line


@pytest.mark.parametrize("argv", [["data=imagenet"], ["cifar100"], ["--classes", "10"]])
def test_zoo_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as info:
        zoo.main(argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_zoo_row_difference_is_relative_to_the_published_count():
    row = zoo.Row("x", "x", params=110, published=100)
    assert row.difference == pytest.approx(0.10)
    assert "+10.00 %" in zoo.format_table([row])
