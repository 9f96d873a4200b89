"""Int8 through ONNX Runtime: ``ort_int8_dynamic`` and ``ort_int8_static``.

The float model is exported to ONNX (``torch.onnx.export`` with ``dynamo=True``, a dynamic batch
dimension; see ``distillab.steps.export``), pre-processed by ``onnxruntime.quantization.quant_pre_process``
(shape inference and ONNX Runtime's graph optimisations, which fold BatchNorm into the convolutions)
and quantized by ``onnxruntime.quantization``:

``int8_dynamic``
    ``quantize_dynamic``: the weights of the ``op_types`` nodes (Gemm and MatMul: the Linear layers;
    Conv too if asked) become int8 (per output channel when ``per_channel``); their input
    activations are quantized at run time, with a range computed per batch (``DynamicQuantizeLinear``
    feeding ``MatMulInteger`` / ``ConvInteger``, the latter slower than float convolutions on CPU).
    No data needed.
``int8_static``
    ``quantize_static`` in the QDQ format (QuantizeLinear / DequantizeLinear pairs that ONNX Runtime
    fuses into int8 kernels when it loads the file): int8 weights, and activations whose ranges are
    calibrated once on ``calibration_batches`` training batches with ``calibrate_method`` (minmax,
    entropy or percentile). ``activation_type`` uint8 with int8 weights is what ONNX Runtime
    recommends on x86 CPUs; int8 on ARM.

The result's model is an :class:`OrtModel`: an ``nn.Module`` around an ``InferenceSession`` on the
CPU execution provider (tensor in, tensor out), so evaluation and ``measure`` treat it like any
model. ``Compressed.save(path)`` writes the quantized ONNX file; :func:`load` reads it back.

Accuracy budget (``max_acc_drop``): mixed precision
    As ``quantize.static`` does for torch.ao: everything is quantized and the validation accuracy
    measured (``compress.val_accuracy``); when it fell by more than the budget below
    ``context.reference_val_acc``, the layers (the Conv, Gemm and MatMul nodes with weights, named by
    their module path in the float model) are scanned, each quantized alone with all others float,
    and kept float (``nodes_to_exclude``) in the order of that accuracy, lowest first, the combined
    model checked after each, until the drop is within the budget. Activation ranges are calibrated
    once and reused by every candidate (``calibration_cache_path``). When no set of float layers
    meets the budget (every layer float still leaves the quantized activations of the other
    operators), the float ONNX model is the last candidate: ``all_float`` says so. A dry run
    (``context.dry_run``) skips the search.

The ONNX packages are the ``export`` extra: they are imported after :func:`require` has said in
one line how to install them when they are missing.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import version
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from distillab.compress import Compressed, Context, mixed, val_accuracy
from distillab.formats import Opset, require_extra, to_onnx
from distillab.io import atomic_write_bytes
from distillab.settings import AccuracyDrop, ConfigError, Count, checked

log = logging.getLogger(__name__)

__all__ = ["OrtModel", "int8_dynamic", "int8_static", "load", "stored_tensors"]

#: the ONNX operators whose weights are quantized, and which a budget search may keep float
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
#: the name of the sensitivity scan among ``Compressed.tables`` (``compressed/<name>.csv``), as ``quantize``'s
SENSITIVITY_TABLE = "quant_sensitivity"
#: ``calibrate_method`` values and ONNX Runtime's names for them
CALIBRATION = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


# -- the model -----------------------------------------------------------------------------------
class OrtModel(nn.Module):
    """An ONNX model run by ONNX Runtime on the CPU, as an ``nn.Module``: ``forward`` hands the
    input tensor to the session as a numpy array and returns its first output as a tensor.

    The session has as many intra-op threads as torch is set to when it runs (``torch.get_num_threads``),
    so the run's ``num_threads`` and ``measure.threads`` apply to it as to any model; it is opened
    on the first call and again when that number changes. A copy (``copy.deepcopy``, pickling)
    shares the ONNX bytes and opens its own session. ``onnx_bytes`` is the file; it holds no
    torch parameters (``measure`` counts its initializers: ``stored_tensors``)."""

    def __init__(self, onnx_bytes: bytes) -> None:
        super().__init__()
        self.onnx_bytes = bytes(onnx_bytes)
        self._session: Any = None
        self._threads = 0
        self._input = ""

    def _open(self, threads: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(self.onnx_bytes, options, providers=["CPUExecutionProvider"])
        self._input, self._threads = self._session.get_inputs()[0].name, threads

    def forward(self, x: Tensor) -> Tensor:
        threads = torch.get_num_threads()
        if threads != self._threads:
            self._open(threads)
        return torch.from_numpy(self._session.run(None, {self._input: x.detach().cpu().numpy()})[0])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_session": None, "_threads": 0}

    def stored_tensors(self) -> list[Tensor]:
        """The weights the file stores (``stored_tensors``)."""
        return stored_tensors(self.onnx_bytes)


def load(path: Any) -> OrtModel:
    """The model ``Compressed.save`` wrote (an ONNX file), run by ONNX Runtime."""
    require("distillab.compress.ort.load")
    return OrtModel(Path(path).read_bytes())


def stored_tensors(onnx_bytes: bytes) -> list[Tensor]:
    """The weight tensors of an ONNX file: its initializers but the quantization parameters (scales
    and zero points, found by the input names of each operator's schema, and what multiplies a
    scale) and the int64 shape and index constants. Int8 weights are counted as stored."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(onnx_bytes).graph
    parameters = _quantization_parameters(graph)
    return [
        torch.from_numpy(np.array(numpy_helper.to_array(tensor)))
        for tensor in graph.initializer
        if tensor.name not in parameters and tensor.data_type != onnx.TensorProto.INT64
    ]


def _quantization_parameters(graph: Any) -> set[str]:
    """Names of the scales and zero points of ``graph``: inputs and outputs its operators' schemas
    call ``*_scale`` / ``*_zero_point``, and initializers multiplied with one (a dynamic layer's
    weight scale is multiplied with its input's run-time scale)."""
    import onnx

    found: set[str] = set()
    for node in graph.node:
        try:
            schema = onnx.defs.get_schema(node.op_type, domain=node.domain)
        except onnx.defs.SchemaError:  # an operator of another domain: nothing known of its inputs
            continue
        for names, formal in ((node.input, schema.inputs), (node.output, schema.outputs)):
            for name, declared in zip(names, formal):
                if declared.name.endswith(("scale", "zero_point")):
                    found.add(name)
    for node in graph.node:
        if node.op_type == "Mul" and any(name in found for name in node.input):
            found.update(node.input)
    return found


# -- exporting and quantizing ---------------------------------------------------------------------
def require(method: str) -> None:
    """A one-line ``ConfigError`` naming ``method`` when the ONNX packages are missing."""
    require_extra(method)


@dataclasses.dataclass
class _Graph:
    """The pre-processed float ONNX file and what a search needs of it."""

    path: Path  # the pre-processed float model
    layers: dict[str, str]  # module path (from the weight's name) -> ONNX node name, in graph order
    weights: dict[str, str]  # module path -> name of its float weight initializer
    opset: int


def _prepare(model: nn.Module, context: Context, opset: int, ops: Sequence[str], folder: Path, method: str) -> _Graph:
    """Export ``model``, pre-process the file, and find its layers of the operators ``ops``."""
    import onnx
    from onnxruntime.quantization import quant_pre_process

    try:
        exported = to_onnx(model, context.input_shape, opset=opset, exporter="dynamo")
    except Exception as error:  # noqa: BLE001 - any exporter failure is the same mistake, in one line
        from distillab.formats import one_line

        raise ConfigError(f"{method} cannot export {type(model).__name__} to ONNX: {one_line(error)}") from None
    path = folder / "float.onnx"
    with _quiet():
        quant_pre_process(onnx.load_from_string(exported), path)
    proto = onnx.load(path)
    graph = proto.graph
    initializers = {tensor.name for tensor in graph.initializer}
    layers, weights = {}, {}
    for node in graph.node:
        if node.op_type in ops and len(node.input) > 1 and node.input[1] in initializers:
            layer = node.input[1].removesuffix(".weight")
            layers[layer], weights[layer] = node.name, node.input[1]
    if not layers:
        raise ConfigError(
            f"{method} quantizes {', '.join(ops)} nodes with weights; the ONNX graph of {type(model).__name__} has none"
        )
    return _Graph(path, layers, weights, next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hold back the INFO notes ONNX Runtime's quantizer logs on the root logger (one per tensor
    without static ranges) and its shape inference's progress; warnings pass."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _quietly(quantize: Callable[..., bytes]) -> Callable[..., bytes]:
    @functools.wraps(quantize)
    def quiet_quantize(*args: Any, **kwargs: Any) -> bytes:
        with _quiet():
            return quantize(*args, **kwargs)

    return quiet_quantize


class _Calibration:
    """Calibration inputs for ``quantize_static``: a reader over numpy arrays (``get_next``)."""

    def __init__(self, name: str, inputs: Sequence[np.ndarray]) -> None:
        self.feeds = iter([{name: x} for x in inputs])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def _calibration_inputs(context: Context, batches: int, method: str) -> list[np.ndarray]:
    inputs = [np.ascontiguousarray(x.cpu().float().numpy()) for x, *_ in islice(context.train_batches(), batches)]
    if not inputs:
        raise ConfigError(f"{method}: context.train_batches() gave no batch to calibrate on")
    return inputs


def _int8_layers(graph: _Graph, onnx_bytes: bytes) -> list[str]:
    """The layers whose float weight is gone from the quantized file: stored in int8."""
    import onnx

    kept = {tensor.name for tensor in onnx.load_from_string(onnx_bytes).graph.initializer}
    return [layer for layer, weight in graph.weights.items() if weight not in kept]


# -- the accuracy budget ---------------------------------------------------------------------------
def _search(
    quantize: Callable[..., bytes], graph: _Graph, context: Context, max_acc_drop: float, method: str
) -> mixed.MixedPrecision[bytes]:
    """Keep the fewest layers float that bring the validation accuracy within ``max_acc_drop`` of
    ``context.reference_val_acc`` (``compress.mixed``; see *Accuracy budget*), the float file when
    no set does. ``quantize(exclude=..., only=...)`` quantizes the float file with the layers
    ``exclude`` float, or only the layers ``only``."""
    if context.reference_val_acc is None:
        raise ValueError(f"{method}: max_acc_drop needs context.reference_val_acc")
    context = dataclasses.replace(context, val_batches=_cached(context))
    found = mixed.search(
        lambda float_layers: quantize(exclude=float_layers),
        lambda onnx_bytes: _accuracy(onnx_bytes, context),
        graph.layers,
        context.reference_val_acc,
        max_acc_drop,
        method,
        alone=lambda layer: quantize(only=[layer]),
    )
    if not found.within_budget:
        _fall_back_to_float(found, graph, context, method)
    return found


def _fall_back_to_float(found: mixed.MixedPrecision[bytes], graph: _Graph, context: Context, method: str) -> None:
    """No set of float layers met the budget: the float ONNX model is the last candidate."""
    float_bytes = graph.path.read_bytes()
    acc = _accuracy(float_bytes, context)
    if acc >= found.val_acc:  # as accurate as any int8 candidate, or more: int8 buys nothing
        found.val_acc, found.candidate, found.float_layers, found.all_float = acc, float_bytes, list(graph.layers), True
        log.warning("%s: even all-float is needed: the model is left float (val acc %.4f)", method, acc)


def _cached(context: Context) -> Callable[[], list]:
    """The validation batches read once: the search evaluates many candidates on them."""
    if context.val_batches is None:
        raise ValueError("max_acc_drop needs context.val_batches")
    batches = list(context.val_batches())
    return lambda: batches


def _accuracy(onnx_bytes: bytes, context: Context) -> float:
    return val_accuracy(OrtModel(onnx_bytes), context)


# -- the methods -----------------------------------------------------------------------------------
def _quantized(
    model: nn.Module,
    context: Context,
    method: str,
    opset: int,
    ops: Sequence[str],
    max_acc_drop: float | None,
    make: Callable[[_Graph, Path], Callable[..., bytes]],
) -> tuple[_Graph, bytes, mixed.MixedPrecision[bytes] | None]:
    """Export and pre-process ``model``, then quantize its layers of the operators ``ops`` with
    ``make(graph, folder)``'s function, within ``max_acc_drop`` when one is set (not on a dry run)."""
    require(method)
    with tempfile.TemporaryDirectory(prefix="distillab-ort-") as folder:
        graph = _prepare(copy.deepcopy(model), context, opset, ops, Path(folder), method)
        quantize = _quietly(make(graph, Path(folder)))
        if max_acc_drop is None or context.dry_run:
            return graph, quantize(exclude=[]), None
        search = _search(quantize, graph, context, max_acc_drop, method)
        return graph, search.candidate, search


def _result(
    method: str,
    backend: str,
    graph: _Graph,
    onnx_bytes: bytes,
    search: mixed.MixedPrecision[bytes] | None,
    details: dict[str, Any],
) -> Compressed:
    int8 = _int8_layers(graph, onnx_bytes)
    tables = {}
    if search is not None:
        details.update(search.details())
        if search.scan:
            tables[SENSITIVITY_TABLE] = search.scan
    details.update(  # the layers the file really runs in int8 or float, whatever the search asked
        exporter="torch.onnx.export(dynamo=True), quant_pre_process",
        opset=graph.opset,
        int8_layers=int8,
        float_layers=[layer for layer in graph.layers if layer not in int8],
    )
    model = OrtModel(onnx_bytes)
    save = lambda path: atomic_write_bytes(path, onnx_bytes)  # noqa: E731 - the file is the model
    return Compressed(model, method, backend, save, details, tables, suffix=".onnx")


def _backend(api: str) -> str:
    return f"onnxruntime {version('onnxruntime')} ({api})"


@checked
def int8_dynamic(
    model: nn.Module,
    context: Context,
    *,
    per_channel: bool,
    weight_type: Literal["int8", "uint8"],
    reduce_range: bool,
    op_types: list[Literal["Conv", "Gemm", "MatMul"]],
    opset: Opset,
    max_acc_drop: AccuracyDrop | None,
) -> Compressed:
    """Int8 weights of the ``op_types`` nodes, activations quantized per batch at run time, by ONNX
    Runtime; within ``max_acc_drop`` (when set) by keeping the most sensitive layers float."""
    if not op_types:
        raise ConfigError("op_types=[] is not allowed: a non-empty list of Conv, Gemm, MatMul")

    def make(graph: _Graph, folder: Path) -> Callable[..., bytes]:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        def quantize(exclude: Sequence[str] = (), only: Sequence[str] = ()) -> bytes:
            out = folder / "int8.onnx"
            quantize_dynamic(
                graph.path,
                out,
                op_types_to_quantize=list(op_types),
                per_channel=per_channel,
                reduce_range=reduce_range,
                weight_type=QuantType.QInt8 if weight_type == "int8" else QuantType.QUInt8,
                nodes_to_quantize=[graph.layers[layer] for layer in only],
                nodes_to_exclude=[graph.layers[layer] for layer in exclude],
            )
            return out.read_bytes()

        return quantize

    graph, onnx_bytes, search = _quantized(model, context, "ort_int8_dynamic", opset, op_types, max_acc_drop, make)
    details = {
        "weights": f"{weight_type}, {'per output channel' if per_channel else 'per tensor'}",
        "activations": "uint8, range computed per batch at run time",
        "reduce_range": reduce_range,
    }
    return _result("ort_int8_dynamic", _backend("quantize_dynamic"), graph, onnx_bytes, search, details)


@checked
def int8_static(
    model: nn.Module,
    context: Context,
    *,
    calibration_batches: Count,
    per_channel: bool,
    activation_type: Literal["uint8", "int8"],
    reduce_range: bool,
    calibrate_method: Literal["minmax", "entropy", "percentile"],
    opset: Opset,
    max_acc_drop: AccuracyDrop | None,
) -> Compressed:
    """Int8 weights and activations (QDQ format, ranges calibrated on ``calibration_batches``
    training batches) by ONNX Runtime; within ``max_acc_drop`` (when set) by keeping the most
    sensitive layers float."""
    inputs = _calibration_inputs(context, calibration_batches, "ort_int8_static")

    def make(graph: _Graph, folder: Path) -> Callable[..., bytes]:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        name = _input_name(graph.path)

        def quantize(exclude: Sequence[str] = (), only: Sequence[str] = ()) -> bytes:
            out = folder / "int8.onnx"
            quantize_static(
                graph.path,
                out,
                _Calibration(name, inputs),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8 if activation_type == "uint8" else QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=[graph.layers[layer] for layer in only],
                nodes_to_exclude=[graph.layers[layer] for layer in exclude],
                calibrate_method=getattr(CalibrationMethod, CALIBRATION[calibrate_method]),
                calibration_cache_path=folder / "ranges.json",  # calibrated once, reused by every candidate
            )
            return out.read_bytes()

        return quantize

    graph, onnx_bytes, search = _quantized(model, context, "ort_int8_static", opset, WEIGHTED_OPS, max_acc_drop, make)
    details = {
        "format": "QDQ",
        "weights": f"int8, {'per output channel' if per_channel else 'per tensor'}",
        "activations": f"{activation_type}, ranges calibrated by {calibrate_method}",
        "reduce_range": reduce_range,
        "calibration_batches": len(inputs),
        "calibration_samples": sum(len(x) for x in inputs),
    }
    return _result("ort_int8_static", _backend("quantize_static, QDQ"), graph, onnx_bytes, search, details)


def _input_name(path: Path) -> str:
    import onnx

    return onnx.load(path).graph.input[0].name
