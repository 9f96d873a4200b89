"""Export of the trained models to ONNX or TorchScript, checked against PyTorch and timed.

``export=onnx`` (or ``export=torchscript``) writes the student and the compressed model of a run
to ``export/student.onnx`` and ``export/compressed.onnx`` (``.pt`` for TorchScript) next to
results.json, each with a dynamic batch dimension. Each file is read back and run on the test
split beside the PyTorch model it came from (largest absolute logit difference, share of equal
predictions), and timed on the CPU with the protocol of ``measure.latency_ms``: ONNX files by
ONNX Runtime (``compress.ort.OrtModel``: an ``InferenceSession`` on the CPU execution provider
with as many intra-op threads as torch is set to, which ``measure.latency_ms`` sets to
``measure.threads``), TorchScript files by ``torch.jit.load``. What it found is the ``export``
entry of results.json (docs/deployment.md); ``export=none`` leaves the entry out.

Exporters
    ``exporter=dynamo`` is torch's default ONNX exporter (``torch.onnx.export(dynamo=True)``:
    ``torch.export`` then onnxscript). It cannot trace torch.ao int8 modules (their packed
    weights are TorchScript objects), so a ``quant_static`` / ``quant_dynamic`` / ``qat`` model
    is skipped with the reason. ``exporter=torchscript`` is the older TorchScript-based exporter
    (``dynamo=False``), deprecated by torch but still shipped: it writes a torch.ao static int8
    model as a QuantizeLinear / DequantizeLinear graph, and has no ONNX operator for dynamic
    int8 Linear layers. A model that ``compress=ort_int8_*`` quantized is already an ONNX file:
    it is written as it is. TorchScript files are written by ``torch.jit.trace``.

The ONNX packages are an optional extra (``pip install -e ".[export]"``). This module imports
torch and them only where it exports, so that ``check`` runs with the config checks, before
torch is imported and before any training.
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
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from distillab.io import atomic_write_bytes
from distillab.settings import ConfigError, Range

if TYPE_CHECKING:
    from torch import Tensor, nn

__all__ = [
    "EXTRA",
    "ExportSettings",
    "Opset",
    "check",
    "export_model",
    "load",
    "missing_extra",
    "one_line",
    "quiet",
    "require_extra",
    "run",
    "to_onnx",
    "to_torchscript",
]

#: the packages of the ``export`` extra of pyproject.toml
EXTRA = ("onnx", "onnxruntime", "onnxscript")
INSTALL = 'pip install -e ".[export]"'
#: an ONNX opset torch's exporters can write (the dynamo exporter writes 18 or newer)
Opset = Annotated[int, Range(18, what="an ONNX opset")]
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}


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


# -- before any work ---------------------------------------------------------------------------------
def missing_extra() -> list[str]:
    """The packages of the ``export`` extra that cannot be imported (found without importing them)."""
    return [name for name in EXTRA if importlib.util.find_spec(name) is None]


def require_extra(what: str) -> None:
    """A one-line ``ConfigError`` naming ``what`` needs the extra, when a package of it is missing."""
    missing = missing_extra()
    if missing:
        raise ConfigError(f"{what} needs the export extra ({', '.join(missing)} missing): {INSTALL}")


def check(values: Mapping[str, Any] | None) -> None:
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


# -- writing one model ---------------------------------------------------------------------------------
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


def _exporter_name(settings: ExportSettings) -> str:
    """The exporter as results.json names it, with the version of what did the work."""
    if settings.format == "torchscript":
        return "torch.jit.trace"
    if settings.exporter == "torchscript":
        return "torch.onnx.export(dynamo=False): the TorchScript-based exporter"
    from importlib.metadata import version

    return f"torch.onnx.export(dynamo=True): torch.export + onnxscript {version('onnxscript')}"


def load(path: Path, fmt: str) -> nn.Module:
    """An exported file read back as a module: ONNX by ONNX Runtime, TorchScript by torch.jit."""
    if fmt == "onnx":
        from distillab.compress.ort import OrtModel

        return OrtModel(path.read_bytes())
    import torch

    with quiet():
        return torch.jit.load(str(path), map_location="cpu")


def one_line(error: BaseException) -> str:
    """An exporter's error in one line: the cause it wraps, without colour codes."""
    cause = error.__cause__ or error
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(cause).__name__}: {first}"[:300]


# -- checking and timing -------------------------------------------------------------------------------
def _compare(model: nn.Module, exported: nn.Module, batches: Any) -> dict[str, Any]:
    """Largest absolute logit difference and share of equal predictions over ``batches``."""
    import torch

    from distillab.evaluate import logits_and_targets

    with quiet():
        ours, _ = logits_and_targets(model, batches, "cpu")
        theirs, _ = logits_and_targets(exported, batches, "cpu")
    return {
        "agreement": round(float((ours.argmax(1) == theirs.argmax(1)).double().mean()), 6),
        "max_abs_diff": float(torch.max(torch.abs(ours - theirs))),
        "samples": len(ours),
    }


def _latency(model: nn.Module, input_shape: Sequence[int], how: Mapping[str, Any]) -> dict[str, float]:
    """``measure.latency_ms`` at batch 1 and 64 (``how``: the run's measure settings)."""
    from distillab import measure

    with quiet():
        return {f"batch_{size}": round(measure.latency_ms(model, input_shape, size, **how), 4) for size in (1, 64)}


def _zero_weight_share(model: nn.Module) -> float:
    """The share of the model's weights that are exactly zero (pruned away, or rounded to 0 in int8)."""
    from distillab import measure

    total = measure.params(model)
    return round(1 - measure.nonzero_params(model) / total, 6) if total else 0.0


# -- one model, and the run's entry --------------------------------------------------------------------
def _skip_reason(model: nn.Module | None, role: str, settings: ExportSettings) -> str | None:
    if model is None and role == "student":
        return "no student was trained (compress.target=teacher)"
    if model is None:
        return "no compressed model (compress=none)"
    if settings.format == "torchscript" and hasattr(model, "onnx_bytes"):
        return "an ONNX Runtime model has no TorchScript form; export=onnx writes its ONNX file"
    return None


def export_model(
    model: nn.Module | None,
    role: str,
    settings: ExportSettings,
    test_batches: Any,
    input_shape: Sequence[int],
    how: Mapping[str, Any],
    folder: Path,
) -> dict[str, Any]:
    """Write ``model`` to ``folder/<role>.onnx|.pt`` atomically, read it back, compare it with
    ``model`` on ``test_batches()`` and time both; ``{"skipped": why}`` when the format cannot
    hold it, ``error`` beside the file when the written file does not run."""
    reason = _skip_reason(model, role, settings)
    if reason is not None:
        return {"skipped": reason}
    model = copy.deepcopy(model).cpu().eval()  # compared and timed on the CPU, where the files run
    entry: dict[str, Any] = {}
    if hasattr(model, "onnx_bytes"):  # quantized by ONNX Runtime: the model is its ONNX file
        payload, entry["exporter"] = model.onnx_bytes, "none: the ONNX file compress=ort_int8_* wrote, as it is"
    else:
        try:
            if settings.format == "onnx":
                payload = to_onnx(model, input_shape, opset=settings.opset, exporter=settings.exporter)
            else:
                payload = to_torchscript(model, input_shape)
        except Exception as error:  # noqa: BLE001 - what the format cannot hold is reported, the run goes on
            return {"skipped": f"{_exporter_name(settings)} cannot export it: {one_line(error)}"}
    path = atomic_write_bytes(folder / f"{role}{SUFFIX[settings.format]}", payload)
    entry.update(file=f"{folder.name}/{path.name}", bytes=path.stat().st_size)
    if settings.format == "onnx":
        entry["opset"] = _opset(payload)
    try:
        exported = load(path, settings.format)
        entry.update(_compare(model, exported, test_batches()))
        entry["latency_ms"] = _latency(exported, input_shape, how)
        entry["eager_latency_ms"] = _latency(model, input_shape, how)
    except Exception as error:  # noqa: BLE001 - a file that does not run is recorded, the run goes on
        entry["error"] = one_line(error)
    entry["zero_weight_share"] = _zero_weight_share(model)
    return entry


def _opset(payload: bytes) -> int:
    import onnx

    return next(o.version for o in onnx.load_from_string(payload).opset_import if o.domain in ("", "ai.onnx"))


def run(
    node: Any,
    student: nn.Module | None,
    compressed: Any,
    data: Any,
    input_shape: Sequence[int],
    how: Mapping[str, Any],
    out: Path,
) -> dict[str, Any]:
    """Export the run's models as ``node`` (the ``export`` config node) says: ``{"export": block}``
    for results.json, ``{}`` for ``export=none``. ``compressed`` is a ``compress.stage.CompressedRun``
    or None, ``data`` the datamodule (its test split), ``how`` the measure settings, ``out`` the run
    folder."""
    from distillab.config import resolved
    from distillab.settings import build

    settings = build(ExportSettings, resolved(node)) if node is not None else None
    if settings is None or settings.format is None:
        return {}
    start = time.perf_counter()
    data.setup("test")
    models = {"student": student, "compressed": compressed.result.model if compressed is not None else None}
    block: dict[str, Any] = {
        "format": settings.format,
        "opset": settings.opset,
        "exporter": _exporter_name(settings),
        "runtime": _runtime(settings.format),
        "dynamic_batch": True,
    }
    for role in settings.models:
        block[role] = export_model(
            models[role], role, settings, data.test_dataloader, input_shape, how, Path(out) / "export"
        )
    block["seconds"] = round(time.perf_counter() - start, 3)
    return {"export": block}


def _runtime(fmt: str) -> str:
    from importlib.metadata import version

    if fmt == "onnx":
        return f"onnxruntime {version('onnxruntime')}, CPUExecutionProvider"
    return f"torch.jit.load, torch {version('torch')}"
