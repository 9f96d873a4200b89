"""Export to ONNX and TorchScript (``distillab.steps.export``, ``export=...``): the settings and their
one-line errors, the files checked against PyTorch by an independent ONNX Runtime session, what
each exporter can hold, and two runs through the pipeline."""

from __future__ import annotations

import dataclasses
import inspect
import sys
import types

import numpy as np
import onnxruntime
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from distillab import conf, formats, pipeline, results, settings
from distillab.compress import PIPELINE_KEYS, SHARED, Context, quantize
from distillab.config import ConfigError
from distillab.formats import ExportSettings
from distillab.models import CNN, MLP
from distillab.steps import export

SHAPE = (1, 8, 8)
QUICK = ["measure.warmup=1", "measure.repeats=3"]
HOW = {"threads": 1, "warmup": 1, "repeats": 3}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(teacher_cache):
    """The session's teacher cache (tests/conftest.py): the teacher is trained once."""
    return teacher_cache


@pytest.fixture(scope="module")
def digits():
    data = conf.build("data", "digits")
    data.setup("test")
    return data


def _settings(option: str, **values) -> ExportSettings:
    return settings.build(ExportSettings, {**OmegaConf.to_container(conf.load("export", option)), **values})


def _session_logits(path, x: torch.Tensor) -> np.ndarray:
    """The file's logits from a plain ONNX Runtime session: what a deployment would run."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


# -- settings -------------------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["none", "onnx", "torchscript"])
def test_every_option_holds_every_setting_and_the_code_none(option):
    values = OmegaConf.to_container(conf.load("export", option))
    settings.check("export", values, "distillab.formats.ExportSettings")
    assert set(values) == {f.name for f in dataclasses.fields(ExportSettings)}
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(ExportSettings))
    formats.check_export(values)


@pytest.mark.parametrize(
    "override,message",
    [
        ("export.format=tflite", "export.format='tflite' is not allowed: one of onnx, torchscript, or null"),
        ("export.opset=13", "export.opset=13 is not allowed: an ONNX opset >= 18, or null"),
        (
            "export.exporter=null",
            "export.exporter=None is not allowed with export.format=onnx: one of dynamo, torchscript",
        ),
        ("export.models=[teacher]", "export.models=['teacher'] is not allowed: a list of one of student, compressed"),
    ],
)
def test_bad_export_settings_are_one_line_before_any_work(make_cfg, tmp_path, override, message):
    with pytest.raises(ConfigError) as caught:
        pipeline.run(make_cfg("export=onnx", override, own_cache=True), raise_on_failure=True)
    assert str(caught.value) == message
    assert not (tmp_path / "cache").exists() and not list(tmp_path.rglob("results.json"))


def test_torchscript_takes_no_onnx_settings():
    values = OmegaConf.to_container(conf.load("export", "torchscript"))
    with pytest.raises(ConfigError, match=r"^export.opset=20 is not allowed with export.format=torchscript: null"):
        formats.check_export({**values, "opset": 20})


def test_a_missing_onnx_package_is_one_line_before_training(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if it were not installed
    with pytest.raises(ConfigError) as caught:
        pipeline.run(make_cfg("export=onnx", own_cache=True), raise_on_failure=True)
    assert str(caught.value) == (
        'export.format=onnx needs the export extra (onnxscript missing): pip install -e ".[export]"'
    )
    assert not (tmp_path / "cache").exists() and not list(tmp_path.rglob("results.json"))
    formats.check_export(OmegaConf.to_container(conf.load("export", "torchscript")))  # TorchScript needs none of it


def test_export_none_adds_nothing():
    assert export.run(conf.load("export", "none"), None, None, None, SHAPE, HOW, None) == {}
    assert export.run(None, None, None, None, SHAPE, HOW, None) == {}


# -- the files -------------------------------------------------------------------------------------
def test_onnx_files_match_torch_at_any_batch_and_zeros_stay_dense(digits, tmp_path):
    torch.manual_seed(0)
    student = MLP(SHAPE, 10, hidden=[128], dropout=0.0, input_dropout=0.0).eval()
    pruned = MLP(SHAPE, 10, hidden=[128], dropout=0.0, input_dropout=0.0).eval()
    pruned.load_state_dict(student.state_dict())
    with torch.no_grad():  # half of every weight matrix zeroed, as unstructured pruning leaves it
        for layer in (pruned.features[1], pruned.classifier):
            layer.weight[torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(1)) < 0.5] = 0.0
    compressed = types.SimpleNamespace(result=types.SimpleNamespace(model=pruned))
    block = export.run(conf.load("export", "onnx"), student, compressed, digits, SHAPE, HOW, tmp_path)["export"]
    assert block["format"] == "onnx" and block["opset"] == 20 and block["dynamic_batch"]
    assert block["exporter"].startswith("torch.onnx.export(dynamo=True)")
    x, _ = digits.splits["test"]
    for role, model in (("student", student), ("compressed", pruned)):
        entry, path = block[role], tmp_path / "export" / f"{role}.onnx"
        assert entry["file"] == f"export/{role}.onnx" and entry["bytes"] == path.stat().st_size
        assert entry["opset"] == 20 and entry["samples"] == len(x)
        with torch.no_grad():
            expected = model(x).numpy()
        for batch in (1, 7, len(x)):  # the batch dimension is dynamic
            got = _session_logits(path, x[:batch])
            assert np.abs(got - expected[:batch]).max() < 1e-4
        got = _session_logits(path, x)
        assert entry["max_abs_diff"] == pytest.approx(float(np.abs(got - expected).max()), abs=1e-6)
        assert entry["agreement"] == pytest.approx(float((got.argmax(1) == expected.argmax(1)).mean()))
        assert set(entry["latency_ms"]) == set(entry["eager_latency_ms"]) == {"batch_1", "batch_64"}
        assert all(value > 0 for value in (*entry["latency_ms"].values(), *entry["eager_latency_ms"].values()))
    # zeroed weights are stored as zeros: the file does not shrink
    zeros = sum(int((m.weight == 0).sum()) for m in (pruned.features[1], pruned.classifier))
    assert block["compressed"]["zero_weight_share"] == pytest.approx(
        zeros / sum(p.numel() for p in pruned.parameters())
    )
    assert block["student"]["zero_weight_share"] == 0.0
    assert abs(block["compressed"]["bytes"] - block["student"]["bytes"]) < 0.01 * block["student"]["bytes"]


def _static_int8(digits) -> nn.Module:
    """An untrained CNN through ``quantize.static`` with the settings of conf/compress/quant_static.yaml."""
    torch.manual_seed(0)
    model = CNN(SHAPE, 10, width=8, blocks=2, dropout=0.0).eval()
    x, y = digits.splits["train"]
    node = OmegaConf.to_container(conf.load("compress", "quant_static"))
    values = {key: value for key, value in node.items() if key not in ("_target_", "_partial_", *PIPELINE_KEYS)}
    shared = {key: node[key] for key in SHARED if key in inspect.signature(quantize.static).parameters}
    context = Context(SHAPE, lambda: [(x[:256], y[:256], None)])
    return quantize.static(model, context, **values, **shared).model


def test_what_each_exporter_can_hold_of_a_torch_ao_int8_model(digits, tmp_path):
    int8 = _static_int8(digits)
    test_batches = digits.test_dataloader
    entry = export.export_model(int8, "compressed", _settings("onnx"), test_batches, SHAPE, HOW, tmp_path)
    assert set(entry) == {"skipped"} and "cannot export it" in entry["skipped"] and "\n" not in entry["skipped"]
    assert not (tmp_path / "compressed.onnx").exists()
    # the TorchScript-based exporter writes it as a QuantizeLinear / DequantizeLinear graph
    legacy = _settings("onnx", exporter="torchscript")
    entry = export.export_model(int8, "compressed", legacy, test_batches, SHAPE, HOW, tmp_path)
    assert entry["agreement"] >= 0.95 and entry["file"] == f"{tmp_path.name}/compressed.onnx"
    x, _ = digits.splits["test"]
    with torch.no_grad():
        expected = int8(x).numpy()
    got = _session_logits(tmp_path / "compressed.onnx", x)
    assert float((got.argmax(1) == expected.argmax(1)).mean()) == pytest.approx(entry["agreement"])
    # TorchScript holds it as it is
    entry = export.export_model(int8, "compressed", _settings("torchscript"), test_batches, SHAPE, HOW, tmp_path)
    assert entry["agreement"] == 1.0 and entry["max_abs_diff"] == 0.0
    with formats.quiet(), torch.no_grad():
        loaded = torch.jit.load(str(tmp_path / "compressed.pt"))
        assert torch.equal(loaded(x[:5]), int8(x[:5]))


# -- through the pipeline --------------------------------------------------------------------------
def test_export_onnx_of_a_structurally_pruned_student(make_cfg, cache, tmp_path):
    record = pipeline.run(
        make_cfg(
            "student=cnn",
            "student.width=16",
            "compress=prune_structured",
            "compress.finetune_epochs=1",
            "export=onnx",
            *QUICK,
            cache=cache,
        )
    )
    results.check(record)
    block = record["export"]
    student, compressed = block["student"], block["compressed"]
    for role, entry in (("student", student), ("compressed", compressed)):
        path = tmp_path / "run" / "export" / f"{role}.onnx"
        assert entry["bytes"] == path.stat().st_size
        assert entry["agreement"] >= 0.99 and entry["max_abs_diff"] < 1e-3
        assert entry["samples"] == record["test_samples"]
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert isinstance(session.get_inputs()[0].shape[0], str)  # a named, dynamic batch dimension
    # fewer channels, smaller file, in the proportion of the parameters
    assert compressed["bytes"] < 0.6 * student["bytes"]
    assert record["compressed"]["params"] < 0.6 * record["student"]["params"]
    assert block["seconds"] > 0


def test_export_torchscript_of_a_quantized_student(make_cfg, cache, tmp_path):
    record = pipeline.run(
        make_cfg(
            "student=cnn",
            "student.width=16",
            "compress=quant_static",
            "export=torchscript",
            *QUICK,
            cache=cache,
        )
    )
    block = record["export"]
    assert block["format"] == "torchscript" and block["exporter"] == "torch.jit.trace" and block["opset"] is None
    for role in ("student", "compressed"):
        entry = block[role]
        assert entry["file"] == f"export/{role}.pt" and entry["agreement"] >= 0.99
        with formats.quiet(), torch.no_grad():
            model = torch.jit.load(str(tmp_path / "run" / "export" / f"{role}.pt"))
            assert model(torch.randn(3, *SHAPE)).shape == (3, 10)
    # int8 weights take a quarter of the float bytes; TorchScript's code, larger for int8, takes the rest
    assert block["compressed"]["bytes"] < 0.7 * block["student"]["bytes"]
    assert block["compressed"]["max_abs_diff"] == 0.0  # the same kernels run the file
