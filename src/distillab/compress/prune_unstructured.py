"""Unstructured pruning: zero the smallest-magnitude weights of every Conv/Linear layer with
``torch.nn.utils.prune``.

Shapes stay the same, so a dense kernel runs exactly as fast as before; the gain is the size of
the sparse artifact ``Compressed.save`` writes (a bitmask and the nonzero values of each pruned
weight; :func:`load_unstructured` reads it back). The weights are pruned by one ``amount``, in
one shot, along a gradual schedule or in ``cycles`` of prune → fine-tune
(``budget.prune_in_cycles``: ``tables["cycles"]``), or to an accuracy budget ``max_acc_drop``,
where a sensitivity scan and a greedy search choose the amount of each layer
(``budget.prune_within_budget``: ``details["budget"]``, ``tables["sensitivity"]``). The input
model is never modified.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from distillab import measure
from distillab.compress import Compressed, Context
from distillab.compress.budget import (
    LayerPruning,
    SparseObjective,
    check_budget_exclusions,
    check_cycles,
    check_scan_amounts,
    prunable_layers,
    prune_in_cycles,
    prune_within_budget,
    serialized_bytes,
)
from distillab.settings import AccuracyDrop, ConfigError, Count, Fraction, checked

UNSTRUCTURED_FORMAT = "distillab.prune_unstructured/1"
SPARSE_ENCODING = (
    "per pruned weight tensor: a bitmask of its nonzero positions (1 bit per element, packed into uint8, "
    "row-major) plus the nonzero values in their own dtype (fp32), when that is smaller than the dense "
    "tensor; every other tensor of the state_dict dense"
)
DENSE_LATENCY_NOTE = (
    "shapes are unchanged and dense kernels multiply the zeros too, so latency and MACs are those of "
    "the dense model; the gain is the size of the sparse artifact"
)


@checked
def unstructured(
    model: nn.Module,
    context: Context,
    *,
    amount: Fraction | None,
    max_acc_drop: AccuracyDrop | None,
    cycles: Count,
    scope: Literal["global", "layer"],
    schedule: Literal["oneshot", "gradual"],
    objective: SparseObjective,
    scan_amounts: list[Fraction],
    finetune_attempts: Count,
) -> Compressed:
    """Zero the fraction ``amount`` of the Conv/Linear weights with the smallest magnitude.

    ``scope=global`` ranks all those weights together (layers that matter less lose more);
    ``layer`` removes ``amount`` of each layer. Biases and BatchNorm are left alone: they are
    few and pruning them saves nothing. ``oneshot`` prunes once, then fine-tunes with the
    masks held; ``gradual`` raises the sparsity at the start of each fine-tuning epoch along
    :func:`cubic_sparsity`, so the model adapts while weights disappear. ``cycles`` > 1 prunes
    and fine-tunes that many times up to ``amount`` (``budget.cycle_amounts``), the masks held.
    The masks are made permanent at the end: the result is a plain module whose weights contain zeros.

    ``max_acc_drop`` (with ``amount`` null) chooses the amount of each layer instead: the largest
    removal of ``objective`` (``params``: nonzero Conv/Linear weights; ``macs``: the MACs whose
    weight is nonzero, what a sparse kernel would compute) that keeps the validation accuracy
    within the budget, by a scan over ``scan_amounts``, a greedy search and fine-tunings along the
    search's path (``finetune_attempts``; see ``budget``). ``scope`` does not apply then.
    """
    _check_unstructured_options(model, context, amount, max_acc_drop, cycles, schedule, scan_amounts)
    if max_acc_drop is not None:
        found = prune_within_budget(
            model,
            weight_zeroing(model, context.input_shape, check_scan_amounts(scan_amounts)),
            context,
            max_acc_drop=float(max_acc_drop),
            objective=objective,
            finetune_attempts=int(finetune_attempts),
        )
        pruned, tables = found.model, {"sensitivity": found.sensitivity}
        extra = {
            "amount": None,
            "scope": None,
            "sparsity_per_epoch": None,
            "cycle_amounts": None,
            "budget": found.details,
        }
    else:
        pruned = copy.deepcopy(model)
        targets = [(module, "weight") for _, module in prunable_layers(pruned)]
        sparsities, tables = _prune_and_finetune(pruned, targets, context, float(amount), scope, schedule, int(cycles))
        extra = {
            "amount": float(amount),
            "scope": scope,
            "sparsity_per_epoch": [round(s, 6) for s in sparsities] if schedule == "gradual" else None,
            "cycle_amounts": [round(s, 6) for s in sparsities] if cycles > 1 else None,
            "budget": None,
        }
    _make_permanent([(module, "weight") for _, module in prunable_layers(pruned)])

    names = [f"{name}.weight" for name, _ in prunable_layers(pruned)]
    return Compressed(
        model=pruned,
        method="prune_unstructured",
        backend="torch.nn.utils.prune",
        save=lambda path: torch.save(_sparse_artifact(pruned, names), path),
        details={"schedule": schedule, "cycles": int(cycles), **extra, **_sparsity_facts(pruned, names)},
        tables=tables,
    )


def _check_unstructured_options(
    model: nn.Module,
    context: Context,
    amount: float | None,
    max_acc_drop: float | None,
    cycles: int,
    schedule: str,
    scan_amounts: list[float],
) -> None:
    """The checks across settings (each setting's own range is its annotation's)."""
    if not prunable_layers(model):
        raise ConfigError(
            f"model={type(model).__name__} is not allowed: prune_unstructured needs a Conv or Linear layer"
        )
    if amount is None and max_acc_drop is None:
        raise ConfigError(
            "amount=None is not allowed: a fraction in (0, 1) of the weights to zero, unless max_acc_drop is set"
        )
    check_budget_exclusions(max_acc_drop, cycles, amount=amount)
    check_scan_amounts(scan_amounts)
    if schedule == "gradual" and max_acc_drop is not None:
        raise ConfigError(
            f"schedule='gradual' is not allowed with max_acc_drop={max_acc_drop}: the budget search prunes at once "
            "and checks the accuracy before and after fine-tuning; use schedule=oneshot"
        )
    if schedule == "gradual" and cycles > 1:
        raise ConfigError(
            f"cycles={cycles} is not allowed with schedule='gradual': the gradual schedule already spreads the "
            "pruning over the fine-tuning epochs; use cycles=1 or schedule=oneshot"
        )
    if schedule == "gradual" and (context.finetune is None or context.finetune_epochs < 1):
        raise ConfigError("schedule='gradual' is not allowed: it needs finetune_epochs >= 1 to spread the pruning over")
    check_cycles(cycles, context)


def _prune_and_finetune(
    model: nn.Module,
    targets: list[tuple[nn.Module, str]],
    context: Context,
    amount: float,
    scope: str,
    schedule: str,
    cycles: int,
) -> tuple[list[float], dict[str, list[dict[str, Any]]]]:
    """Prune ``targets`` to ``amount`` along ``schedule`` or in ``cycles``, fine-tuning with the
    masks held; the sparsity of each fine-tuning epoch (gradual) or cycle (just ``amount`` for a
    one-shot pruning), and the tables (``cycles``)."""
    if cycles > 1:
        rows = prune_in_cycles(
            model,
            context,
            amount,
            cycles,
            lambda _, sparsity: _prune_to(targets, sparsity, scope),
            _sparse_footprint,
        )
        return [row["amount"] for row in rows[1:]], {"cycles": rows}
    if schedule == "oneshot":
        _prune_to(targets, amount, scope)
        if context.finetune is not None:
            context.finetune(model, context.finetune_epochs)
        return [amount], {}
    epochs = context.finetune_epochs
    sparsities = [cubic_sparsity(amount, epoch, epochs) for epoch in range(epochs)]

    def on_epoch_start(epoch: int) -> None:
        _prune_to(targets, sparsities[min(epoch, epochs - 1)], scope)

    context.finetune(model, epochs, on_epoch_start=on_epoch_start)
    # normally a no-op (the last epoch started at ``amount`` and the zeros rank lowest); it
    # guarantees the target if the fine-tuning stopped early
    _prune_to(targets, amount, scope)
    return sparsities, {}


def cubic_sparsity(amount: float, epoch: int, epochs: int) -> float:
    """Sparsity at the start of ``epoch`` (0-based) of ``epochs``: the cubic schedule of Zhu &
    Gupta (2017), ``s = amount * (1 - (1 - (epoch + 1) / epochs) ** 3)``.

    It prunes fast while many redundant weights remain and slowly near the target, which it
    reaches at the start of the last epoch, so that epoch recovers at the final sparsity.
    """
    progress = min(epoch + 1, epochs) / epochs
    return float(amount) * (1.0 - (1.0 - progress) ** 3)


def _prune_to(targets: list[tuple[nn.Module, str]], sparsity: float, scope: str) -> None:
    """Set the sparsity of ``targets`` to ``sparsity`` (not ``sparsity`` of what is left):
    earlier masks are folded into the weights first, and their zeros rank lowest, so they stay."""
    _make_permanent(targets)
    if scope == "global":
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
    else:
        for module, name in targets:
            prune.l1_unstructured(module, name, amount=sparsity)


def _make_permanent(targets: list[tuple[nn.Module, str]]) -> None:
    for module, name in targets:
        if hasattr(module, f"{name}_mask"):
            prune.remove(module, name)


def _sparsity_facts(model: nn.Module, names: list[str]) -> dict[str, Any]:
    """What the zeros of ``model`` (a plain module) amount to, for ``details``."""
    state = model.state_dict()
    total = sum(state[name].numel() for name in names)
    nonzero = sum(int(torch.count_nonzero(state[name])) for name in names)
    return {
        "prunable_weights": total,
        "zeroed_weights": total - nonzero,
        "nonzero_fraction": nonzero / total,
        "dense_size_bytes": measure.size_bytes(model),
        "sparse_size_bytes": serialized_bytes(_sparse_artifact(model, names)),
        "sparse_encoding": SPARSE_ENCODING,
        "latency_note": DENSE_LATENCY_NOTE,
    }


def _sparse_footprint(model: nn.Module) -> dict[str, int]:
    """Parameters, nonzero parameters and sparse-artifact bytes of ``model`` with its masks applied
    (measured on a copy whose masks are made permanent): a row of ``tables["cycles"]``."""
    plain = copy.deepcopy(model)
    _make_permanent([(module, "weight") for _, module in prunable_layers(plain)])
    names = [f"{name}.weight" for name, _ in prunable_layers(plain)]
    return {
        "params": measure.params(plain),
        "nonzero_params": measure.nonzero_params(plain),
        "size_bytes": serialized_bytes(_sparse_artifact(plain, names)),
    }


def weight_zeroing(model: nn.Module, input_shape: tuple[int, ...], scan_amounts: list[float]) -> LayerPruning:
    """Unstructured pruning as the budget search sees it: each Conv/Linear weight of ``model``
    zeroed by its own amount (of that layer's weights, smallest magnitudes first), with the masks
    held so that fine-tuning keeps the zeros. Its cost counts nonzero weights (``params``) and the
    MACs that multiply a nonzero weight (``macs``)."""
    uses = _weight_uses(model, input_shape)

    def prune_layers(source: nn.Module, amounts: dict[str, float]) -> nn.Module:
        pruned = copy.deepcopy(source)
        for name, amount in amounts.items():
            prune.l1_unstructured(pruned.get_submodule(name), "weight", amount=amount)
        return pruned

    def cost(candidate: nn.Module) -> dict[str, float]:
        nonzero = {name: int(torch.count_nonzero(_masked_weight(m))) for name, m in prunable_layers(candidate)}
        return {"params": sum(nonzero.values()), "macs": sum(n * uses[name] for name, n in nonzero.items())}

    return LayerPruning({name: list(scan_amounts) for name in uses}, prune_layers, cost)


def _masked_weight(module: nn.Module) -> Tensor:
    """The weight a forward pass uses: the original times the mask while a mask is held."""
    if hasattr(module, "weight_mask"):
        return module.weight_orig.detach() * module.weight_mask
    return module.weight.detach()


def _weight_uses(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """How many multiply-accumulates each weight element of each Conv/Linear layer takes part in,
    per sample: the output positions of its layer (H_out·W_out of a 2-D conv, 1 of a Linear on
    one vector per sample), or the input positions of a transposed convolution, which multiplies
    every weight of a channel once per position of its input."""
    uses: dict[str, int] = {}

    def hook(name: str) -> Callable:
        def record(module: nn.Module, inputs: Any, output: Tensor) -> None:
            if isinstance(module, nn.modules.conv._ConvTransposeNd):
                uses[name] = inputs[0].numel() // (inputs[0].shape[0] * module.in_channels)
            else:
                uses[name] = output.numel() // (output.shape[0] * module.weight.shape[0])

        return record

    layers = prunable_layers(model)
    handles = [module.register_forward_hook(hook(name)) for name, module in layers]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return {name: uses[name] for name, _ in layers if name in uses}


def _sparse_artifact(model: nn.Module, sparse_names: list[str]) -> dict[str, Any]:
    """The state_dict with the pruned weights bitmask-encoded (see ``SPARSE_ENCODING``); only
    tensors and plain containers, so ``torch.load(weights_only=True)`` reads it."""
    dense, sparse = {}, {}
    for name, tensor in model.state_dict().items():
        encoded = _encode(tensor) if name in sparse_names else None
        if encoded is not None and _encoded_bytes(encoded) < tensor.numel() * tensor.element_size():
            sparse[name] = encoded
        else:
            dense[name] = tensor.detach().clone()
    return {"format": UNSTRUCTURED_FORMAT, "dense": dense, "sparse": sparse}


def _encode(tensor: Tensor) -> dict[str, Any]:
    flat = tensor.detach().reshape(-1)
    keep = flat != 0
    padded = torch.zeros(math.ceil(flat.numel() / 8) * 8, dtype=torch.uint8)
    padded[: flat.numel()] = keep.to(torch.uint8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    bits = (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)
    return {"shape": list(tensor.shape), "bits": bits, "values": flat[keep].clone()}


def _encoded_bytes(encoded: dict[str, Any]) -> int:
    return encoded["bits"].numel() + encoded["values"].numel() * encoded["values"].element_size()


def _decode(encoded: dict[str, Any]) -> Tensor:
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    numel = math.prod(encoded["shape"])
    keep = ((encoded["bits"].unsqueeze(1) >> shifts) & 1).reshape(-1)[:numel].bool()
    flat = torch.zeros(numel, dtype=encoded["values"].dtype)
    flat[keep] = encoded["values"]
    return flat.reshape(encoded["shape"])


def load_unstructured(path: str | Path, model: nn.Module) -> nn.Module:
    """Read an artifact of :func:`unstructured` into ``model`` (the same architecture) and
    return it; the dense weights are restored bit for bit."""
    artifact = torch.load(path, map_location="cpu", weights_only=True)
    if artifact.get("format") != UNSTRUCTURED_FORMAT:
        raise ValueError(f"{path}: not a prune_unstructured artifact (format {artifact.get('format')!r})")
    state = dict(artifact["dense"])
    state.update({name: _decode(encoded) for name, encoded in artifact["sparse"].items()})
    model.load_state_dict(state)
    return model
