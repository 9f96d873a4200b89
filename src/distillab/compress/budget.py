"""Pruning to an accuracy budget, and pruning in cycles: the parts that do not depend on what
is pruned (channels or single weights), and the layers both prune. ``prune_structured`` and
``prune_unstructured`` describe their pruning as a :class:`LayerPruning` and call
:func:`prune_within_budget`, or :func:`prune_in_cycles` with a function that prunes a model to a
given amount.

Budget (``max_acc_drop``): the largest drop of validation accuracy below the uncompressed model's
(``context.reference_val_acc``) that pruning may cause; the floor is ``reference − max_acc_drop``.

1. Sensitivity scan, as in Han et al. 2015 ("Learning both weights and connections for efficient
   neural networks") and Li et al. 2017 ("Pruning filters for efficient ConvNets"): every prunable
   layer is pruned alone, on a copy, at each amount of its scan grid, and the validation accuracy
   and what that removes (parameters, MACs, and the batch-64 latency for a latency objective) are
   recorded: ``tables["sensitivity"]``.
2. Greedy search, in the manner of NetAdapt (Yang et al. 2018, "NetAdapt: platform-aware neural
   network adaptation for mobile applications"), which grows a network's pruning one
   resource-reducing step at a time and checks each step's accuracy, here with the scan as the
   cheap estimate of a step's cost. From nothing pruned, the candidate steps are each layer's next
   amount of its grid. The step taken is the one the scan says removes the most of the objective
   per accuracy lost: the steps that lost no accuracy in the scan come first (largest removal
   first), then the others by removal / accuracy lost, then those that remove nothing. The
   combined model is pruned from the input model and evaluated on the validation split; the step
   is kept when the accuracy is at least the floor, else the layer is frozen at its current
   amount. The search ends when every layer is frozen or at the top of its grid: at most
   layers × grid evaluations, each a pruning of a copy and one validation pass (the validation
   batches are read once and kept in memory). Its last configuration is within the budget
   *without* fine-tuning: the safe step.
3. Fine-tuning along the path. Checked only before fine-tuning, the search stops far too early:
   fine-tuning with the distillation loss recovers most of what pruning costs, so that a uniform
   cut fine-tuned can remove several times more than the safe step within the same budget
   (figures in docs/compression.md). So the path goes on from
   the safe step in the scan's order of priority, without evaluations or frozen layers, until
   every layer is at the top of its grid (``extend``); along it, the furthest configuration that
   keeps the floor after fine-tuning (``context.finetune``) is found by bisection, each attempt
   pruned from the input model and fine-tuned (``finetune_along``): the first attempt is the safe
   step, which backs the search off when even it fails after fine-tuning (fine-tuning follows
   the training loss, not the validation accuracy), then the middle of the steps between the
   furthest attempt that kept the floor and the nearest that did not, ``finetune_attempts``
   fine-tunings in all, every one recorded. The result is the furthest attempt that kept the
   floor, or the input model (within the budget by definition) when none did; without
   fine-tuning it is the safe step, checked again. Bisection assumes the fine-tuned accuracy
   falls along the path, which holds roughly, not exactly: the result keeps the floor, it is
   not guaranteed to be the furthest such step.

A dry run (``context.dry_run``: an untrained copy before training) scans one layer at one amount
and takes one search step, so that the settings and the pruning code are exercised at once.

Cycles (``cycles`` N > 1, with ``amount``): prune → fine-tune N times up to ``amount``, each cycle
removing the same fraction of what remains (:func:`cycle_amounts`), as in the iterative pruning of
Han et al. 2015. The cubic schedule of Zhu & Gupta 2017 (``schedule: gradual`` of unstructured
pruning) front-loads the pruning because it takes a small step every few hundred training steps;
with a few cycles each followed by a whole fine-tuning, the same relative step per cycle keeps the
damage of each cycle alike, and the model fine-tuned after the last cycle is at the final amount.
An accuracy budget with cycles is refused: the budget search already fine-tunes several times
along its path, each attempt checked after fine-tuning, and cycles of it would repeat the scan,
the search and those fine-tunings N times.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from distillab import measure
from distillab.compress import Context, val_accuracy
from distillab.settings import ConfigError

log = logging.getLogger(__name__)

#: the layers pruning acts on: convolutions (transposed ones too) and Linear layers
PRUNABLE = (nn.modules.conv._ConvNd, nn.Linear)
#: what a budget search removes the most of: parameters, multiply-accumulates or batch-64 latency
Objective = Literal["params", "macs", "latency"]
#: the same for zeroed weights: dense kernels multiply the zeros too, so latency is not an objective
SparseObjective = Literal["params", "macs"]
#: the ``cost`` key of each objective (latency is measured in milliseconds)
COST_KEYS = {"params": "params", "macs": "macs", "latency": "latency_ms"}
#: batch size of the latency objective (the batch-64 latency of results.json)
LATENCY_BATCH = 64
#: accuracies are ratios of counts; this absorbs the float rounding of ``reference - max_acc_drop``
TOLERANCE = 1e-9


@dataclasses.dataclass(frozen=True)
class LayerPruning:
    """How a pruning method prunes chosen layers by chosen amounts: what the search needs of it.

    ``grids``: the prunable layers (by module path, in order) and the amounts each may take, in
    increasing order (the scan amounts that are possible for that layer). ``prune(model, amounts)``
    returns a pruned copy of ``model`` with ``amounts`` (layer → amount; missing layers unpruned)
    that can be fine-tuned with what was removed held at zero. ``cost(model)`` counts what an
    objective measures: ``params``, ``macs`` and, for a latency objective, ``latency_ms``.
    """

    grids: dict[str, list[float]]
    prune: Callable[[nn.Module, dict[str, float]], nn.Module]
    cost: Callable[[nn.Module], dict[str, float]]


@dataclasses.dataclass
class WithinBudget:
    """The model a budget search returns, the facts for ``details["budget"]`` and the scan rows."""

    model: nn.Module
    details: dict[str, Any]
    sensitivity: list[dict[str, Any]]


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every layer of ``model`` that pruning acts on, in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, PRUNABLE)]


def serialized_bytes(obj: Any) -> int:
    """Bytes of ``obj`` written by ``torch.save``: the size of a pruning artifact."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().nbytes


# -- settings -----------------------------------------------------------------------------------------
def check_scan_amounts(scan_amounts: Sequence[float]) -> list[float]:
    """The scan grid as floats; one line when it is empty, unsorted or repeats an amount
    (each value's range is its annotation's)."""
    amounts = [float(a) for a in scan_amounts]
    if not amounts or any(b <= a for a, b in zip(amounts, amounts[1:])):
        raise ConfigError(
            f"scan_amounts={amounts} is not allowed: a non-empty list of fractions in (0, 1) in increasing order"
        )
    return amounts


def check_budget_exclusions(max_acc_drop: float | None, cycles: int, **exclusive: Any) -> None:
    """With ``max_acc_drop`` the search decides how much to prune: the settings that fix it
    (``amount``, ``target_params``...) must be null and ``cycles`` 1."""
    if max_acc_drop is None:
        return
    for key, value in exclusive.items():
        if value is not None:
            raise ConfigError(
                f"{key}={value} is not allowed with max_acc_drop={max_acc_drop}: the budget search chooses the "
                f"amount of each layer; set {key}=null"
            )
    if cycles != 1:
        raise ConfigError(
            f"cycles={cycles} is not allowed with max_acc_drop={max_acc_drop}: the budget search fine-tunes "
            "along its own path; use cycles=1"
        )


def check_cycles(cycles: int, context: Context) -> None:
    """Cycles fine-tune between prunings: they need fine-tuning epochs."""
    if cycles > 1 and (context.finetune is None or context.finetune_epochs < 1):
        raise ConfigError(
            f"cycles={cycles} is not allowed: it needs finetune_epochs >= 1 to fine-tune after each cycle"
        )


def latency_cost(model: nn.Module, context: Context) -> float:
    """Batch-64 CPU latency in ms with the run's protocol (``context.measure``); a dry run times
    one pass without warm-up, since the untrained copy's time means nothing."""
    timing = dict(context.measure)
    if context.dry_run:
        timing.update(warmup=0, repeats=1)
    return measure.latency_ms(model, context.input_shape, LATENCY_BATCH, **timing)


# -- the budget search --------------------------------------------------------------------------------
def prune_within_budget(
    model: nn.Module,
    pruning: LayerPruning,
    context: Context,
    *,
    max_acc_drop: float,
    objective: str,
    finetune_attempts: int,
) -> WithinBudget:
    """Scan, search, and fine-tune along the search's path (the module's docstring); ``model`` is
    left alone."""
    if context.reference_val_acc is None:
        raise ValueError("max_acc_drop needs context.reference_val_acc")
    context = _with_cached_val_batches(context)
    floor = context.reference_val_acc - max_acc_drop
    key = COST_KEYS[objective]
    base_acc, base_cost = val_accuracy(model, context), pruning.cost(model)
    rows = scan(model, pruning, context, base_cost)
    by_step = {(row["layer"], row["amount"]): row for row in rows}
    path, evaluations = greedy(model, pruning, by_step, context, floor, key, base_acc)
    safe = len(path) - 1
    if context.finetune is not None and not context.dry_run:
        path += extend(pruning.grids, by_step, path[-1], key, base_acc)
    final, tried = finetune_along(model, pruning, path, safe, context, floor, finetune_attempts, base_acc)
    cost = pruning.cost(final["model"])
    removed = {name: (base_cost[name] - cost[name]) / base_cost[name] for name in base_cost}
    details = {
        "max_acc_drop": max_acc_drop,
        "objective": objective,
        "reference_val_acc": context.reference_val_acc,
        "floor": floor,
        "val_acc_before_finetune": final["val_acc_pruned"],
        "val_acc_after_finetune": final["val_acc_finetuned"],
        "within_budget": final["within_budget"],
        "amounts": {layer: final["amounts"].get(layer, 0.0) for layer in pruning.grids},
        "removed_fraction": removed[key],
        "removed": removed,
        "search_evaluations": evaluations,
        "path_steps": len(path) - 1,
        "safe_step": safe,
        "chosen_step": final["step"],
        "attempts": tried,
    }
    log.info(
        "budget: %d evaluations, %d fine-tuning(s); removed %.3f of %s; val acc %.4f (floor %.4f)",
        evaluations,
        len(tried) if context.finetune is not None else 0,
        removed[key],
        objective,
        _final_acc(final),
        floor,
    )
    return WithinBudget(final["model"], details, rows)


def _with_cached_val_batches(context: Context) -> Context:
    """``context`` whose validation batches are read once and replayed: the search evaluates
    dozens of models on them."""
    if context.val_batches is None:
        raise ValueError("max_acc_drop needs context.val_batches")
    batches = list(context.val_batches())
    return dataclasses.replace(context, val_batches=lambda: batches)


def scan(
    model: nn.Module, pruning: LayerPruning, context: Context, base_cost: dict[str, float]
) -> list[dict[str, Any]]:
    """Each layer pruned alone at each amount of its grid: validation accuracy and what is
    removed (``<cost>_removed``). A dry run scans the first layer at its first amount only."""
    rows = []
    for layer, grid in pruning.grids.items():
        for amount in grid:
            pruned = pruning.prune(model, {layer: amount})
            cost = pruning.cost(pruned)
            row = {"layer": layer, "amount": amount, "val_acc": val_accuracy(pruned, context)}
            rows.append(row | {f"{name}_removed": base_cost[name] - cost[name] for name in base_cost})
            if context.dry_run:
                return rows
    return rows


def greedy(
    model: nn.Module,
    pruning: LayerPruning,
    by_step: dict[tuple[str, float], dict[str, Any]],
    context: Context,
    floor: float,
    key: str,
    base_acc: float,
) -> tuple[list[dict[str, float]], int]:
    """The configurations (layer → amount) accepted without fine-tuning, in order (the first
    prunes nothing), and the number of combined models evaluated; ``by_step``: the scan rows by
    (layer, amount); ``base_acc``: the input model's accuracy. See the module's docstring. A dry
    run stops after one step."""
    accepted: list[dict[str, float]] = [{}]
    frozen: set[str] = set()
    evaluations = 0
    while True:
        step = _best_step(pruning.grids, by_step, accepted[-1], frozen, key, base_acc)
        if step is None:
            return accepted, evaluations
        layer, amount = step
        trial = {**accepted[-1], layer: amount}
        acc = val_accuracy(pruning.prune(model, trial), context)
        evaluations += 1
        if acc >= floor - TOLERANCE:
            accepted.append(trial)
        else:
            frozen.add(layer)
        if context.dry_run:
            return accepted, evaluations


def _best_step(
    grids: dict[str, list[float]],
    by_step: dict[tuple[str, float], dict[str, Any]],
    current: dict[str, float],
    frozen: set[str],
    key: str,
    base_acc: float,
    lagging_first: bool = False,
) -> tuple[str, float] | None:
    """The (layer, next amount) with the highest priority by the scan, or None when no layer can
    move; ``lagging_first``: only among the movable layers pruned least so far."""
    movable = []
    for layer, grid in grids.items():
        now = current.get(layer, 0.0)
        following = next((a for a in grid if a > now), None)
        if layer not in frozen and following is not None and (layer, following) in by_step:
            movable.append((layer, now, following))
    if lagging_first and movable:
        least = min(now for _, now, _ in movable)
        movable = [move for move in movable if move[1] == least]
    best, best_priority = None, None
    for layer, now, following in movable:
        priority = _priority(by_step.get((layer, now)), by_step[(layer, following)], key, base_acc)
        if best_priority is None or priority > best_priority:
            best, best_priority = (layer, following), priority
    return best


def _priority(now: dict[str, Any] | None, step: dict[str, Any], key: str, base_acc: float) -> tuple[int, float]:
    """How good a step from ``now`` (a scan row, None: the layer unpruned) to ``step`` is, by the
    scan: (class, value), compared as a tuple. Class 2: it removes something and lost no accuracy
    (value: what it removes); 1: removes something and lost accuracy (value: removal per accuracy
    lost); 0: removes nothing (value: minus the accuracy lost)."""
    gain = step[f"{key}_removed"] - (now[f"{key}_removed"] if now else 0.0)
    loss = (now["val_acc"] if now else base_acc) - step["val_acc"]
    if gain <= 0:
        return 0, -loss
    if loss <= 0:
        return 2, gain
    return 1, gain / loss


def extend(
    grids: dict[str, list[float]],
    by_step: dict[tuple[str, float], dict[str, Any]],
    start: dict[str, float],
    key: str,
    base_acc: float,
) -> list[dict[str, float]]:
    """The configurations beyond ``start``, one step each, without evaluation or frozen layers,
    until every layer is at the top of its grid: where fine-tuning may recover what the search
    could not keep without it. Each step raises a layer pruned least so far, the scan's priority
    choosing among them, so the path passes through every uniform configuration above ``start``
    (fine-tuning recovers a balanced cut better than the scan, made without it, predicts)."""
    path, current = [], dict(start)
    while (step := _best_step(grids, by_step, current, set(), key, base_acc, lagging_first=True)) is not None:
        current = {**current, step[0]: step[1]}
        path.append(current)
    return path


def finetune_along(
    model: nn.Module,
    pruning: LayerPruning,
    path: list[dict[str, float]],
    safe: int,
    context: Context,
    floor: float,
    finetune_attempts: int,
    base_acc: float,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The furthest configuration of ``path`` (``path[0]`` prunes nothing) found within the budget
    after fine-tuning, by bisection: the first attempt is ``path[safe]`` (the search's last
    configuration within the budget before fine-tuning), then the middle of the steps between
    the furthest attempt that kept the floor and the nearest that did not, up to
    ``finetune_attempts`` attempts. Returns the chosen outcome (``path[0]``: a copy of ``model``,
    whose accuracy is ``base_acc``) and the attempts as plain rows."""
    low, high = 0, len(path)
    chosen = _outcome(copy.deepcopy(model), {}, base_acc, None, True) | {"step": 0}
    tried: list[dict[str, Any]] = []
    while high - low > 1 and len(tried) < finetune_attempts:
        step = safe if not tried and safe > 0 else (low + high) // 2
        tried.append(_attempt(model, pruning, path[step], context, floor) | {"step": step})
        if tried[-1]["within_budget"]:
            low, chosen = step, tried[-1]
        else:
            high = step
    if tried and chosen["step"] == 0:
        log.warning("budget: no pruned configuration kept the accuracy after fine-tuning; nothing is pruned")
    return chosen, _rows(tried)


def _attempt(
    model: nn.Module, pruning: LayerPruning, amounts: dict[str, float], context: Context, floor: float
) -> dict[str, Any]:
    """Prune ``model`` by ``amounts`` and fine-tune it when the run fine-tunes; the outcome, checked
    against ``floor``. The accuracy before fine-tuning is measured again even where the search
    evaluated the same amounts: a ranking that reads training batches (Taylor importance) may
    pick other channels when repeated."""
    pruned = pruning.prune(model, amounts)
    before, after = val_accuracy(pruned, context), None
    if context.finetune is not None:
        context.finetune(pruned, context.finetune_epochs)
        after = val_accuracy(pruned, context)
    final = after if after is not None else before
    return _outcome(pruned, amounts, before, after, final >= floor - TOLERANCE)


def _outcome(
    model: nn.Module, amounts: dict[str, float], before: float, after: float | None, within: bool
) -> dict[str, Any]:
    return {
        "model": model,
        "amounts": dict(amounts),
        "val_acc_pruned": before,
        "val_acc_finetuned": after,
        "within_budget": within,
    }


def _final_acc(outcome: dict[str, Any]) -> float:
    """The validation accuracy of what an attempt returns: after fine-tuning, if it was fine-tuned."""
    return outcome["val_acc_finetuned"] if outcome["val_acc_finetuned"] is not None else outcome["val_acc_pruned"]


def _rows(tried: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The attempts as plain data for results.json (without their models)."""
    return [{key: value for key, value in outcome.items() if key != "model"} for outcome in tried]


# -- cycles -----------------------------------------------------------------------------------------
def cycle_amounts(amount: float, cycles: int) -> list[float]:
    """The amount reached after each of ``cycles`` cycles, ``1 - (1 - amount) ** (k / cycles)``:
    each cycle removes the same fraction, ``1 - (1 - amount) ** (1 / cycles)``, of what remains,
    and the last reaches ``amount`` (see the module's docstring for why this schedule)."""
    return [1.0 - (1.0 - float(amount)) ** (k / cycles) for k in range(1, cycles + 1)]


def prune_in_cycles(
    model: nn.Module,
    context: Context,
    amount: float,
    cycles: int,
    prune_to: Callable[[nn.Module, float], None],
    footprint: Callable[[nn.Module], dict[str, int]],
) -> list[dict[str, Any]]:
    """Prune ``model`` in place to each amount of :func:`cycle_amounts` (``prune_to(model, amount)``,
    keeping what earlier cycles removed), fine-tuning after each; the rows of
    ``tables["cycles"]``: cycle 0 is the input, then each cycle's amount, ``footprint`` (params,
    nonzero params, bytes) and validation accuracy after pruning and after fine-tuning."""
    start = val_accuracy(model, context)
    rows = [{"cycle": 0, "amount": 0.0, **footprint(model), "val_acc_pruned": start, "val_acc": start}]
    for cycle, target in enumerate(cycle_amounts(amount, cycles), start=1):
        prune_to(model, target)
        pruned = val_accuracy(model, context)
        context.finetune(model, context.finetune_epochs)
        rows.append(
            {
                "cycle": cycle,
                "amount": target,
                **footprint(model),
                "val_acc_pruned": pruned,
                "val_acc": val_accuracy(model, context),
            }
        )
        log.info("cycle %d/%d: amount %.4f, val acc %.4f → %.4f", cycle, cycles, target, pruned, rows[-1]["val_acc"])
    return rows
