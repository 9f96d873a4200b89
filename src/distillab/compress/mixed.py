"""Int8 within an accuracy budget: which layers to keep in floating point (mixed precision).

The search every quantizer runs when ``compress.max_acc_drop`` is set (``quantize`` on torch.ao
modules, ``ort`` on ONNX files): quantize everything and measure validation accuracy; if the drop
below the uncompressed model's (``context.reference_val_acc``) is within the budget, stop. Otherwise
scan each layer's sensitivity (the accuracy with that layer alone in int8), then keep layers float,
the least accurate alone first, re-checking the combined model after each, until the drop is within
the budget. The search only sees candidates through two functions, so the same code serves a
module and a file: ``build(float_layers)`` quantizes with those layers float, ``accuracy(candidate)``
is its validation accuracy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

Candidate = TypeVar("Candidate")
#: accuracies are ratios of sample counts: a drop exactly at the budget must not miss it by a rounding error
TOLERANCE = 1e-9


@dataclass
class MixedPrecision(Generic[Candidate]):
    """What a search settled on: the candidate, its float layers and the accuracies behind them.

    ``trail`` is the validation accuracy with 0, 1, 2... layers kept float; ``scan`` one row per
    layer (``layer``, ``val_acc_int8_alone``, ``drop_int8_alone``, ``kept_float``); ``all_float``
    is set by a caller that fell back to the float model when no candidate met the budget.
    """

    candidate: Candidate
    float_layers: list[str]
    max_acc_drop: float
    reference: float
    val_acc: float
    scan: list[dict[str, Any]] = field(default_factory=list)
    trail: list[float] = field(default_factory=list)
    all_float: bool = False

    @property
    def within_budget(self) -> bool:
        return within(self.reference, self.val_acc, self.max_acc_drop)

    def details(self) -> dict[str, Any]:
        return {
            "max_acc_drop": self.max_acc_drop,
            "reference_val_acc": round(self.reference, 6),
            "val_acc": round(self.val_acc, 6),
            "acc_drop": round(self.reference - self.val_acc, 6),
            "within_budget": self.within_budget,
            "float_layers": list(self.float_layers),
            "all_float": self.all_float,
            "val_acc_by_float_layers": [round(acc, 6) for acc in self.trail],
            "sensitivity": self.scan,
        }


def within(reference: float, acc: float, max_acc_drop: float) -> bool:
    return reference - acc <= max_acc_drop + TOLERANCE


def search(
    build: Callable[[list[str]], Candidate],
    accuracy: Callable[[Candidate], float],
    layers: Sequence[str],
    reference: float,
    max_acc_drop: float,
    method: str,
    *,
    first: Candidate | None = None,
    alone: Callable[[str], Candidate] | None = None,
) -> MixedPrecision[Candidate]:
    """Keep the fewest ``layers`` float that bring the validation accuracy within ``max_acc_drop``
    of ``reference``. ``first``: the all-int8 candidate when the caller has it already (else
    ``build([])``); ``alone(layer)``: the candidate with only ``layer`` in int8 (else ``build`` of
    every other layer). When no set meets the budget, the most accurate candidate is kept."""
    first = build([]) if first is None else first
    acc = accuracy(first)
    found = MixedPrecision(first, [], max_acc_drop, reference, acc, trail=[acc])
    log.info("%s: all int8: val acc %.4f (reference %.4f, max drop %g)", method, acc, reference, max_acc_drop)
    if found.within_budget:
        return found
    alone = alone or (lambda layer: build([other for other in layers if other != layer]))
    for layer in layers:
        acc = accuracy(alone(layer))
        found.scan.append(
            {"layer": layer, "val_acc_int8_alone": round(acc, 6), "drop_int8_alone": round(reference - acc, 6)}
        )
    best = (found.val_acc, first, [])
    kept: list[str] = []
    for row in sorted(found.scan, key=lambda row: row["val_acc_int8_alone"]):
        kept.append(row["layer"])
        candidate = build(list(kept))
        acc = accuracy(candidate)
        found.trail.append(acc)
        log.info("%s: %d layers float (last %s): val acc %.4f", method, len(kept), row["layer"], acc)
        if acc > best[0] or within(reference, acc, max_acc_drop):
            best = (acc, candidate, list(kept))
        if within(reference, acc, max_acc_drop):
            break
    found.val_acc, found.candidate, found.float_layers = best
    for row in found.scan:
        row["kept_float"] = row["layer"] in found.float_layers
    if not found.within_budget:
        log.warning(
            "%s: no set of float layers meets max_acc_drop=%g (reference val acc %.4f); the best keeps %d float: %.4f",
            method,
            max_acc_drop,
            reference,
            len(found.float_layers),
            found.val_acc,
        )
    return found
