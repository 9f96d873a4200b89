"""Pruning: zero weights (unstructured) or remove whole channels (structured).

``unstructured`` zeroes the smallest-magnitude weights of every Conv/Linear layer with
``torch.nn.utils.prune``. Shapes stay the same, so a dense kernel runs exactly as fast as
before; the gain is the size of a sparse artifact (``save``). ``structured`` removes output
channels with torch-pruning, following the dependencies between layers (residual sums, BN,
the next layer's inputs), so the result is a smaller dense model that is really faster.

Both prune by one ``amount``, in one shot or in ``cycles`` of prune → fine-tune
(``budget.prune_in_cycles``: ``tables["cycles"]``), or to an accuracy budget ``max_acc_drop``,
where a sensitivity scan and a greedy search choose the amount of each layer
(``budget.prune_within_budget``: ``details["budget"]``, ``tables["sensitivity"]``). Both
return a new model; the input model is never modified.
"""

from __future__ import annotations

import copy
import io
import math
import typing
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
    Objective,
    SparseObjective,
    check_budget_exclusions,
    check_cycles,
    check_scan_amounts,
    latency_cost,
    prune_in_cycles,
    prune_within_budget,
)
from distillab.labels import labelled_cross_entropy
from distillab.settings import AccuracyDrop, ConfigError, Count, Fraction, checked

PRUNABLE = (nn.modules.conv._ConvNd, nn.Linear)
UNSTRUCTURED_FORMAT = "distillab.prune_unstructured/1"
STRUCTURED_FORMAT = "distillab.prune_structured/1"
SPARSE_ENCODING = (
    "per pruned weight tensor: a bitmask of its nonzero positions (1 bit per element, packed into uint8, "
    "row-major) plus the nonzero values in their own dtype (fp32), when that is smaller than the dense "
    "tensor; every other tensor of the state_dict dense"
)
DENSE_LATENCY_NOTE = (
    "shapes are unchanged and dense kernels multiply the zeros too, so latency and MACs are those of "
    "the dense model; the gain is the size of the sparse artifact"
)
#: channel ranking of ``structured``: weight norms, BatchNorm gammas, |weight * gradient|
Importance = Literal["l1", "l2", "bn_scale", "taylor"]
IMPORTANCES = typing.get_args(Importance)
# the steps of a budget search: the channel ratio rises by 1/TARGET_STEPS of its maximum each step
TARGET_STEPS = 50
# training batches whose cross-entropy gradients feed the Taylor importance
TAYLOR_BATCHES = 4
# layers listed in details["out_channels"]
SHOWN_LAYERS = 8
# the int or tuple attributes that fix a module's shapes, saved so that a pruned model can be rebuilt
SHAPE_ATTRIBUTES = (
    "in_channels",
    "out_channels",
    "groups",
    "in_features",
    "out_features",
    "num_features",
    "normalized_shape",
)


def _prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, PRUNABLE)]


# -- unstructured -----------------------------------------------------------------------------
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
        targets = [(module, "weight") for _, module in _prunable_layers(pruned)]
        sparsities, tables = _prune_and_finetune(pruned, targets, context, float(amount), scope, schedule, int(cycles))
        extra = {
            "amount": float(amount),
            "scope": scope,
            "sparsity_per_epoch": [round(s, 6) for s in sparsities] if schedule == "gradual" else None,
            "cycle_amounts": [round(s, 6) for s in sparsities] if cycles > 1 else None,
            "budget": None,
        }
    _make_permanent([(module, "weight") for _, module in _prunable_layers(pruned)])

    names = [f"{name}.weight" for name, _ in _prunable_layers(pruned)]
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
    if not _prunable_layers(model):
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
        "sparse_size_bytes": _serialized_bytes(_sparse_artifact(model, names)),
        "sparse_encoding": SPARSE_ENCODING,
        "latency_note": DENSE_LATENCY_NOTE,
    }


def _sparse_footprint(model: nn.Module) -> dict[str, int]:
    """Parameters, nonzero parameters and sparse-artifact bytes of ``model`` with its masks applied
    (measured on a copy whose masks are made permanent): a row of ``tables["cycles"]``."""
    plain = copy.deepcopy(model)
    _make_permanent([(module, "weight") for _, module in _prunable_layers(plain)])
    names = [f"{name}.weight" for name, _ in _prunable_layers(plain)]
    return {
        "params": measure.params(plain),
        "nonzero_params": measure.nonzero_params(plain),
        "size_bytes": _serialized_bytes(_sparse_artifact(plain, names)),
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
        nonzero = {name: int(torch.count_nonzero(_masked_weight(m))) for name, m in _prunable_layers(candidate)}
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

    layers = _prunable_layers(model)
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


def _serialized_bytes(obj: Any) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().nbytes


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


# -- structured -------------------------------------------------------------------------------
@checked
def structured(
    model: nn.Module,
    context: Context,
    *,
    amount: Fraction | None,
    max_acc_drop: AccuracyDrop | None,
    cycles: Count,
    target_params: Count | None,
    target_macs: Count | None,
    importance: Importance,
    iterative_steps: Count,
    round_to: Count | None,
    objective: Objective,
    scan_amounts: list[Fraction],
    finetune_attempts: Count,
) -> Compressed:
    """Remove output channels (filters, hidden units) and everything that depends on them.

    ``amount`` is the fraction of channels removed from *every* prunable group of coupled
    layers (torch-pruning's local ``pruning_ratio``; a residual stage is one group): a uniform
    cut keeps the network's shape balanced and cannot empty a layer that a global ranking
    might starve. Conv weights shrink in both channel dimensions, so about ``(1 - amount)**2``
    of the parameters remain. ``iterative_steps`` reaches ``amount`` in that many steps, ranking
    again after each. ``target_params`` / ``target_macs`` replace ``amount``: the ratio rises in
    small steps until the model fits the budget(s). The classifier's outputs (the last layer
    run) are never pruned. Fine-tunes after pruning when the run has fine-tuning epochs.

    ``cycles`` > 1 prunes and fine-tunes that many times up to ``amount``, each group cut to the
    channels ``amount`` leaves it after the last cycle (``budget.cycle_amounts``).
    ``max_acc_drop`` (with ``amount``, ``target_params`` and ``target_macs`` null) chooses the
    amount of each group instead: the largest removal of ``objective`` (params, MACs or batch-64
    latency) that keeps the validation accuracy within the budget, by a scan over
    ``scan_amounts``, a greedy search and fine-tunings along the search's path
    (``finetune_attempts``; see ``budget``).
    """
    budgets = {
        key: value
        for key, value in (("target_params", target_params), ("target_macs", target_macs))
        if value is not None
    }
    _check_structured_options(model, context, amount, max_acc_drop, cycles, budgets, importance, scan_amounts)
    before = {"params": measure.params(model), "macs": measure.macs(model, context.input_shape)}
    _check_budgets(budgets, before)
    how = {"importance": importance, "iterative_steps": int(iterative_steps), "round_to": round_to}
    channels_before = _out_channels(model)

    if max_acc_drop is not None:
        pruned, extra, tables = _structured_within_budget(
            model, context, how, float(max_acc_drop), objective, check_scan_amounts(scan_amounts), finetune_attempts
        )
    elif cycles > 1:
        pruned, extra, tables = _structured_in_cycles(model, context, how, float(amount), int(cycles))
    else:
        pruned, extra, tables = _structured_at_once(model, context, how, amount, budgets)

    after = {"params": measure.params(pruned), "macs": measure.macs(pruned, context.input_shape)}
    details = {
        **extra,
        "importance": importance,
        "round_to": round_to,
        "target_params": target_params,
        "target_macs": target_macs,
        "cycles": int(cycles),
        **{f"{key}_before": value for key, value in before.items()},
        **{f"{key}_after": value for key, value in after.items()},
        "param_ratio": after["params"] / before["params"],
        "mac_ratio": after["macs"] / before["macs"],
        "out_channels": {
            name: [channels_before[name], count] for name, count in list(_out_channels(pruned).items())[:SHOWN_LAYERS]
        },
    }
    return Compressed(
        model=pruned,
        method="prune_structured",
        backend=f"torch-pruning {_tp().__version__} (tp.pruner.MetaPruner)",
        save=lambda path: torch.save(_structured_artifact(pruned), path),
        details=details,
        tables=tables,
    )


def _check_structured_options(
    model: nn.Module,
    context: Context,
    amount: float | None,
    max_acc_drop: float | None,
    cycles: int,
    budgets: dict[str, int],
    importance: str,
    scan_amounts: list[float],
) -> None:
    """The checks across settings (each setting's own range is its annotation's)."""
    if not budgets and amount is None and max_acc_drop is None:
        raise ConfigError(
            "amount=None is not allowed: a fraction in (0, 1) of the channels of each layer to remove, "
            "unless max_acc_drop, target_params or target_macs is set"
        )
    check_budget_exclusions(max_acc_drop, cycles, amount=amount, **budgets)
    if cycles > 1 and budgets:
        key, value = next(iter(budgets.items()))
        raise ConfigError(
            f"cycles={cycles} is not allowed with {key}={value}: cycles prune up to amount; "
            f"use cycles=1, or amount with {key}=null"
        )
    check_cycles(cycles, context)
    check_scan_amounts(scan_amounts)
    if importance == "bn_scale" and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ConfigError("importance='bn_scale' is not allowed: the model has no BatchNorm layer to rank by")


def _structured_at_once(
    model: nn.Module, context: Context, how: dict[str, Any], amount: float | None, budgets: dict[str, int]
) -> tuple[nn.Module, dict[str, Any], dict]:
    """Prune a copy of ``model`` once, to ``amount`` or to ``budgets``, then fine-tune it."""
    pruned = copy.deepcopy(model)
    was_training = pruned.training
    pruned.eval()
    ratio = _prune_channels(
        pruned,
        context,
        None if budgets else float(amount),
        budgets,
        how["importance"],
        how["iterative_steps"],
        how["round_to"],
    )
    pruned.zero_grad(set_to_none=True)
    pruned.train(was_training)
    if context.finetune is not None:
        context.finetune(pruned, context.finetune_epochs)
    extra = {
        "amount": None if budgets else float(amount),
        "ranking": "per layer group (local pruning_ratio)",
        "channel_ratio": ratio,
        "iterative_steps": None if budgets else how["iterative_steps"],
        "cycle_amounts": None,
        "budget": None,
    }
    return pruned, extra, {}


def _structured_in_cycles(
    model: nn.Module, context: Context, how: dict[str, Any], amount: float, cycles: int
) -> tuple[nn.Module, dict[str, Any], dict]:
    """Prune a copy of ``model`` in ``cycles`` prune → fine-tune cycles up to ``amount``: at each, every
    group is cut to the channels the cycle's amount leaves of its *original* channels, so the last
    cycle ends where a one-shot pruning to ``amount`` would."""
    pruned = copy.deepcopy(model)
    groups = _groups_of(pruned, context, how["importance"])
    _check_no_layer_emptied(list(groups.items()), amount, how["round_to"])

    def prune_to(target: nn.Module, cumulative: float) -> None:
        kept = {name: _kept(channels, cumulative, how["round_to"]) for name, channels in groups.items()}
        _prune_groups(target, context, kept, how)

    rows = prune_in_cycles(pruned, context, amount, cycles, prune_to, _structured_footprint)
    extra = {
        "amount": amount,
        "ranking": "per layer group (local pruning_ratio)",
        "channel_ratio": amount,
        "iterative_steps": how["iterative_steps"],
        "cycle_amounts": [round(row["amount"], 6) for row in rows[1:]],
        "budget": None,
    }
    return pruned, extra, {"cycles": rows}


def _structured_within_budget(
    model: nn.Module,
    context: Context,
    how: dict[str, Any],
    max_acc_drop: float,
    objective: str,
    scan_amounts: list[float],
    finetune_attempts: int,
) -> tuple[nn.Module, dict[str, Any], dict]:
    """Choose each group's amount by the accuracy budget (``budget.prune_within_budget``)."""
    found = prune_within_budget(
        model,
        channel_removal(model, context, scan_amounts=scan_amounts, objective=objective, **how),
        context,
        max_acc_drop=max_acc_drop,
        objective=objective,
        finetune_attempts=int(finetune_attempts),
    )
    extra = {
        "amount": None,
        "ranking": "per layer group, amounts chosen by the accuracy budget",
        "channel_ratio": None,
        "iterative_steps": how["iterative_steps"],
        "cycle_amounts": None,
        "budget": found.details,
    }
    return found.model, extra, {"sensitivity": found.sensitivity}


def channel_removal(
    model: nn.Module,
    context: Context,
    *,
    importance: str,
    iterative_steps: int,
    round_to: int | None,
    scan_amounts: list[float],
    objective: str,
) -> LayerPruning:
    """Structured pruning as the budget search sees it: the groups of coupled layers of ``model``
    (named by their root layer), each cut by its own amount of its channels. A group's grid is the
    scan amounts that leave it a channel and a count of its own (``_grid``). Its cost counts
    parameters, MACs and, for ``objective=latency``, the batch-64 latency (``latency_ms``)."""
    groups = _groups_of(model, context, importance)
    grids = {name: _grid(channels, scan_amounts, round_to) for name, channels in groups.items()}
    grids = {name: grid for name, grid in grids.items() if grid}
    if not grids:
        raise ConfigError(
            f"scan_amounts={scan_amounts} is not allowed: no amount of it removes channels of any layer "
            "without removing them all"
        )
    how = {"importance": importance, "iterative_steps": iterative_steps, "round_to": round_to}

    def prune_layers(source: nn.Module, amounts: dict[str, float]) -> nn.Module:
        pruned = copy.deepcopy(source)
        _prune_groups(pruned, context, {name: _kept(groups[name], a, round_to) for name, a in amounts.items()}, how)
        return pruned

    def cost(candidate: nn.Module) -> dict[str, float]:
        counts = {"params": measure.params(candidate), "macs": measure.macs(candidate, context.input_shape)}
        return counts | ({"latency_ms": latency_cost(candidate, context)} if objective == "latency" else {})

    return LayerPruning(grids, prune_layers, cost)


def _grid(channels: int, scan_amounts: list[float], round_to: int | None) -> list[float]:
    """The scan amounts a group of ``channels`` can take: those that leave it a channel, the first
    of those that leave it the same count (the others would prune it identically)."""
    grid, seen = [], {channels}
    for amount in scan_amounts:
        kept = _kept(channels, amount, round_to)
        if kept >= 1 and kept not in seen:
            grid.append(amount)
            seen.add(kept)
    return grid


def _groups_of(model: nn.Module, context: Context, importance: str) -> dict[str, int]:
    """Root layer name → output channels of every group of ``model`` that can lose channels."""
    was_training = model.training
    model.eval()
    try:
        classifier = _output_layer(model, context.input_shape)
        _check_prunable_besides(model, classifier)
        return dict(_pruning_groups(model, context.input_shape, classifier, importance))
    finally:
        model.train(was_training)


def _prune_groups(model: nn.Module, context: Context, kept: dict[str, int], how: dict[str, Any]) -> None:
    """Cut the group rooted at each layer named in ``kept`` down to that many channels, in place
    (``how``: importance, iterative_steps, round_to)."""
    was_training = model.training
    model.eval()
    classifier = _output_layer(model, context.input_shape)
    ratios = {}
    for name, count in kept.items():
        root = model.get_submodule(name)
        current = _channels(root)
        if current > count:
            # torch-pruning keeps int(current * (1 - ratio)) channels; half a channel of margin makes
            # that exactly ``count`` whatever the float rounding
            ratios[root] = (current - count - 0.5) / current
    if ratios:
        steps = how["iterative_steps"]
        pruner = _pruner(model, context.input_shape, classifier, how["importance"], 0.0, steps, how["round_to"], ratios)
        _run_steps(pruner, model, context, how["importance"], steps, {})
    model.zero_grad(set_to_none=True)
    model.train(was_training)


def _channels(module: nn.Module) -> int:
    """Output channels of a group's root layer, as torch-pruning counts them."""
    tp = _tp()
    return int(tp.pruner.function.PrunerBox[tp.ops.module2type(module)].get_out_channels(module))


def _structured_footprint(model: nn.Module) -> dict[str, int]:
    """Parameters, nonzero parameters and artifact bytes: a row of ``tables["cycles"]``."""
    return {
        "params": measure.params(model),
        "nonzero_params": measure.nonzero_params(model),
        "size_bytes": _serialized_bytes(_structured_artifact(model)),
    }


def _prune_channels(
    model: nn.Module,
    context: Context,
    amount: float | None,
    budgets: dict[str, int],
    importance: str,
    iterative_steps: int,
    round_to: int | None,
) -> float:
    """Prune ``model`` in place to ``amount``, or until it fits ``budgets``; the channel ratio reached.

    The layer checks run on the traced graph before any channel is removed.
    """
    classifier = _output_layer(model, context.input_shape)
    _check_prunable_besides(model, classifier)
    groups = _pruning_groups(model, context.input_shape, classifier, importance)
    if budgets:
        ratio, steps = _largest_ratio(groups, max(1, int(round_to or 1)), budgets), TARGET_STEPS
    else:
        _check_no_layer_emptied(groups, amount, round_to)
        ratio, steps = amount, iterative_steps
    pruner = _pruner(model, context.input_shape, classifier, importance, ratio, steps, round_to)
    taken = _run_steps(pruner, model, context, importance, steps, budgets)
    return ratio * taken / steps


def _check_prunable_besides(model: nn.Module, classifier: nn.Module) -> None:
    if not any(module is not classifier for _, module in _prunable_layers(model)):
        raise ConfigError(
            f"model={type(model).__name__} is not allowed: prune_structured needs a Conv or Linear "
            "layer before the classifier"
        )


def _tp() -> Any:
    """torch-pruning, imported on use so that the other methods work without it."""
    try:
        import torch_pruning
    except ImportError as error:
        raise ConfigError(
            "compress=prune_structured is not allowed: it needs torch-pruning (pip install 'torch-pruning>=1.5,<2')"
        ) from error
    return torch_pruning


def _check_budgets(budgets: dict[str, int], before: dict[str, int]) -> None:
    for key, value in budgets.items():
        count, what = (before["params"], "parameters") if key == "target_params" else (before["macs"], "MACs")
        if int(value) >= count:
            raise ConfigError(
                f"{key}={value} is not allowed: the model has only {count:,} {what}; a budget must be smaller"
            )


def _output_layer(model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    """The Conv/Linear layer that runs last: the classifier, whose outputs are the classes."""
    order: list[nn.Module] = []
    hooks = [module.register_forward_hook(lambda m, i, o: order.append(m)) for _, module in _prunable_layers(model)]
    try:
        with torch.no_grad():
            model(torch.randn(1, *input_shape))
    finally:
        for hook in hooks:
            hook.remove()
    if not order:
        raise ConfigError(f"model={type(model).__name__} is not allowed: prune_structured needs a Conv or Linear layer")
    return order[-1]


def _importance(name: str) -> Any:
    imp = _tp().importance
    return {
        "l1": lambda: imp.GroupMagnitudeImportance(p=1),
        "l2": lambda: imp.GroupMagnitudeImportance(p=2),
        "bn_scale": imp.BNScaleImportance,
        "taylor": imp.TaylorImportance,
    }[name]()


def _pruner(
    model: nn.Module,
    input_shape: tuple[int, ...],
    classifier: nn.Module,
    importance: str,
    ratio: float,
    steps: int,
    round_to: int | None,
    per_group: dict[nn.Module, float] | None = None,
) -> Any:
    """torch-pruning's pruner: ``ratio`` of every group's channels, or ``per_group`` ratios
    (keyed by root layer; the other groups keep theirs, with ``ratio`` 0)."""
    return _tp().pruner.MetaPruner(
        model,
        example_inputs=torch.randn(1, *input_shape),
        importance=_importance(importance),
        pruning_ratio=ratio,
        pruning_ratio_dict=per_group,
        iterative_steps=steps,
        global_pruning=False,
        ignored_layers=[classifier],
        round_to=round_to,
    )


def _pruning_groups(
    model: nn.Module, input_shape: tuple[int, ...], classifier: nn.Module, importance: str
) -> list[tuple[str, int]]:
    """(name of the root layer, output channels) of every group of coupled layers that can lose channels."""
    pruner = _pruner(model, input_shape, classifier, importance, 0.5, 1, None)
    names = {module: name for name, module in model.named_modules()}
    groups = []
    for group in pruner.DG.get_all_groups(
        ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
    ):
        root = group[0][0].target.module
        groups.append((names.get(root, type(root).__name__), int(pruner.DG.get_out_channels(root))))
    if not groups:
        raise ConfigError(
            f"model={type(model).__name__} is not allowed: it has no channel that can be removed "
            "without touching the classifier's outputs"
        )
    return groups


def _kept(channels: int, ratio: float, round_to: int | None) -> int:
    """Channels a group keeps at ``ratio``, as torch-pruning counts them."""
    kept = int(channels * (1 - ratio))
    return kept - kept % round_to if round_to else kept


def _check_no_layer_emptied(groups: list[tuple[str, int]], amount: float, round_to: int | None) -> None:
    for name, channels in groups:
        if _kept(channels, amount, round_to) < 1:
            rounding = f" after rounding to multiples of round_to={round_to}" if round_to else ""
            raise ConfigError(
                f"amount={amount} is not allowed: it would remove all {channels} channels of "
                f"layer {name}{rounding}; use a smaller amount"
            )


def _largest_ratio(groups: list[tuple[str, int]], keep: int, budgets: dict[str, int]) -> float:
    """The highest channel ratio at which every group keeps ``keep`` channels (a budget search
    climbs towards it)."""
    ratio = min(1 - keep / channels for _, channels in groups) - 1e-6
    if ratio <= 0:
        key, value = next(iter(budgets.items()))
        raise ConfigError(f"{key}={value} is not allowed: no layer has more than {keep} channel(s) to remove")
    return ratio


def _run_steps(
    pruner: Any, model: nn.Module, context: Context, importance: str, steps: int, budgets: dict[str, int]
) -> int:
    """Prune step by step (stopping as soon as the budgets hold, if any); the number of steps taken."""
    for step in range(1, steps + 1):
        if importance == "taylor":
            _taylor_gradients(model, context)
        pruner.step()
        if budgets and _within(model, context.input_shape, budgets):
            return step
    if budgets:
        reached = {"target_params": measure.params(model), "target_macs": measure.macs(model, context.input_shape)}
        key = next(key for key, value in budgets.items() if reached[key] > value)
        raise ConfigError(
            f"{key}={budgets[key]} is not allowed: pruning stops at {reached[key]:,} with the "
            "classifier kept and the fewest channels per layer; use a larger budget"
        )
    return steps


def _within(model: nn.Module, input_shape: tuple[int, ...], budgets: dict[str, int]) -> bool:
    counts: dict[str, Callable[[], int]] = {
        "target_params": lambda: measure.params(model),
        "target_macs": lambda: measure.macs(model, input_shape),
    }
    return all(counts[key]() <= value for key, value in budgets.items())


def _taylor_gradients(model: nn.Module, context: Context) -> None:
    """Cross-entropy gradients of a few training batches: Taylor importance is |weight * grad|."""
    model.zero_grad(set_to_none=True)
    seen = 0
    for x, y, _ in context.train_batches():
        labelled_cross_entropy(model(x), y).backward()  # hidden labels (-1) left out
        seen += 1
        if seen == TAYLOR_BATCHES:
            break
    if seen == 0:
        raise ConfigError("importance='taylor' is not allowed: the training split gave no batch to take gradients on")


def _out_channels(model: nn.Module) -> dict[str, int]:
    return {name: int(module.weight.shape[0]) for name, module in _prunable_layers(model)}


def _structured_artifact(model: nn.Module) -> dict[str, Any]:
    """The state_dict plus the shape attributes of every module: with the unpruned
    architecture, that is all :func:`load_structured` needs, and it holds no pickled code."""
    attributes = {}
    for name, module in model.named_modules():
        found = {key: getattr(module, key) for key in SHAPE_ATTRIBUTES if _is_shape(getattr(module, key, None))}
        if found:
            attributes[name] = found
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    return {"format": STRUCTURED_FORMAT, "state_dict": state, "attributes": attributes}


def _is_shape(value: Any) -> bool:
    if isinstance(value, tuple):
        return all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return isinstance(value, int) and not isinstance(value, bool)


def load_structured(path: str | Path, model: nn.Module) -> nn.Module:
    """Rebuild a model saved by :func:`structured` on ``model``, a fresh instance of the
    *unpruned* architecture: every tensor is resized to its saved shape, the shape attributes
    are set, then the weights are loaded (``weights_only=True``). Returns ``model``."""
    artifact = torch.load(path, map_location="cpu", weights_only=True)
    if artifact.get("format") != STRUCTURED_FORMAT:
        raise ValueError(f"{path}: not a prune_structured artifact (format {artifact.get('format')!r})")
    for name, tensor in artifact["state_dict"].items():
        module_name, _, key = name.rpartition(".")
        _resize(model.get_submodule(module_name), key, tensor)
    for module_name, found in artifact["attributes"].items():
        module = model.get_submodule(module_name)
        for key, value in found.items():
            setattr(module, key, value)
    model.load_state_dict(artifact["state_dict"])
    return model


def _resize(module: nn.Module, key: str, saved: Tensor) -> None:
    current = getattr(module, key)
    if current is None or current.shape == saved.shape:
        return
    empty = torch.empty(saved.shape, dtype=current.dtype)
    if isinstance(current, nn.Parameter):
        setattr(module, key, nn.Parameter(empty, requires_grad=current.requires_grad))
    else:
        setattr(module, key, empty)
