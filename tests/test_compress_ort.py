"""Int8 through ONNX Runtime (``distillab.compress.ort``) on digits models trained here with plain
torch: agreement with the float model, the file and its counts, mixed precision under a budget,
one-line errors, and one run of ``compress=ort_int8_static`` through the pipeline."""

from __future__ import annotations

import copy
import pickle
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from distillab import conf, measure, pipeline, results
from distillab.compress import PIPELINE_KEYS, Context, ort
from distillab.data import TensorBatches
from distillab.formats import to_onnx
from distillab.models import CNN, MLP
from distillab.settings import ConfigError
from tests.conftest import fit_on_digits

SHAPE = (1, 8, 8)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits(digits_splits) -> dict[str, tuple[Tensor, Tensor]]:
    return digits_splits


def _fit(model: nn.Module, digits: dict, epochs: int) -> nn.Module:
    return fit_on_digits(model, digits, epochs)


@pytest.fixture(scope="module")
def mlp(digits) -> nn.Module:
    torch.manual_seed(0)
    return _fit(MLP(SHAPE, 10, hidden=[512, 256], dropout=0.0, input_dropout=0.0), digits, epochs=10)


@pytest.fixture(scope="module")
def cnn(digits) -> nn.Module:
    torch.manual_seed(0)
    return _fit(CNN(SHAPE, 10, width=16, blocks=2, dropout=0.0), digits, epochs=4)


def _accuracy(model: nn.Module, split: tuple[Tensor, Tensor]) -> float:
    x, y = split
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


def _context(digits: dict, reference: nn.Module | None = None, dry_run: bool = False) -> Context:
    x, y = digits["train"]
    xv, yv = digits["val"]
    return Context(
        SHAPE,
        lambda: TensorBatches(x, y, 64, shuffle=False),
        val_batches=lambda: TensorBatches(xv, yv, 128, shuffle=False),
        reference_val_acc=_accuracy(reference, digits["val"]) if reference is not None else None,
        dry_run=dry_run,
    )


def _configured(option: str, **settings) -> dict:
    """The settings ``conf/compress/<option>.yaml`` gives its function (the budget included), ``settings`` on top."""
    node = OmegaConf.to_container(conf.load("compress", option), resolve=True)
    own = {key: value for key, value in node.items() if key not in ("_target_", "_partial_", *PIPELINE_KEYS)}
    return {**own, "max_acc_drop": node["max_acc_drop"], **settings}


def _static(model: nn.Module, context: Context, **settings):
    return ort.int8_static(model, context, **_configured("ort_int8_static", **settings))


def _dynamic(model: nn.Module, context: Context, **settings):
    return ort.int8_dynamic(model, context, **_configured("ort_int8_dynamic", **settings))


def _onnx_initializers(onnx_bytes: bytes) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load_from_string(onnx_bytes).graph.initializer}


@pytest.fixture(scope="module")
def int8_mlp(mlp, digits) -> dict:
    """``mlp`` exported in float, and through each method with its YAML's settings."""
    return {
        "float": to_onnx(mlp, SHAPE, opset=20, exporter="dynamo"),
        "static": _static(mlp, _context(digits)),
        "dynamic": _dynamic(mlp, _context(digits)),
    }


# -- int8 models -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["static", "dynamic"])
def test_int8_mlp_agrees_with_the_float_model_and_is_about_four_times_smaller(method, mlp, int8_mlp, digits, tmp_path):
    result = int8_mlp[method]
    model = result.model
    x, _ = digits["test"]
    with torch.no_grad():
        agreement = float((model(x).argmax(1) == mlp(x).argmax(1)).double().mean())
    assert agreement >= 0.97
    assert abs(_accuracy(model, digits["test"]) - _accuracy(mlp, digits["test"])) <= 0.02
    # every Linear layer stores int8 weights: none of the float weights is left in the file
    assert result.details["int8_layers"] == ["features.1", "features.3", "classifier"]
    assert result.details["float_layers"] == []
    stored = _onnx_initializers(model.onnx_bytes)
    for name, module in (("features.1", mlp.features[1]), ("classifier", mlp.classifier)):
        int8 = [a for a in stored.values() if a.dtype == np.int8 and a.size == module.weight.numel()]
        assert int8, f"no int8 tensor of {name}'s size"
    # 4 bytes per float weight against 1 per int8 one, the rest of the file being small
    assert 3.4 < len(int8_mlp["float"]) / len(model.onnx_bytes) < 4.0
    # the counts come from the file: the same weights as the float model, int8 ones included
    assert measure.params(model) == sum(p.numel() for p in mlp.parameters())
    assert 0.9 * measure.params(model) < measure.nonzero_params(model) <= measure.params(model)
    assert measure.size_bytes(model) == len(model.onnx_bytes)
    assert measure.macs(model, SHAPE) == 0  # invisible to the FLOP counter: results take the float model's
    assert result.backend.startswith(f"onnxruntime {onnxruntime.__version__} (quantize_")
    # the artifact reads back as the same model
    path = tmp_path / "model.onnx"
    result.save(path)
    with torch.no_grad():
        assert torch.equal(ort.load(path)(x), model(x))


def test_static_int8_cnn_folds_batch_norm_and_keeps_the_predictions(cnn, digits):
    result = _static(cnn, _context(digits))
    x, _ = digits["test"]
    with torch.no_grad():
        agreement = float((result.model(x).argmax(1) == cnn(x).argmax(1)).double().mean())
    assert agreement >= 0.97
    convs = [name for name, m in cnn.named_modules() if isinstance(m, nn.Conv2d)]
    assert result.details["int8_layers"] == [*convs, "classifier"]
    # BatchNorm is folded into the convolutions: its weight and bias become one conv bias
    channels = sum(m.num_features for m in cnn.modules() if isinstance(m, nn.BatchNorm2d))
    assert measure.params(result.model) == sum(p.numel() for p in cnn.parameters()) - channels
    assert result.details["calibration_batches"] == 16
    assert result.details["calibration_samples"] == sum(len(b[0]) for b in list(_context(digits).train_batches())[:16])


def test_the_wrapper_copies_pickles_and_follows_torch_threads(int8_mlp, digits):
    model = int8_mlp["dynamic"].model
    x = digits["test"][0][:32]
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(copy.deepcopy(model)(x), expected)
        assert torch.equal(pickle.loads(pickle.dumps(model))(x), expected)
        torch.set_num_threads(2)
        try:
            assert torch.equal(model(x), expected)
            assert model._session.get_session_options().intra_op_num_threads == 2
        finally:
            torch.set_num_threads(1)
    assert list(model.parameters()) == []


# -- mixed precision under a budget --------------------------------------------------------------------
def _fragile_first_layer(mlp: nn.Module, digits: dict) -> nn.Module:
    """``mlp`` with a large weight on an input pixel that is constant in every split, offset by its
    bias: the same float function, but int8 weights of the first layer get a scale so coarse that
    its ordinary weights round to zero."""
    x = torch.cat([digits[split][0] for split in ("train", "val", "test")]).flatten(1)
    pixel = int(torch.nonzero(x.std(0) == 0)[0])
    fragile = copy.deepcopy(mlp)
    first = fragile.features[1]
    with torch.no_grad():
        first.weight[:, pixel] += 1000.0
        first.bias -= 1000.0 * x[0, pixel]
    return fragile


def test_a_tight_budget_keeps_the_sensitive_layer_float_and_is_met(mlp, digits):
    fragile = _fragile_first_layer(mlp, digits)
    context = _context(digits, reference=fragile)
    assert abs(context.reference_val_acc - _accuracy(mlp, digits["val"])) < 0.01  # the float function is kept
    all_int8 = _static(fragile, context, per_channel=False)
    assert _accuracy(all_int8.model, digits["val"]) < context.reference_val_acc - 0.2

    result = _static(fragile, context, per_channel=False, max_acc_drop=0.01)
    details = result.details
    assert details["float_layers"] == ["features.1"]
    assert details["int8_layers"] == ["features.3", "classifier"]
    assert details["within_budget"] and not details["all_float"]
    # met on the validation split, measured here independently
    assert context.reference_val_acc - _accuracy(result.model, digits["val"]) <= 0.01
    assert details["val_acc"] == pytest.approx(_accuracy(result.model, digits["val"]), abs=1e-6)
    scan = {row["layer"]: row for row in result.tables["quant_sensitivity"]}
    assert set(scan) == {"features.1", "features.3", "classifier"}
    assert scan["features.1"]["val_acc_int8_alone"] < min(
        scan[k]["val_acc_int8_alone"] for k in scan if k != "features.1"
    )
    assert [row["kept_float"] for row in scan.values()] == [True, False, False]
    # the first layer's float weight is in the file as it was, the others are int8
    stored = _onnx_initializers(result.model.onnx_bytes)
    assert np.array_equal(stored["features.1.weight"], fragile.features[1].weight.detach().numpy())
    assert "classifier.weight" not in stored


def test_a_budget_nothing_can_meet_ends_with_the_most_accurate_candidate_the_float_file_included(mlp, digits):
    context = _context(digits, reference=mlp)
    context.reference_val_acc = 1.0  # above the float model itself: no candidate meets the budget
    result = _dynamic(mlp, context, max_acc_drop=1e-6)
    details, x = result.details, digits["val"][0]
    assert not details["within_budget"]
    trail = details["val_acc_by_float_layers"]  # every int8 candidate the search tried, in order
    assert len(trail) == 1 + len(details["sensitivity"])
    assert details["val_acc"] >= max(trail)
    assert details["val_acc"] == pytest.approx(_accuracy(result.model, digits["val"]), abs=1e-6)
    # whether an int8 candidate beats the float file depends on this CPU's int8 kernels; what is
    # promised is that the float file is kept unless one is strictly more accurate
    if details["all_float"]:
        assert details["int8_layers"] == [] and details["float_layers"] == ["features.1", "features.3", "classifier"]
        with torch.no_grad():
            assert torch.allclose(result.model(x), mlp(x), atol=1e-4)
    else:
        assert details["int8_layers"] and details["val_acc"] == max(trail)
        assert details["val_acc"] > _accuracy(mlp, digits["val"])


def test_a_dry_run_skips_the_search(digits):
    untrained = MLP(SHAPE, 10, hidden=[16], dropout=0.0, input_dropout=0.0).eval()
    result = _dynamic(untrained, _context(digits, reference=untrained, dry_run=True), max_acc_drop=0.01)
    assert "within_budget" not in result.details and not result.tables


# -- errors --------------------------------------------------------------------------------------------
def test_missing_onnx_packages_are_one_line_before_training(monkeypatch, mlp, digits, make_cfg, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    message = 'ort_int8_static needs the export extra (onnxruntime missing): pip install -e ".[export]"'
    with pytest.raises(ConfigError) as caught:
        _static(mlp, _context(digits))
    assert str(caught.value) == message
    with pytest.raises(ConfigError) as caught:  # a run tries the method on an untrained copy first
        pipeline.run(make_cfg("compress=ort_int8_static", own_cache=True), raise_on_failure=True)
    assert str(caught.value) == message
    assert not (tmp_path / "cache").exists() and not list(tmp_path.rglob("results.json"))


def test_bad_settings_and_models_are_one_line(mlp, digits):
    with pytest.raises(
        ConfigError, match=r"^calibrate_method='max' is not allowed: one of minmax, entropy, percentile$"
    ):
        _static(mlp, _context(digits), calibrate_method="max")
    with pytest.raises(ConfigError, match=r"^op_types=\[\] is not allowed: a non-empty list of Conv, Gemm, MatMul$"):
        _dynamic(mlp, _context(digits), op_types=[])
    convolutional = CNN(SHAPE, 10, width=4, blocks=1, dropout=0.0)
    with pytest.raises(ConfigError) as caught:  # no Linear layer is a Conv
        _dynamic(nn.Sequential(*list(convolutional.stages), nn.Flatten()), _context(digits))
    assert str(caught.value) == (
        "ort_int8_dynamic quantizes Gemm, MatMul nodes with weights; the ONNX graph of Sequential has none"
    )


# -- through the pipeline -------------------------------------------------------------------------------
def test_ort_int8_static_as_step_6_of_a_run(make_cfg, tmp_path):
    record = pipeline.run(
        make_cfg(
            "student=cnn",
            "student.width=16",
            "compress=ort_int8_static",
            "compress.max_acc_drop=0.05",
            "measure.warmup=1",
            "measure.repeats=3",
        )
    )
    results.check(record)
    block, student = record["compressed"], record["student"]
    assert block["method"] == "ort_int8_static" and block["backend"].startswith("onnxruntime")
    artifact = tmp_path / "run" / "compressed" / "model.onnx"
    assert block["size_bytes"] == artifact.stat().st_size < 0.5 * student["size_bytes"]
    assert block["macs"] == student["macs"]  # the float model's: int8 runs the same MACs
    assert block["details"]["within_budget"] and block["details"]["float_layers"] == []
    assert block["details"]["acc_drop"] <= 0.05
    # the artifact is the quantized ONNX file: read back, it scores what the record says
    model = ort.load(artifact)
    data = conf.build("data", "digits")
    assert _accuracy(model, data.splits["test"]) == pytest.approx(block["test"]["acc"], abs=1e-6)
    assert block["params"] == measure.params(model)
