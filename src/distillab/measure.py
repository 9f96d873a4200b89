"""What a deployment would see of a model: parameters, nonzero parameters, serialized bytes,
multiply-accumulates and CPU latency."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import statistics
import time
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from distillab.settings import Count, NonNegativeCount


@dataclasses.dataclass(frozen=True)
class MeasureSettings:
    """``measure``: CPU latency is the median of ``repeats`` timed forward passes after ``warmup``
    untimed ones, on ``threads`` threads (null: torch's default)."""

    threads: Count | None
    warmup: NonNegativeCount
    repeats: Count


def weights(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter tensor, including the packed weights and biases of quantized layers,
    which are not ``nn.Parameter``s (their integer values for quantized ones). A model run by
    another runtime (``compress.ort.OrtModel``) lists the weights its file stores itself."""
    stored = getattr(model, "stored_tensors", None)
    if callable(stored):
        return stored()
    tensors = [p.detach() for p in model.parameters()]
    for module in model.modules():
        if _is_quantized(module):
            weight, bias = module.weight(), module.bias() if callable(getattr(module, "bias", None)) else None
            tensors.append(weight.int_repr() if weight.is_quantized else weight.detach())
            if bias is not None:
                tensors.append(bias.detach())
    return tensors


# quantized layers (fused ones like ConvReLU2d live in the intrinsic package), and models run by
# ONNX Runtime (compress/ort.py), which like them perform the MACs of the float model they came from
QUANTIZED_MODULES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized", "distillab.compress.ort")


def _is_quantized(module: nn.Module) -> bool:
    return callable(getattr(module, "weight", None)) and type(module).__module__.startswith(QUANTIZED_MODULES)


def params(model: nn.Module) -> int:
    """Number of parameter elements (shared tensors counted once; int8 weights counted too)."""
    return sum(t.numel() for t in weights(model))


def nonzero_params(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(t)) for t in weights(model))


def size_bytes(model: nn.Module) -> int:
    """Bytes of the saved ``state_dict``: the artifact a user would ship; of the ONNX file for a
    model run by ONNX Runtime."""
    onnx_bytes = getattr(model, "onnx_bytes", None)
    if isinstance(onnx_bytes, bytes):
        return len(onnx_bytes)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def _example(model: nn.Module, input_shape: Sequence[int], batch_size: int) -> torch.Tensor:
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    return torch.randn(batch_size, *input_shape, device=device)


def macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on one sample (FLOPs / 2, matmuls and convs)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(_example(model, input_shape, 1))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // 2


def latency_ms(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int = 1,
    warmup: int = 5,
    repeats: int = 30,
    threads: int | None = 1,
) -> float:
    """Median wall time of one forward pass on the CPU, after warm-up, at a fixed thread count."""
    model = copy.deepcopy(model).cpu().eval()
    x = torch.randn(batch_size, *input_shape)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return 1000.0 * statistics.median(times)


# the architecture-only measurements shared within ``shared_profiles()``, by architecture
_SHARED: dict[tuple, dict] | None = None


@contextlib.contextmanager
def shared_profiles() -> Iterator[None]:
    """Measure what depends only on a model's architecture (parameters, bytes, MACs, latency) once
    per architecture while the block runs: the stacked launcher's members share one architecture.
    What depends on the weights (``nonzero_params``) is measured for every model."""
    global _SHARED
    saved, _SHARED = _SHARED, {}
    try:
        yield
    finally:
        _SHARED = saved


def architecture(model: nn.Module) -> tuple | None:
    """A key that two models share when they run the same layers on tensors of the same shapes and
    dtypes; None for a model that holds no tensors (its graph lives elsewhere, e.g. ONNX Runtime)."""
    state = model.state_dict()
    if not state:
        return None
    shapes = tuple(
        (name, tuple(getattr(v, "shape", ())), str(getattr(v, "dtype", type(v)))) for name, v in state.items()
    )
    return (type(model).__qualname__, repr(model), shapes)


def profile(
    model: nn.Module, input_shape: Sequence[int], threads: int | None = 1, warmup: int = 5, repeats: int = 30
) -> dict:
    """The measurement block of results.json for one model."""
    timing = {"threads": threads, "warmup": warmup, "repeats": repeats}
    arch = architecture(model) if _SHARED is not None else None
    key = (arch, tuple(input_shape), threads, warmup, repeats) if arch is not None else None
    shared = _SHARED.get(key) if key is not None else None
    if shared is None:
        shared = {
            "params": params(model),
            "size_bytes": size_bytes(model),
            "macs": macs(model, input_shape),
            "latency_ms": {
                "batch_1": round(latency_ms(model, input_shape, 1, **timing), 4),
                "batch_64": round(latency_ms(model, input_shape, 64, **timing), 4),
            },
        }
        if key is not None:
            _SHARED[key] = shared
    return {
        "params": shared["params"],
        "nonzero_params": nonzero_params(model),
        "size_bytes": shared["size_bytes"],
        "macs": shared["macs"],
        "latency_ms": dict(shared["latency_ms"]),
    }
