"""Figures of the tables a compressor returns (``Compressed.tables``), saved beside their CSV files:
``compressed/sensitivity.png`` (the scan of a pruning budget) and ``compressed/cycles.png`` (the
cycles of iterative pruning). Each is drawn on its own Agg canvas, so pyplot is never imported
and a user's interactive backend is left alone, and written atomically."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from distillab.io import atomic_save

DPI = 120


def sensitivity_figure(rows: list[dict[str, Any]], details: dict[str, Any]) -> Figure:
    """Validation accuracy against the amount each layer is pruned by alone, one line per layer;
    with the budget's facts (``details["budget"]``): the reference accuracy, the floor
    ``reference − max_acc_drop`` and, on each line, the amount the search chose."""
    figure, ax = _figure((8, 5.5))
    ax.set_title("Sensitivity: each layer pruned alone")
    ax.set_xlabel("amount pruned from the layer (fraction)")
    ax.set_ylabel("validation accuracy (fraction of samples)")
    found = details.get("budget") or {}
    chosen = found.get("amounts", {})
    colors = _colors(len({row["layer"] for row in rows}))
    for color, layer in zip(colors, dict.fromkeys(row["layer"] for row in rows)):
        points = [(row["amount"], row["val_acc"]) for row in rows if row["layer"] == layer]
        ax.plot(*zip(*points), marker="o", markersize=3, color=color, label=layer)
        mark = next((acc for amount, acc in points if amount == chosen.get(layer)), None)
        if mark is not None:
            ax.plot([chosen[layer]], [mark], marker="*", markersize=12, color=color, markeredgecolor="black")
    if found:
        ax.axhline(found["reference_val_acc"], color="0.3", linestyle="--", linewidth=1, label="uncompressed")
        ax.axhline(found["floor"], color="tab:red", linestyle=":", linewidth=1.5, label="floor (budget)")
        ax.plot([], [], linestyle="none", marker="*", color="0.5", markeredgecolor="black", label="amount chosen")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize="x-small", ncols=2)
    return figure


def cycles_figure(rows: list[dict[str, Any]], details: dict[str, Any]) -> Figure:
    """Per cycle of iterative pruning: validation accuracy after pruning and after fine-tuning
    (left), nonzero parameters and artifact bytes as a fraction of the input model's (right)."""
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    accuracy, size = figure.subplots(1, 2)
    cycles = [row["cycle"] for row in rows]
    accuracy.plot(cycles, [row["val_acc_pruned"] for row in rows], marker="o", linestyle="--", label="after pruning")
    accuracy.plot(cycles, [row["val_acc"] for row in rows], marker="o", label="after fine-tuning")
    accuracy.set_title("Validation accuracy per cycle")
    accuracy.set_ylabel("validation accuracy (fraction of samples)")
    for key, label in (("nonzero_params", "nonzero parameters"), ("size_bytes", "artifact bytes")):
        size.plot(cycles, [row[key] / rows[0][key] for row in rows], marker="o", label=label)
    size.set_title("Size per cycle (fraction of the input model)")
    size.set_ylabel("fraction of cycle 0")
    for ax in (accuracy, size):
        ax.set_xlabel("cycle (0: before pruning)")
        ax.set_xticks(cycles)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    return figure


#: the table names that have a figure, and how to draw it
FIGURES: dict[str, Callable[[list[dict[str, Any]], dict[str, Any]], Figure]] = {
    "sensitivity": sensitivity_figure,
    "cycles": cycles_figure,
}


def save_figure(name: str, rows: list[dict[str, Any]], path: Path, details: dict[str, Any]) -> Path | None:
    """Draw the figure of table ``name`` (``details``: the compressor's facts) and write it to
    ``path`` atomically; None for a table without a figure or without rows."""
    draw = FIGURES.get(name)
    if draw is None or not rows:
        return None
    figure = draw(rows, details)
    return atomic_save(path, lambda handle: figure.savefig(handle, format="png", dpi=DPI))


def _figure(size: tuple[float, float]) -> tuple[Figure, Any]:
    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _colors(count: int) -> list[Any]:
    """Distinct colours for ``count`` lines (tab10, then tab20 beyond ten)."""
    palette = colormaps["tab10" if count <= 10 else "tab20"]
    return [palette(i % palette.N) for i in range(count)]
