"""Structured pruning: remove whole output channels (filters, hidden units) with torch-pruning.

torch-pruning follows the dependencies between layers (residual sums, BatchNorm, the next layer's
inputs), so the result is a smaller dense model that is really faster. The channels are removed
by one ``amount`` of every group of coupled layers, to a parameter or MAC budget
(``target_params`` / ``target_macs``), in ``cycles`` of prune → fine-tune
(``budget.prune_in_cycles``: ``tables["cycles"]``), or to an accuracy budget ``max_acc_drop``,
where a sensitivity scan and a greedy search choose the amount of each group
(``budget.prune_within_budget``: ``details["budget"]``, ``tables["sensitivity"]``). The artifact
``Compressed.save`` writes is the state_dict and the shape attributes of every module, read back
by :func:`load_structured` on the unpruned architecture. The input model is never modified.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from distillab import measure
from distillab.compress import Compressed, Context
from distillab.compress.budget import (
    LayerPruning,
    Objective,
    check_budget_exclusions,
    check_cycles,
    check_scan_amounts,
    latency_cost,
    prunable_layers,
    prune_in_cycles,
    prune_within_budget,
    serialized_bytes,
)
from distillab.labels import labelled_cross_entropy
from distillab.settings import AccuracyDrop, ConfigError, Count, Fraction, checked

STRUCTURED_FORMAT = "distillab.prune_structured/1"
#: channel ranking of ``structured``: weight norms, BatchNorm gammas, |weight * gradient|
Importance = Literal["l1", "l2", "bn_scale", "taylor"]
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
        "size_bytes": serialized_bytes(_structured_artifact(model)),
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
    if not any(module is not classifier for _, module in prunable_layers(model)):
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
    hooks = [module.register_forward_hook(lambda m, i, o: order.append(m)) for _, module in prunable_layers(model)]
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
    return {name: int(module.weight.shape[0]) for name, module in prunable_layers(model)}


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
