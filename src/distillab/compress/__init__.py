"""Compression after distillation: step 6 of a run.

A method is a function ``method(model, context, **settings) -> Compressed`` that returns a
new model (the input is left untouched), configured in ``conf/compress/<name>.yaml`` by
``_target_`` with ``_partial_: true``; it is named after that option. The function declares its
settings on its typed signature (``distillab.settings``); the YAML holds their values. The keys
``PIPELINE_KEYS`` of that config belong to the pipeline (``CompressSettings``); everything else
is the method's settings. Methods are chained by listing ``steps``; each step gets the previous
step's model. ``compress=none`` is a node with neither ``_target_`` nor ``steps`` (``is_none``).

Three pipeline keys are also given to every method whose function declares them (``SHARED``), so
that one command line or sweep sets them for any method or chain: ``amount`` (ignored by methods
without one), ``max_acc_drop`` and ``cycles`` (refused, in one line, by methods without them).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from distillab import conf, measure
from distillab.conf import COMPRESS_KEYS as PIPELINE_KEYS
from distillab.conf import OPTIONAL_COMPRESS_KEYS
from distillab.settings import AccuracyDrop, ConfigError, Count, Fraction, NonNegativeCount


@dataclass
class Context:
    """What a compression method may use besides the model.

    ``train_batches()`` is a fresh pass over the training split as ``(x, y, index)`` CPU
    tensors (for calibration). ``finetune(model, epochs, on_epoch_start=None)`` trains
    ``model`` in place for ``epochs`` with the run's distillation loss and the uncompressed
    model as teacher; ``on_epoch_start(epoch)`` is called before each epoch (a gradual
    pruning schedule raises the sparsity there). It is None when ``finetune_epochs`` is 0.

    ``val_batches()`` is a fresh pass over the validation split (``(x, y, ...)`` CPU tensors):
    what an accuracy budget is checked on (``val_accuracy``). ``reference_val_acc`` is the
    validation accuracy of the uncompressed model, the reference of ``max_acc_drop``. ``measure``
    holds the run's latency protocol (threads, warmup, repeats) for a latency objective.
    ``dry_run`` is true when the method is only tried on an untrained copy and one batch before
    training: a search may then stop after its first step.
    """

    input_shape: tuple[int, ...]
    train_batches: Callable[[], Iterable[tuple[Tensor, Tensor, Tensor]]]
    finetune_epochs: int = 0
    finetune: Callable[..., None] | None = None
    val_batches: Callable[[], Iterable[tuple[Tensor, ...]]] | None = None
    reference_val_acc: float | None = None
    measure: dict[str, Any] = field(default_factory=dict)
    dry_run: bool = False


@dataclass
class Compressed:
    """A compressed model and what is true of it.

    ``model`` runs on the CPU (quantized kernels are CPU ones). ``backend`` names the library
    and API that did the work. ``details`` holds method facts for results.json (amount,
    sparsity, layer shapes, ...). ``save(path)`` writes the real deployable artifact, whose
    size in bytes is what results.json reports; ``load(path)`` (a static function of the
    method's module) reads it back. ``tables`` are row lists the run saves beside the artifact
    as ``compressed/<name>.csv`` (a sensitivity scan, the cycles of iterative pruning).
    ``suffix`` is the artifact's file extension: ``compressed/model<suffix>``.
    """

    model: nn.Module
    method: str
    backend: str
    save: Callable[[Any], None]
    details: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    suffix: str = ".pt"


# pipeline keys also given to each method whose function declares them
SHARED = ("amount", "max_acc_drop", "cycles")


@dataclass(frozen=True)
class CompressSettings:
    """The pipeline's keys of a ``compress`` node (``steps`` of a chain are checked step by step).

    ``target``: the model compressed (``teacher`` is a baseline without a student).
    ``finetune_epochs``: epochs of fine-tuning with the distillation loss after (or during) compression.
    ``amount``: a fraction in (0, 1) of the weights to remove, given to the methods that take one
    (pruning), so that one sweep can set it for every method; null for the others.
    ``max_acc_drop``: the largest drop of validation accuracy, against the uncompressed model,
    that a method may cause (it then searches how much to compress); null: no budget.
    ``cycles``: prune → fine-tune this many times up to the final amount (1: one shot).
    """

    target: Literal["student", "teacher"]
    finetune_epochs: NonNegativeCount
    amount: Fraction | None
    max_acc_drop: AccuracyDrop | None
    cycles: Count


def is_none(node: Any) -> bool:
    """True for ``compress=none``: a node with neither ``_target_`` nor ``steps``."""
    return conf.no_compression(node)


def methods(cfg: DictConfig) -> list[functools.partial]:
    """The method functions of ``cfg`` (the ``compress`` node) in order, with their options:
    the node itself, or its ``steps`` for a chain.

    A ``SHARED`` key goes to a method only when its function takes it, so one sweep can set
    ``compress.amount`` for every method; a step's own value wins over the chain's. A method
    that takes the key always gets it, null included (its declaration says whether null is
    allowed). ``amount`` is ignored by the methods without one. A ``max_acc_drop`` or ``cycles``
    is refused with one line when no method of the node can honour it, and so is a step's own
    value that its method cannot: a chain's value goes to the steps that take it.
    """
    steps = list(cfg.steps) if cfg.get("steps") else [cfg]
    found, honoured = [], set()
    for step in steps:
        method = instantiate(OmegaConf.create({k: v for k, v in step.items() if k not in PIPELINE_KEYS}))
        taken = inspect.signature(method.func).parameters
        own = {key: step.get(key) if cfg.get("steps") else None for key in SHARED}
        for key in SHARED:
            if key in taken:
                honoured.add(key)
                value = own[key] if own[key] is not None else cfg.get(key, OPTIONAL_COMPRESS_KEYS.get(key))
                method = functools.partial(method, **{key: value})
            elif key != "amount" and own[key] not in (None, 1):
                _refuse(key, own[key], step)
        found.append(method)
    for key in OPTIONAL_COMPRESS_KEYS:
        if key not in honoured and cfg.get(key) not in (None, 1):
            _refuse(key, cfg.get(key), steps[-1])
    return found


def _refuse(key: str, value: Any, step: DictConfig) -> None:
    takers = ", ".join(takes(key)) or "none"
    name = str(step.get("_target_")).rsplit(".", 1)[-1]
    raise ConfigError(f"{key}={value} is not allowed with {name}: only these methods take it: {takers}")


def takes(key: str) -> list[str]:
    """The built-in ``conf/compress`` options whose method function declares ``key``."""
    from distillab import conf

    names = []
    for option in conf.options("compress"):
        node = conf.load("compress", option)
        targets = [step.get("_target_") for step in node.steps] if node.get("steps") else [node.get("_target_")]
        if targets[0] and any(key in inspect.signature(_function(t)).parameters for t in targets):
            names.append(option)
    return names


def _function(target: str) -> Callable:
    module, _, name = target.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


def val_accuracy(model: nn.Module, context: Context) -> float:
    """Validation accuracy of ``model`` (on the CPU, in eval mode; its mode is restored)."""
    if context.val_batches is None:
        raise ValueError("val_accuracy needs context.val_batches")
    from distillab.evaluate import predict

    preds, targets = predict(model, context.val_batches(), "cpu")
    return float((preds == targets).double().mean())


def apply(node: DictConfig, model: nn.Module, context: Context, name: str) -> tuple[Compressed, nn.Module]:
    """Run the method(s) of ``node`` (the ``compress`` node, whose option is ``name``) on ``model``.

    A chain's result is named ``name`` and holds the tables of all its steps. Returns the final
    result and the last floating-point model of the chain (the input of a quantization step),
    whose MACs the quantized model performs in int8.
    """
    float_model, result, tables = model, None, {}
    for method in methods(node):
        result = method(result.model if result is not None else model, context)
        tables.update(result.tables)  # a chain keeps every step's tables
        if not _is_quantized(result.model):
            float_model = result.model
    if result is None:
        raise ValueError("compress: no method to apply")
    result.tables = tables
    if node.get("steps"):
        result.method = str(name)
    return result, float_model


def _is_quantized(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith(measure.QUANTIZED_MODULES) for m in model.modules())
