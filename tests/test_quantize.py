"""Int8 quantization (``distillab.compress.quantize``) on digits-sized models trained here with
plain torch: int8 weights, file size, accuracy, reload, errors, and a quiet console."""

from __future__ import annotations

import copy
import re
import warnings
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from distillab import compress, conf, measure
from distillab.compress import PIPELINE_KEYS, Compressed, Context
from distillab.compress import quantize as Q
from distillab.data import TensorBatches
from distillab.distill.methods.kd import KD, kd_loss
from distillab.distill.module import DistillationModule, without_env
from distillab.models import CNN, MLP, resnet8
from distillab.settings import ConfigError
from tests.conftest import fit_on_digits

SHAPE = (1, 8, 8)


# -- digits and models trained on it ------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _fast_small_steps():
    # importing Lightning makes every plain-torch optimizer step look for NVML again; and one
    # thread is as fast for these small models and does not slow down 50x on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with without_env("PYTORCH_NVML_BASED_CUDA_CHECK"):
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits(digits_splits) -> dict[str, tuple[Tensor, Tensor]]:
    return digits_splits


def _fit(model: nn.Module, digits: dict, epochs: int) -> nn.Module:
    return fit_on_digits(model, digits, epochs)


def _accuracy(model: nn.Module, digits: dict) -> float:
    x, y = digits["test"]
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


@pytest.fixture(scope="module")
def mlp(digits) -> nn.Module:
    torch.manual_seed(0)
    return _fit(MLP(SHAPE, 10, hidden=[512, 512], dropout=0.0, input_dropout=0.0), digits, epochs=20)


@pytest.fixture(scope="module")
def cnn(digits) -> nn.Module:
    torch.manual_seed(0)
    return _fit(CNN(SHAPE, 10, width=32, blocks=2, dropout=0.0), digits, epochs=5)


@pytest.fixture(scope="module")
def resnet(digits) -> nn.Module:
    torch.manual_seed(0)
    return _fit(resnet8(SHAPE, 10), digits, epochs=4)


def _context(digits: dict, finetune=None, epochs: int = 0) -> Context:
    x, y = digits["train"]
    return Context(SHAPE, lambda: TensorBatches(x, y, 64, shuffle=False), finetune_epochs=epochs, finetune=finetune)


def _kd_finetune(teacher: nn.Module, digits: dict, steps: int = 5, calls: list | None = None):
    """A stand-in for ``Context.finetune``: a few Adam steps per epoch on the distillation loss."""
    x, y = digits["train"]

    def finetune(model: nn.Module, epochs: int, on_epoch_start=None) -> None:
        if calls is not None:
            fake_quant = any(isinstance(m, torch.ao.quantization.FakeQuantize) for m in model.modules())
            calls.append({"epochs": epochs, "training": model.training, "fake_quant": fake_quant})
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        for epoch in range(epochs):
            if on_epoch_start is not None:
                on_epoch_start(epoch)
            for index in torch.arange(len(y)).split(64)[:steps]:
                with torch.no_grad():
                    teacher_logits = teacher(x[index])
                optimizer.zero_grad()
                kd_loss(model(x[index]), teacher_logits, y[index], lam=0.5, temperature=2.0).backward()
                optimizer.step()

    return finetune


def _configured(option: str) -> dict:
    """The settings ``conf/compress/<option>.yaml`` gives its function, the accuracy budget
    (a pipeline key the function takes) included."""
    node = OmegaConf.to_container(conf.load("compress", option), resolve=True)
    own = {key: value for key, value in node.items() if key not in ("_target_", "_partial_", *PIPELINE_KEYS)}
    return {**own, "max_acc_drop": node["max_acc_drop"]}


def _dynamic(model: nn.Module, context: Context) -> Compressed:
    """``quantize.dynamic`` with the configured settings."""
    return Q.dynamic(model, context, **_configured("quant_dynamic"))


def _static(model: nn.Module, context: Context, **settings) -> Compressed:
    """``quantize.static`` with the configured settings, ``settings`` on top."""
    return Q.static(model, context, **{**_configured("quant_static"), **settings})


def _qat(model: nn.Module, context: Context, **settings) -> Compressed:
    """``quantize.qat`` with the configured settings, ``settings`` on top."""
    return Q.qat(model, context, **{**_configured("qat"), **settings})


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _latency_ratios(quantized: nn.Module, original: nn.Module) -> dict[int, float]:
    return {
        batch: measure.latency_ms(quantized, SHAPE, batch, threads=1, repeats=30)
        / measure.latency_ms(original, SHAPE, batch, threads=1, repeats=30)
        for batch in (1, 64)
    }


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message
    return message


# -- dynamic ----------------------------------------------------------------------------------
def test_dynamic_mlp_int8_smaller_and_accurate(mlp, digits):
    before = copy.deepcopy(mlp)
    result = _dynamic(mlp, _context(digits))
    model = result.model
    assert result.method == "quant_dynamic"
    assert result.backend == "torch.ao.quantization eager, x86 engine"
    for layer in (model.features[1], model.features[3], model.classifier):
        assert layer.weight().dtype == torch.qint8
    assert set(result.details["layers"].values()) == {"torch.qint8"} and result.details["int8_layers"] == 3
    assert type(mlp.classifier) is nn.Linear and _same_state(mlp, before)  # the input is untouched
    ratio, drop = _compare("quant_dynamic MLP 64-512-512-10", model, mlp, digits)
    assert ratio <= 0.30
    assert drop <= 0.01


def test_dynamic_refuses_a_model_without_linear_layers(digits):
    convs = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ConfigError) as error:
        _dynamic(convs, _context(digits))
    assert "quant_dynamic" in _one_line(error) and "Sequential has none" in str(error.value)


def _compare(name: str, int8: nn.Module, fp32: nn.Module, digits) -> tuple[float, float]:
    """Size ratio and accuracy drop of ``int8`` against ``fp32``; prints them with latency."""
    ratio = measure.size_bytes(int8) / measure.size_bytes(fp32)
    before, after = _accuracy(fp32, digits), _accuracy(int8, digits)
    latency = _latency_ratios(int8, fp32)
    print(
        f"\n{name}: size ratio {ratio:.3f}, accuracy {before:.4f} -> {after:.4f} (drop {before - after:+.4f}), "
        f"latency ratio batch 1 {latency[1]:.2f}, batch 64 {latency[64]:.2f}"
    )
    return ratio, before - after


# -- static -------------------------------------------------------------------------------------
def test_static_cnn_fuses_int8_convs_smaller_and_accurate(cnn, digits):
    before = copy.deepcopy(cnn)
    result = _static(cnn, _context(digits), calibration_batches=8)
    model = result.model
    assert result.method == "quant_static" and result.backend == "torch.ao.quantization eager, x86 engine"
    for i in range(2):
        for j in range(2):
            conv = model.module.stages[i][j][0]
            assert type(conv).__name__ == "ConvReLU2d" and conv.weight().dtype == torch.qint8
            assert conv.weight().qscheme() == torch.per_channel_affine
            assert conv.weight().q_per_channel_scales().numel() == 32 * 2**i
            assert f"stages.{i}.{j}.0+stages.{i}.{j}.1+stages.{i}.{j}.2" in result.details["fused"]
    assert model.module.classifier.weight().dtype == torch.qint8
    assert result.details["int8_layers"] == 5 and result.details["calibration_batches"] == 8
    assert result.details["calibration_samples"] == 8 * 64
    assert type(cnn.stages[0][0][1]) is nn.BatchNorm2d and _same_state(cnn, before)
    ratio, drop = _compare("quant_static CNN width 32 blocks 2", model, cnn, digits)
    assert ratio <= 0.30
    assert drop <= 0.02


def test_static_per_tensor_weights(cnn, digits):
    model = _static(cnn, _context(digits), calibration_batches=2, per_channel=False).model
    assert model.module.stages[0][0][0].weight().qscheme() == torch.per_tensor_affine


def test_static_resnet_residual_additions_become_int8_adds(resnet, digits):
    result = _static(resnet, _context(digits), calibration_batches=8)
    model = result.model
    block = model.module.layer2[0]
    assert type(block.q_add_0).__name__ == "QFunctional"  # the residual addition, with its own scale
    assert block.conv1.weight().dtype == torch.qint8 and block.downsample[0].weight().dtype == torch.qint8
    assert "layer2.0.downsample.0+layer2.0.downsample.1" in result.details["fused"]
    assert sorted(result.details["functional_ops"]) == [f"layer{i}.0.q_add_0" for i in (1, 2, 3)]
    drop = _accuracy(resnet, digits) - _accuracy(model, digits)
    print(f"\nquant_static resnet8: accuracy {_accuracy(resnet, digits):.4f} -> {_accuracy(model, digits):.4f}")
    assert drop <= 0.03
    assert isinstance(resnet.layer2[0], nn.Module) and not hasattr(resnet.layer2[0], "q_add_0")


class _Concat(nn.Module):
    """Two branches on very different scales, concatenated: int8 needs a requantizing cat."""

    def __init__(self) -> None:
        super().__init__()
        self.small, self.large = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)
        with torch.no_grad():
            self.large.weight.mul_(30)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.cat([self.small(x), self.large(x)], dim=1))


def test_static_concatenation_keeps_both_scales(digits):
    torch.manual_seed(0)
    model = _Concat().eval()
    quantized = _static(model, _context(digits), calibration_batches=4).model
    x = digits["test"][0][:64]
    with torch.no_grad():
        error = (quantized(x) - model(x)).abs().max() / model(x).abs().max()
    # one int8 scale for both branches costs ~12% here; torch.cat keeping the first branch's
    # scale would clip the large one to an error of ~80%
    assert error < 0.25
    assert type(quantized.module.q_cat_0).__name__ == "QFunctional"


class _Gated(nn.Module):
    """A forward torch.fx cannot trace (it branches on data) with tensor arithmetic inside."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.conv1(x), self.conv2(x)
        if float(x.dequantize().sum() if x.is_quantized else x.sum()) > -1e9:
            return a + b if self.op == "add" else torch.cat([a, b], dim=1)
        return a


@pytest.mark.parametrize("op", ["add", "cat"])
def test_static_refuses_arithmetic_it_cannot_run_in_int8(op, digits):
    model = nn.Sequential(_Gated(op), nn.Flatten(), nn.LazyLinear(10))
    model(torch.zeros(1, *SHAPE))
    with pytest.raises(ConfigError) as error:
        _static(model, _context(digits), calibration_batches=2)
    message = _one_line(error)
    assert message.startswith("quant_static cannot run Sequential in int8: '0' uses an operation")


def test_static_refuses_a_model_without_conv_or_linear(digits):
    with pytest.raises(ConfigError) as error:
        _static(nn.Sequential(nn.Flatten(), nn.ReLU()), _context(digits))
    assert "quant_static" in _one_line(error)


def test_unknown_engine_is_a_config_error(cnn, digits):
    with pytest.raises(ConfigError) as error:
        _static(cnn, _context(digits), engine="tpu")
    assert _one_line(error).startswith("engine='tpu' is not allowed: one of x86, fbgemm, qnnpack")


# -- quantization-aware training ------------------------------------------------------------------
def test_qat_finetunes_fake_quantized_model_with_distillation(cnn, digits):
    before = copy.deepcopy(cnn)
    calls: list[dict] = []
    context = _context(digits, _kd_finetune(cnn, digits, calls=calls), epochs=2)
    result = _qat(cnn, context, calibration_batches=4)
    model = result.model
    assert calls == [{"epochs": 2, "training": True, "fake_quant": True}]
    assert result.method == "qat" and result.details["frozen_last_epoch"] is True
    conv = model.module.stages[1][1][0]
    assert type(conv).__name__ == "ConvReLU2d" and conv.weight().dtype == torch.qint8
    assert model.module.classifier.weight().dtype == torch.qint8
    assert _same_state(cnn, before)
    drop = _accuracy(cnn, digits) - _accuracy(model, digits)
    print(f"\nqat CNN (fake fine-tuning): accuracy {_accuracy(cnn, digits):.4f} -> {_accuracy(model, digits):.4f}")
    assert drop <= 0.03


def test_qat_freezes_ranges_and_batch_norm_in_the_last_epoch(cnn, digits):
    states: list[tuple[int, bool]] = []
    inner = _kd_finetune(cnn, digits, steps=1)

    def finetune(model, epochs, on_epoch_start=None):
        def record(epoch):
            on_epoch_start(epoch)
            fake = next(m for m in model.modules() if isinstance(m, torch.ao.quantization.FakeQuantize))
            conv_bn = next(m for m in model.modules() if hasattr(m, "freeze_bn"))
            states.append((int(fake.observer_enabled), bool(conv_bn.freeze_bn)))

        inner(model, epochs, record)

    _qat(cnn, _context(digits, finetune, epochs=3), calibration_batches=1)
    assert states == [(1, False), (1, False), (0, True)]


def test_qat_trains_with_lightning(cnn, digits):
    x, y = digits["train"]

    class EpochStart(pl.Callback):
        def __init__(self, hook):
            self.hook = hook

        def on_train_epoch_start(self, trainer, module):
            if self.hook is not None:
                self.hook(trainer.current_epoch)

    def finetune(model, epochs, on_epoch_start=None):
        module = DistillationModule(
            model,
            copy.deepcopy(cnn),
            KD(lam=0.5, temperature=2.0, standardize=False),
            optimizer=partial(torch.optim.Adam, lr=1e-4),
        )
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_train_batches=4,
            callbacks=[EpochStart(on_epoch_start)],
        )
        trainer.fit(
            module,
            train_dataloaders=TensorBatches(x, y, 64, shuffle=True),
            val_dataloaders=TensorBatches(*digits["val"], 512, shuffle=False),
        )
        assert trainer.current_epoch == epochs

    result = _qat(cnn, _context(digits, finetune, epochs=2), calibration_batches=2)
    assert result.model.module.stages[0][0][0].weight().dtype == torch.qint8
    assert _accuracy(cnn, digits) - _accuracy(result.model, digits) <= 0.03


def test_qat_needs_finetuning(cnn, digits):
    with pytest.raises(ConfigError) as error:
        _qat(cnn, _context(digits))
    assert _one_line(error) == (
        "finetune_epochs=0 is not allowed: an integer >= 1: quantization-aware training needs epochs"
    )


# -- the saved artifact -------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["quant_dynamic", "quant_static", "qat"])
def test_save_and_reload_give_the_same_outputs(method, cnn, digits, tmp_path: Path):
    if method == "quant_dynamic":
        result = _dynamic(cnn, _context(digits))
    elif method == "quant_static":
        result = _static(cnn, _context(digits), calibration_batches=2, per_channel=False)
    else:
        result = _qat(cnn, _context(digits, _kd_finetune(cnn, digits, steps=2), epochs=1), calibration_batches=2)
    path = tmp_path / "int8.pt"
    result.save(path)
    assert abs(path.stat().st_size - measure.size_bytes(result.model)) < 1024
    fresh = CNN(SHAPE, 10, width=32, blocks=2, dropout=0.0)  # other float weights: all of them must come from the file
    if method == "quant_dynamic":
        loaded = Q.load_dynamic(path, fresh)
    elif method == "quant_static":
        loaded = Q.load_static(path, fresh, SHAPE, per_channel=False)
    else:
        loaded = Q.load(path, fresh, "qat", SHAPE)
    x = digits["test"][0][:100]
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))
    assert Q.int8_layers(loaded) == result.details["layers"]


# -- a quiet console ----------------------------------------------------------------------------
def test_no_torch_ao_deprecation_reaches_the_caller_but_other_warnings_do(cnn, mlp, digits, tmp_path: Path):
    inner = _kd_finetune(cnn, digits, steps=1)

    def noisy_finetune(model, epochs, on_epoch_start=None):
        warnings.warn("a warning of the fine-tuning", UserWarning, stacklevel=1)
        warnings.warn("a deprecation of the fine-tuning", DeprecationWarning, stacklevel=1)
        inner(model, epochs, on_epoch_start)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _dynamic(mlp, _context(digits)).save(tmp_path / "dynamic.pt")
        _static(cnn, _context(digits), calibration_batches=2).save(tmp_path / "static.pt")
        _qat(cnn, _context(digits, noisy_finetune, epochs=1), calibration_batches=2).save(tmp_path / "qat.pt")
        Q.load_static(tmp_path / "static.pt", CNN(SHAPE, 10, width=32, blocks=2, dropout=0.0), SHAPE)
        Q.load_dynamic(tmp_path / "dynamic.pt", MLP(SHAPE, 10, hidden=[512, 512], dropout=0.0, input_dropout=0.0))
    messages = [(w.category, str(w.message)) for w in caught]
    assert (UserWarning, "a warning of the fine-tuning") in messages
    assert (DeprecationWarning, "a deprecation of the fine-tuning") in messages
    leaked = [m for c, m in messages if issubclass(c, DeprecationWarning) and "fine-tuning" not in m]
    leaked += [m for _, m in messages if re.search(r"torch\.ao\.quantization|reduce_range|quantize_per_tensor", m)]
    assert leaked == []
    assert not any(issubclass(c, Warning) and "TypedStorage" in m for c, m in messages)


# -- configs ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,epochs,options",
    [
        ("quant_dynamic", 0, {}),
        ("quant_static", 0, {"calibration_batches": 16, "per_channel": True, "engine": "x86"}),
        ("qat", 3, {"calibration_batches": 16, "per_channel": True, "engine": "x86"}),
    ],
)
def test_config_instantiates_the_method(name, epochs, options, cnn, digits):
    cfg = OmegaConf.to_container(conf.load("compress", name), resolve=True)
    assert "method" not in cfg and cfg["target"] == "student" and cfg["amount"] is None
    assert cfg["finetune_epochs"] == epochs
    rest = {k: v for k, v in cfg.items() if k not in PIPELINE_KEYS}
    assert {k: v for k, v in rest.items() if not k.startswith("_")} == options
    (method,) = compress.methods(conf.load("compress", name))  # as the run builds it: with max_acc_drop
    assert method.keywords["max_acc_drop"] is None
    finetune = _kd_finetune(cnn, digits, steps=1) if epochs else None
    result = method(cnn, _context(digits, finetune, epochs=min(epochs, 1)))
    assert result.method == name and Q.int8_layers(result.model)


def test_measure_counts_the_weights_of_fused_int8_layers():
    model = CNN((1, 8, 8), 10, width=8, blocks=1, dropout=0.0).eval()
    batches = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)), torch.arange(16))]
    context = Context(input_shape=(1, 8, 8), train_batches=lambda: iter(batches))
    int8 = _static(model, context, calibration_batches=1).model
    # folding a BatchNorm into its (bias-free) conv: the scale goes into the weights, the
    # shift becomes the conv's bias, so each BatchNorm's 2·C parameters become C
    folded = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert measure.params(int8) == measure.params(model) - folded == 754
