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

import copy
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distillab.formats import ExportSettings, one_line, quiet, to_onnx, to_torchscript
from distillab.io import atomic_write_bytes

if TYPE_CHECKING:
    from torch import nn

__all__ = ["export_model", "load", "run"]

SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}


# -- before any work ---------------------------------------------------------------------------------


# -- writing one model ---------------------------------------------------------------------------------


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
    for results.json, ``{}`` for ``export=none``. ``compressed`` is a ``steps.compression.CompressedRun``
    or None, ``data`` the datamodule (its test split), ``how`` the measure settings, ``out`` the run
    folder."""
    from distillab.conf import resolved
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
