"""The report's plots: accuracy against cost with confidence intervals, and a forest plot of the
paired differences. Each is drawn on its own Agg canvas: pyplot is never imported, so a user's
interactive backend and open figures are left alone."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from distillab.report import stats
from distillab.report.jobs import X_AXES, check_x

MARKERS = "osD^vPX<>ph"
VERDICT_COLORS = {"better": "tab:green", "worse": "tab:red", "not distinguishable": "0.45"}


def _figure(size: tuple[float, float], title: str, sweeps: list[str] | None) -> tuple[Figure, Any]:
    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.set_title(title)
    if sweeps and len(sweeps) > 1:
        figure.text(0.01, 0.005, "sweeps: " + ", ".join(sweeps), fontsize="x-small", color="0.4", va="bottom")
    return figure, ax


def accuracy_figure(
    rows: list[dict[str, Any]], x: str = "params", title: str = "", sweeps: list[str] | None = None
) -> Figure:
    """Test accuracy against cost, with the 95 % t-interval of each configuration's mean as error
    bars, so the cheapest model that is accurate enough can be read off. The Pareto front is the
    one ``summary.mark_pareto`` chose on validation accuracy, drawn at its test accuracy."""
    check_x(x)
    figure, ax = _figure((8, 5.5), title, sweeps)
    ax.set_xlabel(X_AXES[x][1])
    ax.set_ylabel("test accuracy (fraction of samples)")
    key = f"{x}_mean"
    students = [
        row for row in rows if row["role"] == "student" and row[key] is not None and row["acc_mean"] is not None
    ]
    if not students:
        note = "no completed jobs" + (f" with {x}" if rows else "")
        ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center")
        return figure
    ax.set_xscale("log")
    ax.set_xlabel(f"{X_AXES[x][1]}, log scale")
    teachers = [row for row in rows if row["role"] == "teacher"]
    _log_limits(ax, [row[key] for row in students + teachers if row[key] is not None and row["acc_mean"] is not None])
    _plot_methods(ax, students, key)
    _plot_front(ax, students, key)
    _plot_teachers(ax, teachers, key)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize="small", title="error bars: 95 % CI of the mean", title_fontsize="x-small")
    return figure


def _log_limits(ax: Any, xs: list[float]) -> None:
    """x limits a little wider than the data: matplotlib's own log autoscale can shrink to a
    sliver that misses every point when they all share one cost (one student, several methods)."""
    positive = [x for x in xs if x > 0]
    if positive:
        low, high = min(positive), max(positive)
        pad = max(0.05 * math.log10(high / low), 0.15)  # in decades
        ax.set_xlim(low / 10**pad, high * 10**pad)


def _series(row: dict) -> str:
    """One marker per distillation method, and per compression method when there is one."""
    compress = str(row.get("compress") or "none")
    return f"method={row['method']}" + ("" if compress == "none" else f", compress={compress}")


def _half_width(row: dict) -> float:
    low, high = row["acc_ci_low"], row["acc_ci_high"]
    return 0.0 if low is None or high is None else (high - low) / 2


def _plot_methods(ax: Any, rows: list[dict], key: str) -> None:
    for i, series in enumerate(sorted({_series(row) for row in rows})):
        mine = [row for row in rows if _series(row) == series]
        ax.errorbar(
            [row[key] for row in mine],
            [row["acc_mean"] for row in mine],
            yerr=[_half_width(row) for row in mine],
            fmt=MARKERS[i % len(MARKERS)],
            color=f"C{i % 10}",
            capsize=3,
            markersize=7,
            label=series,
        )


def _plot_front(ax: Any, rows: list[dict], key: str) -> None:
    front = sorted((row[key], row["acc_mean"]) for row in rows if row["pareto"])
    if front:
        xs, ys = zip(*front, strict=True)
        ax.plot(
            xs,
            ys,
            color="0.35",
            linestyle="--",
            linewidth=1,
            zorder=1,
            marker="o",
            markersize=14,
            markerfacecolor="none",
            label="Pareto front (chosen on val acc)",
        )


def _plot_teachers(ax: Any, rows: list[dict], key: str) -> None:
    """A teacher without the x quantity is drawn as a line at its accuracy instead."""
    for row in rows:
        acc = row["acc_mean"]
        if acc is None:
            continue
        label = f"teacher {row['teacher_arch']} (acc {acc:.4f})"
        style = dict(
            marker="*", markersize=16, color="gold", markeredgecolor="black", linestyle="none", zorder=5, label=label
        )
        if row[key] is not None:
            ax.plot([row[key]], [acc], **style)
            ax.annotate(
                f"teacher {row['teacher_arch']}",
                (row[key], acc),
                textcoords="offset points",
                xytext=(-10, 6),
                ha="right",
                fontsize="small",
            )
        else:
            ax.axhline(acc, color="goldenrod", linestyle=":", linewidth=1)
            ax.plot([0.97], [acc], transform=ax.get_yaxis_transform(), clip_on=False, **style)


def forest_figure(
    compared: pd.DataFrame, title: str = "", test_samples: int | None = None, sweeps: list[str] | None = None
) -> Figure:
    """The paired differences against the baseline (every row when a family has none), each with
    its 95 % t-interval and coloured by its verdict; the band is one test sample either side of 0."""
    rows = compared[compared["vs_baseline"].astype(bool)] if not compared.empty else compared
    if rows.empty:
        rows = compared
    rows = rows[rows["n_pairs"].astype(int) >= 1] if not rows.empty else rows
    figure, ax = _figure((8, 1.6 + 0.38 * max(len(rows), 1)), title, sweeps)
    ax.set_xlabel("candidate − baseline test accuracy (mean over pairs, 95 % CI)")
    if rows.empty:
        ax.text(0.5, 0.5, "no paired comparisons", transform=ax.transAxes, ha="center", va="center")
        ax.set_yticks([])
        return figure
    if test_samples:
        ax.axvspan(
            -1 / test_samples,
            1 / test_samples,
            color="0.9",
            zorder=0,
            label=f"± one test sample ({1 / test_samples:.4f})",
        )
    ax.axvline(0.0, color="0.3", linewidth=1)
    labels = []
    for y, row in enumerate(reversed(rows.to_dict("records"))):
        color = VERDICT_COLORS.get(row["verdict"], "0.7")
        low, high = row["diff_ci_low"], row["diff_ci_high"]
        if low is not None and high is not None:
            ax.plot([low, high], [y, y], color=color, linewidth=2)
        ax.plot([row["diff_mean"]], [y], marker="o", color=color, linestyle="none")
        labels.append(f"{row['candidate']}  vs  {row['baseline']}  (n={row['n_pairs']})")
    ax.set_yticks(range(len(labels)), labels, fontsize="small")
    for verdict, color in VERDICT_COLORS.items():
        ax.plot([], [], marker="o", color=color, linestyle="-", label=verdict)
    ax.legend(
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize="x-small",
        title=f"verdict (Holm, α = {stats.ALPHA})",
        title_fontsize="x-small",
    )
    ax.set_ylim(-0.7, len(labels) - 0.3)
    ax.grid(True, axis="x", alpha=0.3)
    return figure
