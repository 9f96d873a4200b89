"""Model files: a model written as ONNX or TorchScript bytes, and the optional packages that takes.

The library under ``steps/export`` (which writes a run's models after the run) and
``compress.ort`` (which quantizes ONNX graphs with ONNX Runtime). torch and the ONNX packages
are imported only where a model is written, so that ``require_extra`` and ``Opset`` serve the
config checks, before torch is imported.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import io
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

from distillab.settings import ConfigError, Range

if TYPE_CHECKING:
    from torch import Tensor, nn


#: the packages of the optional extras of pyproject.toml that code checks for before it imports them
EXTRAS = {"export": ("onnx", "onnxruntime", "onnxscript"), "text": ("transformers", "tokenizers", "datasets")}
EXTRA = EXTRAS["export"]


INSTALL = 'pip install -e ".[export]"'


#: an ONNX opset torch's exporters can write (the dynamo exporter writes 18 or newer)
Opset = Annotated[int, Range(18, what="an ONNX opset")]


def missing_extra(extra: str = "export") -> list[str]:
    """The packages of ``extra`` that cannot be imported (found without importing them)."""
    return [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]


def require_extra(what: str, extra: str = "export") -> None:
    """A one-line ``ConfigError`` naming ``what`` needs ``extra``, when a package of it is missing."""
    missing = missing_extra(extra)
    if missing:
        install = f'pip install -e ".[{extra}]"'
        raise ConfigError(f"{what} needs the {extra} extra ({', '.join(missing)} missing): {install}")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence what the exporters say about themselves, not about the model: the INFO log of
    onnxscript's graph passes, torch's deprecation notices of TorchScript and of the
    TorchScript-based ONNX exporter (chosen on purpose here) and of that exporter's own internals,
    the tracer's notice that torch.ao int8 layers read their (constant) scales as Python numbers,
    and the ``.grad`` notice a copy of a loaded TorchScript module triggers."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"You are using the legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message=r"The feature will be removed", module=r"torch\.onnx\.")
        warnings.filterwarnings(
            "ignore", message=r"Converting a tensor to a Python", module=r"torch\.ao\.nn\.quantized"
        )
        warnings.filterwarnings("ignore", message=r"The \.grad attribute of a Tensor that is not a leaf Tensor")
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _example(input_shape: Sequence[int]) -> Tensor:
    """Two fresh, contiguous samples: an exporter records the example's strides, and a batch of 2
    keeps the batch dimension symbolic."""
    import torch

    return torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))


def to_onnx(model: nn.Module, input_shape: Sequence[int], *, opset: int, exporter: str) -> bytes:
    """The ONNX file of a CPU copy of ``model`` in eval mode, with a dynamic batch dimension."""
    import torch

    model, example = copy.deepcopy(model).cpu().eval(), _example(input_shape)
    with quiet(), torch.no_grad():
        if exporter == "dynamo":
            batch = torch.export.Dim("batch")
            program = torch.onnx.export(
                model, (example,), dynamo=True, opset_version=opset, dynamic_shapes=({0: batch},), verbose=False
            )
            return _without_debug_metadata(program.model_proto)
        buffer = io.BytesIO()
        with _stdout_discarded():
            torch.onnx.export(
                model,
                (example,),
                buffer,
                dynamo=False,
                opset_version=opset,
                input_names=["x"],
                output_names=["logits"],
                dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
            )
        return buffer.getvalue()


def _without_debug_metadata(proto: Any) -> bytes:
    """The file without the dynamo exporter's per-node debugging notes (source stack traces, FX
    nodes, module scopes): no runtime reads them, and they are tens of bytes per node, as much as
    the weights of a small model."""
    for node in proto.graph.node:
        del node.metadata_props[:]
    return proto.SerializeToString()


@contextlib.contextmanager
def _stdout_discarded() -> Iterator[None]:
    """Discard what is written to file descriptor 1 meanwhile, by C++ code too: the TorchScript-based
    exporter prints its whole graph there when it fails (its log switch tests a function object for
    truth, so it is always on), and the failure itself is reported in one line."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as void:
            os.dup2(void.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def to_torchscript(model: nn.Module, input_shape: Sequence[int]) -> bytes:
    """The TorchScript file of a CPU copy of ``model``, traced in eval mode (the check on the test
    split, at other batch sizes, replaces the tracer's own re-run)."""
    import torch

    model = copy.deepcopy(model).cpu().eval()
    buffer = io.BytesIO()
    with quiet(), torch.no_grad():
        torch.jit.save(torch.jit.trace(model, _example(input_shape), check_trace=False), buffer)
    return buffer.getvalue()


def one_line(error: BaseException) -> str:
    """An exporter's error in one line: the cause it wraps, without colour codes."""
    cause = error.__cause__ or error
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(cause).__name__}: {first}"[:300]


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    """``export``: the format the run's models are written in after the run, and which ones.

    ``format``: onnx, torchscript, or null (no export). ``exporter``: how ONNX is written, ``dynamo``
    (torch's default) or ``torchscript`` (the older TorchScript-based exporter, deprecated by torch);
    null with format torchscript. ``opset``: the ONNX opset asked of the exporter; null with format
    torchscript. ``models``: which of ``student`` and ``compressed`` are exported.
    """

    format: Literal["onnx", "torchscript"] | None
    exporter: Literal["dynamo", "torchscript"] | None
    opset: Opset | None
    models: list[Literal["student", "compressed"]]


def check_export(values: Mapping[str, Any] | None) -> None:
    """The ``export`` node's values (plain Python) beyond their types: the settings a format needs,
    and the ONNX packages for ``format=onnx``. Runs with the config checks, before any training."""
    if not values or values.get("format") is None:
        return
    fmt = values["format"]
    for key in ("exporter", "opset"):
        value = values.get(key)
        if fmt == "onnx" and value is None:
            allowed = "one of dynamo, torchscript" if key == "exporter" else "an ONNX opset >= 18"
            raise ConfigError(f"export.{key}=None is not allowed with export.format=onnx: {allowed}")
        if fmt == "torchscript" and value is not None:
            raise ConfigError(f"export.{key}={value!r} is not allowed with export.format=torchscript: null (ONNX only)")
    if fmt == "onnx":
        require_extra("export.format=onnx")
