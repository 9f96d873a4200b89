"""Int8 quantization with torch.ao in eager mode: ``dynamic`` and ``static`` post-training
quantization, and ``qat`` (quantization-aware training with the run's distillation loss).

Every method returns a model whose weights are stored as int8 and that runs int8 CPU kernels;
with ``max_acc_drop`` set, the layers most sensitive to int8 stay float (``compress.mixed``).
``Compressed.save`` writes the int8 state and the float layers' paths; :func:`load_dynamic`,
:func:`load_static` and :func:`load_qat` (or :func:`load`) rebuild the model from a fresh float one.
The torch.ao calls are in ``torch_ao``, the fusions and the rewrite of tensor arithmetic in
``fx_rewrite``, the trial run in ``int8_trial``; docs/compression.md explains each method.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from itertools import islice
from typing import Any, Literal

import torch
import torch.ao.nn.intrinsic.qat as intrinsic_qat
import torch.ao.quantization as tq
from torch import Tensor, nn

from distillab.compress import Compressed, Context, mixed, torch_ao, val_accuracy
from distillab.compress.fx_rewrite import Preparation
from distillab.compress.int8_trial import check_int8_runs
from distillab.compress.torch_ao import DYNAMIC_TYPES, STATIC_TYPES, FloatLayer, int8_layers, quiet_deprecations
from distillab.settings import AccuracyDrop, ConfigError, Count, checked

log = logging.getLogger(__name__)

__all__ = [
    "FloatLayer",
    "Preparation",
    "dynamic",
    "int8_layers",
    "load",
    "load_dynamic",
    "load_qat",
    "load_static",
    "qat",
    "quiet_deprecations",
    "static",
]

#: int8 kernels: x86 (fbgemm + oneDNN), fbgemm, or qnnpack (ARM)
Engine = Literal["x86", "fbgemm", "qnnpack"]


#: what ``Compressed.save`` writes: ``{"format", "float_layers", "state_dict"}``
ARTIFACT_FORMAT = "distillab.quantize/1"
#: the name of the sensitivity scan among ``Compressed.tables`` (``compressed/<name>.csv``)
SENSITIVITY_TABLE = "quant_sensitivity"


def _save(model: nn.Module, float_layers: Sequence[str]) -> Callable[[Any], None]:
    """Write the artifact: the state of the int8 model and the paths of its float layers."""

    def save(path: Any) -> None:
        artifact = {"format": ARTIFACT_FORMAT, "float_layers": list(float_layers), "state_dict": model.state_dict()}
        with quiet_deprecations():
            torch.save(artifact, path)

    return save


def _read(path: Any) -> tuple[dict[str, Any], list[str]]:
    """The state and the float layers of an artifact written by ``Compressed.save``."""
    with quiet_deprecations():
        artifact = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(artifact, dict) or artifact.get("format") != ARTIFACT_FORMAT:
        raise ConfigError(f"path={str(path)!r} is not allowed: an int8 artifact in the {ARTIFACT_FORMAT} format")
    return artifact["state_dict"], list(artifact["float_layers"])


def _load_state(model: nn.Module, state: dict[str, Any], engine: str) -> nn.Module:
    with quiet_deprecations(), torch_ao.selected(engine):
        model.load_state_dict(state)
    return model.eval()


def _example(input_shape: Sequence[int]) -> Tensor:
    """Two random inputs: the structure of a forward pass, for tracing and the trial run."""
    return torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))


def _float_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).cpu().float().eval()


def _calibration_inputs(context: Context, batches: int, method: str) -> list[Tensor]:
    """The inputs of the first ``batches`` training batches, kept so that every candidate of a
    budget search is calibrated on the same data."""
    inputs = [x.cpu() for x, *_ in islice(context.train_batches(), batches)]
    if not inputs:
        raise ConfigError(f"{method}: context.train_batches() gave no batch to calibrate on")
    return inputs


def _calibrate(model: nn.Module, inputs: Sequence[Tensor]) -> None:
    """Run ``inputs`` through ``model`` (eval mode, no gradients) so its observers record ranges."""
    model.eval()
    with quiet_deprecations(), torch.no_grad():
        for x in inputs:
            model(x)


def _require_layers(model: nn.Module, types: tuple[type, ...], method: str, what: str) -> None:
    if not any(isinstance(m, types) for m in model.modules()):
        raise ConfigError(f"{method} quantizes {what} layers; {type(model).__name__} has none")


def _candidates(model: nn.Module, types: tuple[type, ...]) -> list[str]:
    """Paths of the layers of ``model`` a budget search may keep float, in module order."""
    return [name for name, module in model.named_modules() if name and isinstance(module, types)]


def _prepare(
    model: nn.Module,
    example: Tensor,
    engine: str,
    per_channel: bool,
    qat: bool,
    method: str,
    keep_float: Sequence[str],
) -> tuple[nn.Module, Preparation]:
    """``torch_ao.prepare``, then the trial run of the all-int8 model (a float layer only adds a
    dequantize / quantize pair: the all-int8 check covers it)."""
    arch = type(model).__name__
    prepared, done = torch_ao.prepare(model, example, engine, per_channel, qat, method, keep_float)
    if not keep_float:
        check_int8_runs(prepared, example, engine, arch, method)
    return prepared, done


# -- the accuracy budget ---------------------------------------------------------------------------
def _budget_applies(max_acc_drop: float | None, context: Context) -> bool:
    """A budget is searched when one is set, except on a dry run (untrained model, one batch)."""
    return max_acc_drop is not None and not context.dry_run


def _search(
    all_int8: nn.Module,
    build: Callable[[list[str]], nn.Module],
    layers: list[str],
    context: Context,
    max_acc_drop: float,
    method: str,
) -> mixed.MixedPrecision[nn.Module]:
    """Keep the fewest ``layers`` float that bring the validation accuracy within ``max_acc_drop`` of
    ``context.reference_val_acc``, starting from ``all_int8`` (``compress.mixed``).
    ``build(keep_float)`` quantizes the float model with the layers ``keep_float`` left in float."""
    if context.reference_val_acc is None or context.val_batches is None:
        raise ValueError(f"{method}: max_acc_drop needs context.reference_val_acc and context.val_batches")
    batches = list(context.val_batches())  # read once: every candidate is evaluated on them
    context = dataclasses.replace(context, val_batches=lambda: batches)
    return mixed.search(
        build,
        lambda model: val_accuracy(model, context),
        layers,
        context.reference_val_acc,
        max_acc_drop,
        method,
        first=all_int8,
    )


def _compressed(
    method: str, search: mixed.MixedPrecision | None, quantized: nn.Module, details: dict[str, Any], engine: str
) -> Compressed:
    """The ``Compressed`` of ``method``: the searched model when there was a budget, with the
    search in its details and its scan among its tables."""
    model = search.candidate if search is not None else quantized
    float_layers = search.float_layers if search is not None else []
    details["float_layers"] = list(float_layers)
    tables = {}
    if search is not None:
        details.update(search.details())
        if search.scan:
            tables[SENSITIVITY_TABLE] = search.scan
    return Compressed(model, method, torch_ao.describe(engine), _save(model, float_layers), details, tables)


# -- the methods -------------------------------------------------------------------------------
@checked
def dynamic(model: nn.Module, context: Context, *, max_acc_drop: AccuracyDrop | None) -> Compressed:
    """Int8 weights for Linear / LSTM / GRU layers, activations quantized per batch at run time;
    within ``max_acc_drop`` (when set) by keeping the most sensitive of those layers float."""
    _require_layers(model, DYNAMIC_TYPES, "quant_dynamic", "Linear, LSTM and GRU")
    engine = torch_ao.dynamic_engine()

    def build(keep_float: list[str]) -> nn.Module:
        return torch_ao.quantize_dynamic(_float_copy(model), engine, keep_float).eval()

    quantized = build([])
    layers = _candidates(model, DYNAMIC_TYPES)
    search = None
    if _budget_applies(max_acc_drop, context):
        search = _search(quantized, build, layers, context, max_acc_drop, "quant_dynamic")
    float_layers = set(search.float_layers if search is not None else [])
    final = search.candidate if search is not None else quantized
    total = sum(p.numel() for p in model.parameters())
    covered = sum(
        p.numel() for name in layers if name not in float_layers for p in model.get_submodule(name).parameters()
    )
    int8 = int8_layers(final)
    share = covered / total if total else 0.0
    if share < 0.5:
        log.warning(
            "quant_dynamic: the %d int8 Linear/LSTM/GRU layers of %s hold %.0f%% of its weights; the rest stays float "
            "(quant_static quantizes convolutions)",
            len(int8),
            type(model).__name__,
            100 * share,
        )
    details = {
        "engine": engine,
        "weights": "int8, per output channel (Linear)",
        "activations": "int8, scale computed per batch at run time",
        "int8_layers": len(int8),
        "int8_weight_share": round(share, 4),
        "layers": int8,
    }
    return _compressed("quant_dynamic", search, quantized, details, engine)


def _post_training(
    model: nn.Module,
    inputs: Sequence[Tensor],
    input_shape: Sequence[int],
    per_channel: bool,
    engine: str,
    method: str,
    keep_float: list[str],
) -> tuple[nn.Module, Preparation]:
    """A copy of ``model`` quantized statically, calibrated on ``inputs``, with ``keep_float`` left float."""
    prepared, done = _prepare(
        _float_copy(model), _example(input_shape), engine, per_channel, qat=False, method=method, keep_float=keep_float
    )
    _calibrate(prepared, inputs)
    return torch_ao.convert(prepared, engine), done


@checked
def static(
    model: nn.Module,
    context: Context,
    *,
    calibration_batches: Count,
    per_channel: bool,
    engine: Engine,
    max_acc_drop: AccuracyDrop | None,
) -> Compressed:
    """Post-training static int8: fuse, insert quant/dequant stubs, calibrate, convert; within
    ``max_acc_drop`` (when set) by keeping the most sensitive convolutions / Linear layers float."""
    _require_layers(model, STATIC_TYPES, "quant_static", "convolution and Linear")
    inputs = _calibration_inputs(context, calibration_batches, "quant_static")
    build = functools.partial(_post_training, model, inputs, context.input_shape, per_channel, engine, "quant_static")
    quantized, done = build([])
    search = None
    if _budget_applies(max_acc_drop, context):
        layers = _candidates(model, STATIC_TYPES)
        search = _search(quantized, lambda keep: build(keep)[0], layers, context, max_acc_drop, "quant_static")
    details = _details(search.candidate if search is not None else quantized, done, engine, per_channel, inputs)
    return _compressed("quant_static", search, quantized, details, engine)


@checked
def qat(
    model: nn.Module,
    context: Context,
    *,
    calibration_batches: Count,
    per_channel: bool,
    engine: Engine,
    max_acc_drop: AccuracyDrop | None,
) -> Compressed:
    """Quantization-aware fine-tuning with the distillation loss, then conversion to int8; with
    ``max_acc_drop`` set, the layers a post-training search keeps float stay float throughout,
    and the budget is checked after the fine-tuning."""
    if context.finetune is None or context.finetune_epochs < 1:
        raise ConfigError(
            f"finetune_epochs={context.finetune_epochs} is not allowed: an integer >= 1: "
            "quantization-aware training needs epochs"
        )
    _require_layers(model, STATIC_TYPES, "qat", "convolution and Linear")
    inputs = _calibration_inputs(context, calibration_batches, "qat")
    search = None
    if _budget_applies(max_acc_drop, context):
        build = functools.partial(_post_training, model, inputs, context.input_shape, per_channel, engine, "qat")
        layers = _candidates(model, STATIC_TYPES)
        search = _search(build([])[0], lambda keep: build(keep)[0], layers, context, max_acc_drop, "qat")
    float_layers = search.float_layers if search is not None else []
    prepared, done = _prepare(
        _float_copy(model),
        _example(context.input_shape),
        engine,
        per_channel,
        qat=True,
        method="qat",
        keep_float=float_layers,
    )
    _calibrate(prepared, inputs)
    quantized = _fine_tune_and_convert(prepared, context, engine)
    extra: dict[str, Any] = {
        "finetune_epochs": context.finetune_epochs,
        "frozen_last_epoch": context.finetune_epochs >= 2,
    }
    if search is not None:
        extra["ptq_val_acc"] = round(search.val_acc, 6)
        search = dataclasses.replace(search, candidate=quantized, val_acc=val_accuracy(quantized, context))
        if not search.within_budget:
            log.warning(
                "qat: %.4f validation accuracy after fine-tuning with %d float layers misses max_acc_drop=%g "
                "(reference %.4f)",
                search.val_acc,
                len(float_layers),
                search.max_acc_drop,
                search.reference,
            )
    details = {**_details(quantized, done, engine, per_channel, inputs), **extra}
    return _compressed("qat", search, quantized, details, engine)


def _fine_tune_and_convert(prepared: nn.Module, context: Context, engine: str) -> nn.Module:
    """Fine-tune the fake-quantized ``prepared`` with ``context.finetune``, freezing the ranges
    and BatchNorm statistics at the start of the last epoch (when there are two or more), and
    convert it to int8."""
    epochs = context.finetune_epochs
    started = [0]

    def on_epoch_start(epoch: int) -> None:
        started[0] += 1
        if epochs >= 2 and started[0] == epochs:  # the last epoch: freeze ranges and BN statistics
            prepared.apply(tq.disable_observer)
            prepared.apply(intrinsic_qat.freeze_bn_stats)

    prepared.train()
    for parameter in prepared.parameters():  # a frozen teacher (target: teacher) comes without gradients
        parameter.requires_grad_(True)
    context.finetune(prepared, epochs, on_epoch_start=on_epoch_start)
    return torch_ao.convert(prepared, engine)


def _details(
    quantized: nn.Module, done: Preparation, engine: str, per_channel: bool, inputs: Sequence[Tensor]
) -> dict[str, Any]:
    layers = int8_layers(quantized)
    return {
        "engine": engine,
        "per_channel": per_channel,
        "calibration_batches": len(inputs),
        "calibration_samples": sum(len(x) for x in inputs),
        "int8_layers": len(layers),
        "layers": layers,
        "fused": ["+".join(group) for group in done.fused],
        "functional_ops": done.functional_ops,
        "untraced": done.untraced,
    }


# -- reloading -----------------------------------------------------------------------------------
def load_dynamic(path: Any, model: nn.Module) -> nn.Module:
    """The int8 model saved by ``dynamic``, given a freshly built float ``model`` of the same
    architecture; the float layers named in the file stay float."""
    state, float_layers = _read(path)
    engine = torch_ao.dynamic_engine()
    return _load_state(torch_ao.quantize_dynamic(_float_copy(model), engine, float_layers), state, engine)


def load_static(
    path: Any, model: nn.Module, input_shape: Sequence[int], per_channel: bool = True, engine: str = "x86"
) -> nn.Module:
    """The int8 model saved by ``static``: same fusion, float layers, stubs and conversion, then the saved state."""
    return _load_prepared(path, model, input_shape, per_channel, engine, qat=False)


def load_qat(
    path: Any, model: nn.Module, input_shape: Sequence[int], per_channel: bool = True, engine: str = "x86"
) -> nn.Module:
    """The int8 model saved by ``qat``: same fusion, float layers, stubs, prepare_qat and conversion,
    then the saved state."""
    return _load_prepared(path, model, input_shape, per_channel, engine, qat=True)


def _load_prepared(
    path: Any, model: nn.Module, input_shape: Sequence[int], per_channel: bool, engine: str, qat: bool
) -> nn.Module:
    state, float_layers = _read(path)
    example = _example(input_shape)
    method = "qat" if qat else "quant_static"
    prepared, _ = _prepare(
        _float_copy(model), example, engine, per_channel, qat=qat, method=method, keep_float=float_layers
    )
    prepared.eval()
    with quiet_deprecations(), torch.no_grad():
        prepared(example)  # gives the observers a range; the saved scales replace it
    return _load_state(torch_ao.convert(prepared, engine), state, engine)


def load(
    path: Any,
    model: nn.Module,
    method: str,
    input_shape: Sequence[int] | None = None,
    per_channel: bool = True,
    engine: str = "x86",
) -> nn.Module:
    """``load_dynamic`` / ``load_static`` / ``load_qat`` by method name."""
    if method == "quant_dynamic":
        return load_dynamic(path, model)
    if method not in ("quant_static", "qat"):
        raise ConfigError(f"method={method}: not a quantization method; one of quant_dynamic, quant_static, qat")
    if input_shape is None:
        raise ConfigError(f"input_shape: {method} needs the model's input shape to rebuild the int8 model")
    loader = load_static if method == "quant_static" else load_qat
    return loader(path, model, input_shape, per_channel=per_channel, engine=engine)
