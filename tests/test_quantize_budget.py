"""Int8 within an accuracy budget (``max_acc_drop``): layers kept float (mixed precision) by
``quantize.static``, ``qat`` and ``dynamic``, on digits models with one layer made fragile in
int8, the saved mixed artifact, and the budget through a real run."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn

from distillab import conf, pipeline
from distillab.compress import PIPELINE_KEYS, Compressed, Context, torch_ao
from distillab.compress import quantize as Q
from distillab.data import TensorBatches
from distillab.models import CNN, MLP
from distillab.settings import ConfigError
from tests.conftest import fit_on_digits

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 8, 8)
OUTLIER = 1e3
TIGHT = 0.02  # a budget the all-int8 fragile models miss by far, and int8 of their other layers meets
QUICK = ["measure.warmup=0", "measure.repeats=2"]


@pytest.fixture(scope="module")
def digits(digits_splits) -> dict[str, tuple[Tensor, Tensor]]:
    return digits_splits


def _fit(model: nn.Module, digits: dict, epochs: int) -> nn.Module:
    return fit_on_digits(model, digits, epochs, lr=1e-2)


def _accuracy(model: nn.Module, digits: dict, split: str = "val") -> float:
    x, y = digits[split]
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).double().mean())


def _cnn() -> CNN:
    return CNN(SHAPE, 10, width=16, blocks=1, dropout=0.0)


def _mlp() -> MLP:
    return MLP(SHAPE, 10, hidden=[64, 64], dropout=0.0, input_dropout=0.0)


@pytest.fixture(scope="module")
def cnn(digits) -> nn.Module:
    return _fit(_cnn(), digits, epochs=4)


def _dead_unit(producer: nn.Module) -> None:
    """Make unit 0 of ``producer`` (a BatchNorm or Linear followed by a ReLU) always output 0,
    and keep it so through training (its parameters get no gradient: Adam then leaves them).
    A small weight rather than 0: QAT's conv-BN divides by the BatchNorm scale."""
    with torch.no_grad():
        producer.weight[0], producer.bias[0] = 1e-3, -1.0
    keep = torch.ones_like(producer.bias)
    keep[0] = 0.0
    producer.bias.register_hook(lambda grad: grad * keep)
    mask = keep.view(-1, *[1] * (producer.weight.dim() - 1))
    producer.weight.register_hook(lambda grad: grad * mask)


def _outlier(consumer: nn.Module) -> None:
    """Huge weights on input unit 0 of ``consumer``: nothing changes in float (that input is 0),
    but each output channel's int8 scale then rounds all its real weights to zero."""
    with torch.no_grad():
        consumer.weight[:, 0] = OUTLIER


@pytest.fixture(scope="module")
def fragile_cnn(digits) -> nn.Module:
    """A CNN whose ``stages.0.1.0`` is useless in int8 (channel 0 of the first conv-BN-ReLU is dead)."""
    model = _cnn()
    _dead_unit(model.stages[0][0][1])
    model = _copy(_fit(model, digits, epochs=4))  # a copy: without the gradient hooks
    _outlier(model.stages[0][1][0])
    return model


@pytest.fixture(scope="module")
def fragile_mlp(digits) -> nn.Module:
    """An MLP whose ``features.3`` is useless in int8 the same way (unit 0 of ``features.1`` dead)."""
    model = _mlp()
    _dead_unit(model.features[1])
    model = _copy(_fit(model, digits, epochs=6))
    _outlier(model.features[3])
    return model


def _copy(model: nn.Module) -> nn.Module:
    fresh = _cnn() if isinstance(model, CNN) else _mlp()
    fresh.load_state_dict(model.state_dict())
    return fresh.eval()


def _context(model: nn.Module, digits: dict, finetune=None, epochs: int = 0, dry_run: bool = False) -> Context:
    x, y = digits["train"]
    return Context(
        SHAPE,
        lambda: TensorBatches(x, y, 64, shuffle=False),
        finetune_epochs=epochs,
        finetune=finetune,
        val_batches=lambda: TensorBatches(*digits["val"], 512, shuffle=False),
        reference_val_acc=_accuracy(model, digits),
        dry_run=dry_run,
    )


def _configured(option: str, **settings) -> dict:
    """The settings ``conf/compress/<option>.yaml`` gives its function (few calibration batches)."""
    node = OmegaConf.to_container(conf.load("compress", option), resolve=True)
    own = {key: value for key, value in node.items() if key not in ("_target_", "_partial_", *PIPELINE_KEYS)}
    if "calibration_batches" in own:
        own["calibration_batches"] = 4
    return {**own, "max_acc_drop": node["max_acc_drop"], **settings}


def _static(model: nn.Module, context: Context, max_acc_drop: float | None) -> Compressed:
    return Q.static(model, context, **_configured("quant_static", max_acc_drop=max_acc_drop))


def _finetune(digits: dict, steps: int):
    """A stand-in for ``Context.finetune``: a few Adam steps of cross-entropy per epoch."""
    x, y = digits["train"]

    def finetune(model: nn.Module, epochs: int, on_epoch_start=None) -> None:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        for epoch in range(epochs):
            if on_epoch_start is not None:
                on_epoch_start(epoch)
            for index in torch.arange(len(y)).split(64)[:steps]:
                optimizer.zero_grad()
                F.cross_entropy(model(x[index]), y[index]).backward()
                optimizer.step()

    return finetune


@pytest.fixture(scope="module")
def tight_static(fragile_cnn, digits) -> Compressed:
    return _static(fragile_cnn, _context(fragile_cnn, digits), TIGHT)


# -- static -------------------------------------------------------------------------------------
def test_the_fragile_layer_is_kept_float_and_the_budget_met(fragile_cnn, digits, tight_static):
    reference = _accuracy(fragile_cnn, digits)
    without = _copy(fragile_cnn)
    without.stages[0][1][0].weight.data[:, 0] = 0.0
    x = digits["val"][0]
    with torch.no_grad():  # the outliers change nothing in float...
        assert torch.allclose(without(x), fragile_cnn(x), atol=1e-5)
    all_int8 = _static(fragile_cnn, _context(fragile_cnn, digits), None).model
    assert reference - _accuracy(all_int8, digits) > 0.5  # ... and everything in int8

    result, details = tight_static, tight_static.details
    assert details["float_layers"] == ["stages.0.1.0"]
    island = result.model.module.stages[0][1][0]
    assert isinstance(island, Q.FloatLayer) and island.layer[0].weight.dtype == torch.float32
    assert sorted(details["layers"]) == ["module.classifier", "module.stages.0.0.0"]
    assert set(details["layers"].values()) == {"torch.qint8"}
    reached = _accuracy(result.model, digits)
    assert reference - reached <= TIGHT
    assert details["val_acc"] == pytest.approx(reached, abs=1e-6)
    assert details["reference_val_acc"] == pytest.approx(reference, abs=1e-6)
    assert details["acc_drop"] == pytest.approx(reference - reached, abs=1e-6)
    assert details["within_budget"] is True and details["max_acc_drop"] == TIGHT
    assert details["val_acc_by_float_layers"][0] == pytest.approx(_accuracy(all_int8, digits), abs=1e-6)
    assert len(details["val_acc_by_float_layers"]) == 2  # all int8, then one layer float: done


def test_the_scan_ranks_the_fragile_layer_first(tight_static, fragile_cnn, digits):
    rows = tight_static.tables[Q.SENSITIVITY_TABLE]
    assert rows == tight_static.details["sensitivity"]
    assert [row["layer"] for row in rows] == ["stages.0.0.0", "stages.0.1.0", "classifier"]
    by_layer = {row["layer"]: row for row in rows}
    assert min(rows, key=lambda row: row["val_acc_int8_alone"])["layer"] == "stages.0.1.0"
    assert by_layer["stages.0.1.0"]["drop_int8_alone"] > 0.5
    assert [row["kept_float"] for row in rows] == [False, True, False]
    # a row is the accuracy of the model with that layer alone in int8
    others = ["stages.0.0.0", "classifier"]
    alone = torch_ao.prepare(
        _copy(fragile_cnn), torch.zeros(2, *SHAPE), "x86", True, qat=False, method="test", keep_float=others
    )[0]
    with torch.no_grad():
        for x, *_ in list(TensorBatches(*digits["train"], 64, shuffle=False))[:4]:
            alone(x)
    alone = torch_ao.convert(alone, "x86")
    assert by_layer["stages.0.1.0"]["val_acc_int8_alone"] == pytest.approx(_accuracy(alone, digits), abs=1e-6)


def test_a_loose_budget_keeps_nothing_float(cnn, digits):
    context = _context(cnn, digits)
    plain, loose = _static(cnn, context, None), _static(cnn, context, 0.05)
    assert loose.details["float_layers"] == [] and loose.details["within_budget"] is True
    assert loose.details["val_acc_by_float_layers"] == [loose.details["val_acc"]]
    assert loose.details["sensitivity"] == [] and loose.tables == {}
    assert not any(isinstance(m, Q.FloatLayer) for m in loose.model.modules())
    x = digits["val"][0]
    with torch.no_grad():
        assert torch.equal(loose.model(x), plain.model(x))
    assert plain.details["float_layers"] == [] and "within_budget" not in plain.details


def test_a_dry_run_skips_the_search(fragile_cnn, digits):
    result = _static(fragile_cnn, _context(fragile_cnn, digits, dry_run=True), TIGHT)
    assert result.details["float_layers"] == [] and "within_budget" not in result.details
    assert result.tables == {}


def test_an_unreachable_budget_is_reported_with_the_best_model_found(fragile_mlp, digits, caplog):
    context = _context(fragile_mlp, digits)
    context.reference_val_acc = 1.0  # no int8 model of this MLP reaches it
    with caplog.at_level(logging.WARNING, logger="distillab.compress.mixed"):
        result = Q.dynamic(fragile_mlp, context, max_acc_drop=0.001)
    details = result.details
    assert details["within_budget"] is False
    trail = details["val_acc_by_float_layers"]
    assert len(trail) == 1 + len(details["sensitivity"]) == 4  # every layer was tried float
    assert details["val_acc"] == max(trail) == pytest.approx(_accuracy(result.model, digits), abs=1e-6)
    assert len(details["float_layers"]) == trail.index(max(trail))
    assert details["float_layers"][0] == "features.3"
    assert "no set of float layers meets max_acc_drop=0.001" in caplog.text


def test_a_budget_outside_its_range_is_one_line(cnn, digits):
    with pytest.raises(ConfigError) as error:
        _static(cnn, _context(cnn, digits), 1.5)
    assert str(error.value) == "max_acc_drop=1.5 is not allowed: an accuracy drop in [0, 1), or null"


# -- the saved artifact -------------------------------------------------------------------------
def test_the_mixed_artifact_reloads_to_identical_outputs(tight_static, digits, tmp_path: Path):
    path = tmp_path / "int8.pt"
    tight_static.save(path)
    with Q.quiet_deprecations():
        saved = torch.load(path, weights_only=True)
    assert saved["format"] == Q.ARTIFACT_FORMAT and saved["float_layers"] == ["stages.0.1.0"]
    loaded = Q.load_static(path, _cnn(), SHAPE)  # fresh float weights: all must come from the file
    x = digits["test"][0]
    with torch.no_grad():
        assert torch.equal(loaded(x), tight_static.model(x))
    assert isinstance(loaded.module.stages[0][1][0], Q.FloatLayer)
    assert Q.int8_layers(loaded) == tight_static.details["layers"]


def test_a_file_that_is_not_an_int8_artifact_is_refused(cnn, tmp_path: Path):
    path = tmp_path / "state.pt"
    torch.save(cnn.state_dict(), path)
    with pytest.raises(ConfigError) as error:
        Q.load_static(path, _cnn(), SHAPE)
    assert str(error.value) == f"path={str(path)!r} is not allowed: an int8 artifact in the distillab.quantize/1 format"


# -- qat and dynamic ---------------------------------------------------------------------------
def test_qat_keeps_the_layers_post_training_needs_float_and_checks_after_finetuning(
    fragile_cnn, digits, tmp_path: Path
):
    context = _context(fragile_cnn, digits, _finetune(digits, steps=3), epochs=2)
    result = Q.qat(fragile_cnn, context, **_configured("qat", max_acc_drop=TIGHT))
    details = result.details
    assert details["float_layers"] == ["stages.0.1.0"]
    island = result.model.module.stages[0][1][0]
    assert isinstance(island, Q.FloatLayer) and type(island.layer).__name__ == "ConvBnReLU2d"  # float, BN kept
    assert island.layer[0].weight[:, 0].eq(OUTLIER).all()  # no gradient reaches the dead channel's weights
    reached = _accuracy(result.model, digits)
    assert details["val_acc"] == pytest.approx(reached, abs=1e-6)
    assert details["within_budget"] is (context.reference_val_acc - reached <= TIGHT) is True
    assert details["ptq_val_acc"] == details["val_acc_by_float_layers"][-1]
    path = tmp_path / "qat.pt"
    result.save(path)
    loaded = Q.load_qat(path, _cnn(), SHAPE)
    x = digits["test"][0]
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))


def test_dynamic_keeps_the_fragile_linear_float(fragile_mlp, digits, tmp_path: Path):
    context = _context(fragile_mlp, digits)
    result = Q.dynamic(fragile_mlp, context, max_acc_drop=TIGHT)
    details = result.details
    assert details["float_layers"] == ["features.3"] and details["within_budget"] is True
    assert type(result.model.features[3]) is nn.Linear
    assert sorted(details["layers"]) == ["classifier", "features.1"]
    assert context.reference_val_acc - _accuracy(result.model, digits) <= TIGHT
    path = tmp_path / "dynamic.pt"
    result.save(path)
    loaded = Q.load_dynamic(path, _mlp())
    x = digits["test"][0]
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))


# -- a real run -----------------------------------------------------------------------------------
def test_a_run_with_a_budget_reports_the_search(make_cfg, tmp_path: Path):
    budget = 0.001
    overrides = ("compress=quant_static", f"compress.max_acc_drop={budget}", "student=cnn", "student.width=8")
    record = pipeline.run(make_cfg(*overrides, *QUICK), raise_on_failure=True)
    details = record["compressed"]["details"]
    reference, reached = details["reference_val_acc"], details["val_acc"]
    assert reference == pytest.approx(record["student"]["val"]["acc"], abs=1e-6)
    assert reached == pytest.approx(record["compressed"]["val"]["acc"], abs=1e-6)
    within = reference - reached <= budget + 1e-9
    assert details["within_budget"] is within
    # the search's record is consistent whatever this CPU's int8 kernels round: the layers kept
    # float are the first k of its order, and the trail's k-th accuracy is the one reached; within
    # the budget it stopped there, the first set that met it; otherwise it kept the most accurate
    trail, kept = details["val_acc_by_float_layers"], len(details["float_layers"])
    assert trail[kept] == reached
    missed = [reference - acc > budget + 1e-9 for acc in trail]
    if within:
        assert len(trail) == kept + 1 and all(missed[:kept])
    else:
        assert all(missed) and kept == trail.index(max(trail))
    table = tmp_path / "run" / "compressed" / f"{Q.SENSITIVITY_TABLE}.csv"
    scanned = reference - trail[0] > budget + 1e-9
    assert table.exists() is scanned
    if scanned:
        with table.open() as f:
            rows = list(csv.DictReader(f))
        assert [row["layer"] for row in rows] == [row["layer"] for row in details["sensitivity"]]
        assert {row["layer"] for row in rows if row["kept_float"] == "True"} == set(details["float_layers"])
        order = sorted(details["sensitivity"], key=lambda row: row["val_acc_int8_alone"])
        assert details["float_layers"] == [row["layer"] for row in order[:kept]]  # least accurate alone first
    # the artifact alone rebuilds the mixed model: its validation accuracy is the one reported
    student = pipeline.prepare(make_cfg("student=cnn", "student.width=8")).student
    loaded = Q.load_static(tmp_path / "run" / "compressed" / "model.pt", student, SHAPE)
    data = conf.build("data", "digits")
    assert _accuracy(loaded, data.splits) == pytest.approx(reached, abs=1e-6)
