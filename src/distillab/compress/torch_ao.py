"""torch.ao.quantization in eager mode: the calls the int8 quantizers make.

Eager mode swaps modules for ``torch.ao.nn.quantized`` layers: on a CPU it gives int8 *speed* on
plain modules with no compilation step. :func:`quantize_dynamic` quantizes Linear/LSTM/GRU layers
dynamically; :func:`prepare` fuses, rewrites tensor arithmetic (``fx_rewrite``), keeps the
``keep_float`` layers float (:class:`FloatLayer`), wraps the model in a quantize / dequantize pair
and inserts observers (or fake quantization for QAT); :func:`convert` turns a calibrated or trained
prepared model into the int8 one. torch.ao.quantization announces its deprecation on every call;
exactly those messages are silenced, around the calls into it only (:func:`quiet_deprecations`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
import torch.ao.quantization as tq
from torch import Tensor, nn

from distillab.compress.fx_rewrite import Preparation, rewrite_and_find_fusions
from distillab.settings import ConfigError

#: what ``Compressed.backend`` names, with the engine
NAME = "torch.ao.quantization eager"
DYNAMIC_TYPES = (nn.Linear, nn.LSTM, nn.GRU)
STATIC_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

# (category, regular expression matched at the start of the message). torch.ao.quantization
# warns on every prepare/convert/quantize_dynamic call that it moves to torchao, its observers
# that ``reduce_range`` will be deprecated, its converted layers that quantized tensor creation
# functions are, and saving quantized tensors touches the deprecated TypedStorage. None of it
# is about the user's model.
_DEPRECATION_NOISE: tuple[tuple[type[Warning], str], ...] = (
    (DeprecationWarning, r"torch\.ao\.quantization is deprecated"),
    (UserWarning, r"Please use quant_min and quant_max to specify the range for observers"),
    (UserWarning, r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor creation"),
    (UserWarning, r"TypedStorage is deprecated"),
)


@contextlib.contextmanager
def quiet_deprecations() -> Iterator[None]:
    """Silence exactly the deprecation messages of torch.ao.quantization inside the block;
    every other warning is shown as usual."""
    with warnings.catch_warnings():
        for category, message in _DEPRECATION_NOISE:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


@contextlib.contextmanager
def selected(name: str) -> Iterator[None]:
    """Select the quantized kernel library for the block (weights are packed for it)."""
    supported = torch.backends.quantized.supported_engines
    if name not in supported:
        raise ConfigError(f"engine={name}: not available in this torch build on this CPU; use one of {supported}")
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def dynamic_engine() -> str:
    return "x86" if "x86" in torch.backends.quantized.supported_engines else "qnnpack"


def describe(engine: str) -> str:
    """``Compressed.backend`` of a model quantized with ``engine``."""
    return f"{NAME}, {engine} engine"


def quantize_dynamic(model: nn.Module, engine: str, keep_float: Sequence[str]) -> nn.Module:
    """``model`` (modified) with dynamically quantized Linear/LSTM/GRU layers, but those at the paths ``keep_float``."""
    for path in keep_float:  # quantize_dynamic keeps a module's own qconfig over the spec's
        _layer(model, path, "quant_dynamic").qconfig = None
    spec = {
        nn.Linear: tq.per_channel_dynamic_qconfig if engine != "qnnpack" else tq.default_dynamic_qconfig,
        nn.LSTM: tq.default_dynamic_qconfig,
        nn.GRU: tq.default_dynamic_qconfig,
    }
    with quiet_deprecations(), selected(engine):
        return tq.quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)


def prepare(
    model: nn.Module,
    example: Tensor,
    engine: str,
    per_channel: bool,
    qat: bool,
    method: str,
    keep_float: Sequence[str],
) -> tuple[nn.Module, Preparation]:
    """``model`` (modified) ready for calibration (observers) or for quantization-aware training (fake
    quantization), with the layers at the paths ``keep_float`` left float; and what was done to it."""
    model.eval()
    model, done = rewrite_and_find_fusions(model, example)
    with quiet_deprecations(), selected(engine):
        if qat:
            model.train()
        if done.fused:
            fuse = tq.fuse_modules_qat if qat else tq.fuse_modules
            fuse(model, done.fused, inplace=True)
        for path in keep_float:
            _replace(model, path, FloatLayer(_layer(model, path, method)))
        wrapped = tq.QuantWrapper(model)
        wrapped.qconfig = _qconfig(engine, per_channel, qat)
        if qat:
            tq.prepare_qat(wrapped, inplace=True)
        else:
            tq.prepare(wrapped, inplace=True)
    return wrapped, done


def convert(model: nn.Module, engine: str) -> nn.Module:
    """The calibrated or trained prepared ``model`` (modified) as a real int8 model."""
    model.cpu().eval()
    with quiet_deprecations(), selected(engine):
        return tq.convert(model, inplace=True)


class FloatLayer(nn.Module):
    """A layer kept in float inside an eager int8 model: its int8 input is dequantized, and its
    float output quantized again (with a scale calibrated like any other activation), so the
    int8 layers around it are unchanged. ``layer.qconfig = None`` makes prepare and convert
    leave it (and a fused group's members) alone."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        layer.qconfig = None
        self.dequant, self.layer, self.quant = tq.DeQuantStub(), layer, tq.QuantStub()

    def forward(self, x: Tensor) -> Tensor:
        return self.quant(self.layer(self.dequant(x)))


def _layer(model: nn.Module, path: str, method: str) -> nn.Module:
    """The submodule of ``model`` at ``path``; a ``ConfigError`` naming it when there is none."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ConfigError(
            f"float layer '{path}' is not a layer of {type(model).__name__}: {method} was given another architecture"
        ) from None


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _qconfig(engine: str, per_channel: bool, qat: bool) -> tq.QConfig:
    """The engine's default qconfig, with per-channel or per-tensor symmetric int8 weights."""
    if qat:
        base = tq.get_default_qat_qconfig(engine)
        weight = tq.default_per_channel_weight_fake_quant if per_channel else tq.default_weight_fake_quant
    else:
        base = tq.get_default_qconfig(engine)
        weight = tq.default_per_channel_weight_observer if per_channel else tq.default_weight_observer
    return tq.QConfig(activation=base.activation, weight=weight)


def int8_layers(model: nn.Module) -> dict[str, str]:
    """Module path -> stored weight dtype of every quantized layer of ``model``."""
    layers = {}
    for name, module in model.named_modules():
        if not type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")):
            continue
        weight = getattr(module, "weight", None)
        if callable(weight):
            layers[name] = str(weight().dtype)
        elif hasattr(module, "_all_weight_values"):  # dynamic LSTM / GRU: packed per gate
            layers[name] = str(module.dtype)
    return layers
