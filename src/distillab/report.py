"""Sweep report: a table, a CSV and a plot from the ``results.json`` files of a multirun.

Jobs with the same ``group`` are one configuration trained with different seeds, so they are
averaged and their spread is shown. Jobs that failed, never wrote results or wrote a file that
does not parse are listed by name in the report: a sweep that looks complete but is not is
worse than one that plainly says which jobs are missing.

Run it by hand with ``python -m distillab.report SWEEP_DIR [--x params]``, or let Hydra run it
after every multirun through ``SweepReportCallback`` (``hydra.callbacks.report``).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
import statistics
import sys
from collections.abc import Iterable
from io import StringIO
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import DictConfig, ListConfig, OmegaConf

from distillab.io import atomic_save, atomic_write_text
from distillab.results import tuned_model

log = logging.getLogger("distillab.report")

RESULTS_FILE = "results.json"
# folders that hold artefacts of a job, never a job of their own
SKIP_DIRS = frozenset({".hydra", "wandb", "teacher_cache", "checkpoints"})
# x name -> (keys inside a model block, axis label with unit)
X_AXES: dict[str, tuple[tuple[str, ...], str]] = {
    "params": (("params",), "parameters (count)"),
    "size_bytes": (("size_bytes",), "model size (bytes)"),
    "macs": (("macs",), "multiply-accumulates per sample (count)"),
    "latency_ms": (("latency_ms", "batch_64"), "latency per batch of 64 (ms)"),
}
COLUMNS = [
    "role",
    "group",
    "setting",
    "method",
    "compress",
    "evaluated",
    "student_arch",
    "teacher_arch",
    "teacher_key",
    "n_seeds",
    "seeds",
    "acc_mean",
    "acc_std",
    "f1_mean",
    "f1_std",
    "val_acc_mean",
    "params_mean",
    "size_bytes_mean",
    "macs_mean",
    "latency_ms_mean",
    "agreement_mean",
    "acc_retention_mean",
    "pareto",
]
MARKERS = "osD^vPX<>ph"


# -- reading ----------------------------------------------------------------------------------
def collect(sweep_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One record per job folder, so a crashed or killed job shows up instead of vanishing.

    Each record has ``job`` (folder relative to ``sweep_dir``), ``status`` (ok, failed,
    missing or unreadable), ``path``, ``error`` (one line, None when ok) and ``results``.
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no such sweep folder: {root}")
    records = []
    for folder, dirnames, filenames in os.walk(root):
        is_job = ".hydra" in dirnames
        dirnames[:] = [name for name in dirnames if name not in SKIP_DIRS]
        job = Path(folder).relative_to(root).as_posix()
        if RESULTS_FILE in filenames:
            records.append(_read_job(job, Path(folder) / RESULTS_FILE))
        elif is_job:
            why = f"no {RESULTS_FILE}: the job is still running or was killed"
            records.append(_record(job, "missing", Path(folder), error=why))
    return sorted(records, key=lambda record: _natural_key(record["job"]))


def _read_job(job: str, path: Path) -> dict[str, Any]:
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        why = f"cannot parse {RESULTS_FILE}: {_one_line(str(exc))}"
        return _record(job, "unreadable", path, error=why)
    status = results.get("status") if isinstance(results, dict) else None
    if status not in ("ok", "failed"):
        why = f"status is {status!r}, expected 'ok' or 'failed'"
        return _record(job, "unreadable", path, error=why)
    error = None
    if status == "failed":
        error = _one_line(str(results.get("error") or "")) or "failed without an error message"
    return _record(job, status, path, results=results, error=error)


def _record(job: str, status: str, path: Path, results: dict | None = None, error: str | None = None) -> dict[str, Any]:
    return {"job": job, "status": status, "path": str(path), "error": error, "results": results or {}}


def _natural_key(text: str) -> list:
    """Digits compare as numbers, so job 2 sorts before job 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


# -- summarizing ------------------------------------------------------------------------------
def check_x(x: str) -> None:
    if x not in X_AXES:
        raise ValueError(f"x={x!r} is not allowed: use one of {', '.join(X_AXES)}")


def summarize(records: list[dict[str, Any]], x: str = "params") -> list[dict[str, Any]]:
    """Rows per configuration over the ok jobs, then one reference row per teacher.

    Student rows (``role`` = student) are sorted by the mean of ``x``; ``pareto`` marks the
    configurations no other one beats on both ``x`` (lower) and test accuracy (higher).
    Teacher rows (``role`` = teacher) never take part in the front. Every row has the keys
    of ``COLUMNS``; a std is None when there is a single seed.
    """
    check_x(x)
    ok = [record["results"] for record in records if record["status"] == "ok"]
    groups: dict[str, list[dict]] = {}
    for results in ok:
        groups.setdefault(str(results.get("group") or "(defaults)"), []).append(results)
    rows = [_student_row(group, runs) for group, runs in groups.items()]
    shared = shared_overrides(list(groups))
    for row in rows:
        row["setting"] = " ".join(o for o in row["group"].split(" ") if o not in shared) or row["group"]
    _mark_pareto(rows, f"{x}_mean")
    rows.sort(key=lambda row: (row[f"{x}_mean"] is None, row[f"{x}_mean"] or 0, row["group"]))
    return rows + _teacher_rows(ok)


def shared_overrides(groups: list[str]) -> list[str]:
    """Overrides every configuration of the sweep has (e.g. ``trainer.max_epochs=50``): they
    say nothing about how rows differ, so tables and plots name rows by the rest."""
    if len(groups) < 2:
        return []
    token_sets = [set(group.split(" ")) for group in groups]
    return sorted(set.intersection(*token_sets))


def _evaluated(results: dict) -> dict:
    """The compressed model when there is one: it is what would be deployed."""
    block = results.get("compressed") or results.get("student")
    return block if isinstance(block, dict) else {}


def _student_row(group: str, runs: list[dict]) -> dict[str, Any]:
    models = [_evaluated(results) for results in runs]
    row = dict.fromkeys(COLUMNS)
    row.update(
        role="student",
        group=group,
        method=_distinct(results.get("method") for results in runs),
        compress=_distinct(results.get("compress") for results in runs),
        evaluated=_distinct("compressed" if "compressed" in r else "student" for r in runs),
        student_arch=_distinct(model.get("arch") for model in models),
        teacher_arch=_distinct(_dig(results, "teacher", "arch") for results in runs),
        teacher_key=_distinct(_dig(results, "teacher", "cache_key") for results in runs),
        acc_retention_mean=_mean(_dig(results, "ratios", "acc_retention") for results in runs),
        **_stats(runs, models),
    )
    return row


def _teacher_rows(ok: list[dict]) -> list[dict[str, Any]]:
    # an ensemble's members get their own rows next to the ensemble's
    by_key: dict[str, list[tuple[dict, dict]]] = {}
    for results in ok:
        for teacher in [results.get("teacher"), *(results.get("teachers") or [])]:
            if isinstance(teacher, dict):
                key = str(teacher.get("cache_key") or teacher.get("arch") or "unknown")
                by_key.setdefault(key, []).append((results, teacher))
    rows = []
    for key, pairs in by_key.items():
        runs, blocks = [results for results, _ in pairs], [block for _, block in pairs]
        arch = _distinct(block.get("arch") for block in blocks)
        row = dict.fromkeys(COLUMNS)
        row.update(
            role="teacher",
            group=f"teacher {arch} [{key[:8]}]",
            method="teacher",
            evaluated="teacher",
            teacher_arch=arch,
            teacher_key=key,
            pareto=False,
            **_stats(runs, blocks),
        )
        rows.append(row)
    return sorted(rows, key=lambda row: row["group"])


def _stats(runs: list[dict], models: list[dict]) -> dict[str, Any]:
    acc = [_dig(model, "test", "acc") for model in models]
    f1 = [_dig(model, "test", "f1") for model in models]
    stats = {
        "n_seeds": len(runs),
        "seeds": sorted({r["seed"] for r in runs if isinstance(r.get("seed"), (int, float))}),
        "acc_mean": _mean(acc),
        "acc_std": _std(acc),
        "f1_mean": _mean(f1),
        "f1_std": _std(f1),
        "val_acc_mean": _mean(_dig(model, "val", "acc") for model in models),
        "agreement_mean": _mean(_dig(model, "test", "agreement") for model in models),
    }
    for name, (keys, _) in X_AXES.items():
        stats[f"{name}_mean"] = _mean(_dig(model, *keys) for model in models)
    return stats


def _mark_pareto(rows: list[dict], key: str) -> None:
    points = [(row[key], row["acc_mean"]) for row in rows]
    for row, point in zip(rows, points, strict=True):
        known = None not in point
        row["pareto"] = known and not any(_dominates(other, point) for other in points)


def _dominates(a: tuple, b: tuple) -> bool:
    """``a`` costs no more and is no less accurate than ``b``, and differs in one of them."""
    return None not in a and a[0] <= b[0] and a[1] >= b[1] and a != b


def _dig(mapping: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


def _numbers(values: Iterable[Any]) -> list[float]:
    """Missing or non-numeric values are left out, so one odd job cannot hide a whole row."""
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def _mean(values: Iterable[Any]) -> float | None:
    numbers = _numbers(values)
    return statistics.fmean(numbers) if numbers else None


def _std(values: Iterable[Any]) -> float | None:
    """Sample std (ddof=1); None for one value, since one seed says nothing about spread."""
    numbers = _numbers(values)
    return statistics.stdev(numbers) if len(numbers) > 1 else None


def _distinct(values: Iterable[Any]) -> str | None:
    """The shared value of a group's jobs; jobs that disagree show every value."""
    return "/".join(sorted({str(v) for v in values if v is not None})) or None


# -- rendering --------------------------------------------------------------------------------
def csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _csv_value(row[key]) for key in COLUMNS})
    return buffer.getvalue()


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return value


def markdown_text(records: list[dict[str, Any]], rows: list[dict[str, Any]], x: str, title: str) -> str:
    students = [row for row in rows if row["role"] == "student"]
    teachers = [row for row in rows if row["role"] == "teacher"]
    lines = [f"# Sweep report: {title}", "", _counts(records), ""]
    lines += ["## Students", ""]
    if students:
        lines += [
            f"Test metrics of the evaluated model (compressed when present, else the "
            f"student), over seeds. Pareto: no other row has {x} as low and accuracy as "
            f"high, and one of them strictly better.",
            "",
        ]
        shared = shared_overrides([row["group"] for row in students])
        if shared:
            lines += ["Overrides shared by every configuration: " + " ".join(f"`{o}`" for o in shared), ""]
        lines += _student_table(students)
        if any("prune_unstructured" in str(row["compress"]) for row in students):
            lines += [
                "",
                "Unstructured pruning zeroes weights but keeps every tensor dense: parameters and "
                "nonzero counts differ, and the dense latency does not change (the sparse size is in "
                "each job's `compressed.details`).",
            ]
    else:
        lines.append("No completed jobs yet: nothing to summarize.")
    if teachers:
        lines += ["", "## Teachers (reference)", ""] + _teacher_table(teachers)
    lines += ["", "## Jobs not included", ""] + _problem_lines(records)
    return "\n".join(lines) + "\n"


def _counts(records: list[dict]) -> str:
    statuses = ("ok", "failed", "missing", "unreadable")
    counts = ", ".join(f"{sum(r['status'] == s for r in records)} {s}" for s in statuses)
    return f"{len(records)} jobs: {counts}."


def _student_table(rows: list[dict]) -> list[str]:
    header = [
        "Pareto",
        "setting",
        "method",
        "compress",
        "arch",
        "n seeds",
        "acc (mean ± std)",
        "f1 (mean ± std)",
        "val acc",
        "params",
        "size (bytes)",
        "MACs",
        "latency b64 (ms)",
        "agreement",
        "acc retention",
    ]
    body = [
        [
            "**yes**" if row["pareto"] else "",
            row["setting"],
            row["method"],
            row["compress"],
            row["student_arch"],
            row["n_seeds"],
            _pm(row["acc_mean"], row["acc_std"]),
            _pm(row["f1_mean"], row["f1_std"]),
            _num(row["val_acc_mean"], ".4f"),
            _num(row["params_mean"], ",.0f"),
            _num(row["size_bytes_mean"], ",.0f"),
            _num(row["macs_mean"], ",.0f"),
            _num(row["latency_ms_mean"], ".3f"),
            _num(row["agreement_mean"], ".4f"),
            _num(row["acc_retention_mean"], ".4f"),
        ]
        for row in rows
    ]
    return _table(header, body)


def _teacher_table(rows: list[dict]) -> list[str]:
    header = ["teacher", "cache key", "n jobs", "params", "test acc (mean ± std)"]
    body = [
        [
            row["teacher_arch"],
            row["teacher_key"],
            row["n_seeds"],
            _num(row["params_mean"], ",.0f"),
            _pm(row["acc_mean"], row["acc_std"]),
        ]
        for row in rows
    ]
    return _table(header, body)


def _problem_lines(records: list[dict]) -> list[str]:
    lines = []
    for record in records:
        if record["status"] == "ok":
            continue
        where = f" (`{record['path']}`)" if record["status"] == "unreadable" else ""
        overrides = job_overrides(record)
        settings = f" `{' '.join(overrides)}`" if overrides else ""
        lines.append(f"- `{record['job']}` **{record['status']}**{settings}{where}: {record['error']}")
    if lines:
        return lines
    return ["None: every job finished with status ok." if records else "None: no job folders yet."]


def job_overrides(record: dict[str, Any]) -> list[str]:
    """The overrides of a job: from its results.json, else from Hydra's ``.hydra/overrides.yaml``
    (a killed job wrote no results), so a problem job can be found and run again by hand."""
    overrides = record["results"].get("overrides")
    if isinstance(overrides, list):
        return [str(o) for o in overrides]
    folder = Path(record["path"])
    folder = folder if folder.is_dir() else folder.parent
    try:
        stored = OmegaConf.load(folder / ".hydra" / "overrides.yaml")
    except Exception:  # noqa: BLE001 - no folder, no file or bad YAML: the listing goes without them
        return []
    return [str(o) for o in stored] if isinstance(stored, ListConfig) else []


def problem_summary(records: list[dict[str, Any]]) -> list[str]:
    """One plain line per job that is not ok: folder, status, overrides and error."""
    return [
        f"job {r['job']} {r['status']} ({' '.join(job_overrides(r)) or 'no overrides'}): {r['error']}"
        for r in records
        if r["status"] != "ok"
    ]


def _table(header: list[str], body: list[list[Any]]) -> list[str]:
    def line(cells: list[Any]) -> str:
        text = ("" if cell is None else str(cell).replace("|", "\\|") for cell in cells)
        return "| " + " | ".join(text) + " |"

    return [line(header), line(["---"] * len(header))] + [line(cells) for cells in body]


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


# -- plotting ---------------------------------------------------------------------------------
def accuracy_figure(rows: list[dict[str, Any]], x: str = "params", title: str = "") -> Figure:
    """Accuracy against cost, so the cheapest model that is accurate enough can be read off.

    Drawn on its own Agg canvas: pyplot is never imported, so a user's interactive backend
    and open figures are left alone.
    """
    check_x(x)
    figure = Figure(figsize=(8, 5.5), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.set_title(title)
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
    _plot_methods(ax, students, key)
    _plot_front(ax, students, key)
    _plot_teachers(ax, [row for row in rows if row["role"] == "teacher"], key)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return figure


def _series(row: dict) -> str:
    """One marker per distillation method, and per compression method when there is one."""
    compress = str(row.get("compress") or "none")
    return f"method={row['method']}" + ("" if compress == "none" else f", compress={compress}")


def _plot_methods(ax: Any, rows: list[dict], key: str) -> None:
    for i, series in enumerate(sorted({_series(row) for row in rows})):
        mine = [row for row in rows if _series(row) == series]
        ax.errorbar(
            [row[key] for row in mine],
            [row["acc_mean"] for row in mine],
            yerr=[row["acc_std"] or 0.0 for row in mine],
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
        ax.step(
            xs,
            ys,
            where="post",
            color="0.35",
            linestyle="--",
            linewidth=1,
            zorder=1,
            marker="o",
            markersize=14,
            markerfacecolor="none",
            label="Pareto front",
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


# -- tuning trials (Optuna sweeps) ------------------------------------------------------------
OPTUNA_RESULTS = "optimization_results.yaml"  # written by the sweeper itself
BEST_TRIAL_FILE = "best_trial.yaml"


def tuning(sweep_dir: str | os.PathLike, records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The trials of an Optuna sweep (``hydra/sweeper=optuna``, e.g. ``sweep=tune_kd``) and the
    best one; None for any other sweep.

    A trial's objective is what ``cli.objective`` returned to the sweeper: the student's
    validation accuracy. Its test accuracy is carried along to be reported, never to choose.
    Ties go to the earlier trial, as in Optuna. Returns ``direction``, ``params`` (the searched
    keys), ``trials`` (one dict per job, in job order) and ``best`` (one of them, or None).
    """
    root = Path(sweep_dir)
    sweeper = _sweeper_config(root, records)
    if sweeper is None or "optuna" not in str(sweeper.get("_target_", "")).lower():
        return None
    direction = str(sweeper.get("direction") or "maximize")
    names = _search_space(root, sweeper)
    trials = [_trial(root, record, names) for record in records]
    scored = [trial for trial in trials if trial["status"] == "ok" and trial["val_acc"] is not None]
    pick = min if direction == "minimize" else max
    best = pick(scored, key=lambda trial: trial["val_acc"]) if scored else None
    return {"direction": direction, "params": names, "trials": trials, "best": best}


def _sweeper_config(root: Path, records: list[dict[str, Any]]) -> dict | None:
    """``hydra.sweeper`` as the first job saved it in ``.hydra/hydra.yaml``."""
    for record in records:
        path = root / record["job"] / ".hydra" / "hydra.yaml"
        if path.is_file():
            try:
                sweeper = OmegaConf.to_container(OmegaConf.load(path).hydra.sweeper, resolve=False)
            except Exception:  # noqa: BLE001 - unreadable: the report goes without trials
                return None
            return sweeper if isinstance(sweeper, dict) else None
    return None


def _search_space(root: Path, sweeper: dict) -> list[str]:
    """The searched keys: those the sweeper's own results name once the study has ended (they
    include a search space given on the command line, and leave out a key fixed there), else
    the sweeper's ``params`` that are sweeps."""
    try:
        best_params = OmegaConf.to_container(OmegaConf.load(root / OPTUNA_RESULTS)).get("best_params")
    except Exception:  # noqa: BLE001 - absent until the study ends
        best_params = None
    if isinstance(best_params, dict) and best_params:
        return [str(key) for key in best_params]
    parser = OverridesParser.create()
    names = []
    for key, value in (sweeper.get("params") or {}).items():
        try:
            if parser.parse_override(f"{key}={value}").is_sweep_override():
                names.append(str(key))
        except Exception:  # noqa: BLE001 - not an override the parser knows: not a searched key
            continue
    return names


def _trial(root: Path, record: dict[str, Any], names: list[str]) -> dict[str, Any]:
    overrides = job_overrides(record)
    values = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
    model = tuned_model(record["results"])  # the model cli.objective scored
    return {
        "trial": record["job"],
        "job_dir": str((root / record["job"]).resolve()),
        "status": record["status"],
        "params": {name: _scalar(values.get(name)) for name in names},
        "overrides": overrides,
        "val_acc": _finite(_dig(model, "val", "acc")),
        "test_acc": _finite(_dig(model, "test", "acc")),
    }


def _scalar(text: str | None) -> Any:
    """An override's value as the number it spells, else as given."""
    if text is None:
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def _finite(value: Any) -> float | None:
    numbers = _numbers([value])
    return numbers[0] if numbers else None


def tuning_markdown(tuned: dict[str, Any] | None) -> str:
    """A table of every trial with the best one marked; empty for a sweep that is no tuning."""
    if tuned is None:
        return ""
    best = tuned["best"]
    lines = [
        "",
        "## Tuning trials",
        "",
        f"Optuna proposed the settings of each trial to {tuned['direction']} the student's validation "
        "accuracy. Test accuracy is reported only, never used to choose.",
    ]
    if best is None:
        lines += ["", "No trial finished ok: there is no best trial yet."]
    else:
        settings = " ".join(f"`{name}={best['params'][name]}`" for name in tuned["params"])
        lines += [
            "",
            f"Best: trial {best['trial']} (val acc {best['val_acc']:.4f}): {settings}; in `{BEST_TRIAL_FILE}`.",
        ]
    header = ["best", "trial", *tuned["params"], "status", "val acc (objective)", "test acc (not used)"]
    body = [
        [
            "**best**" if trial is best else "",
            trial["trial"],
            *(_param_text(trial["params"][name]) for name in tuned["params"]),
            trial["status"],
            _num(trial["val_acc"], ".4f"),
            _num(trial["test_acc"], ".4f"),
        ]
        for trial in tuned["trials"]
    ]
    return "\n".join(lines + [""] + _table(header, body)) + "\n"


def _param_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def write_best_trial(sweep_dir: Path, tuned: dict[str, Any]) -> Path | None:
    """``best_trial.yaml``: the best trial's settings, scores, folder and a command that trains
    that setting again as a single run. Logged as one line too. None when no trial is ok."""
    best = tuned["best"]
    if best is None:
        log.warning("tuning: no trial finished ok, so there is no best trial")
        return None
    single = [o for o in best["overrides"] if not o.lstrip("+~").startswith("sweep=")]
    content = {
        "trial": _scalar(best["trial"]),
        "job_dir": best["job_dir"],
        "objective": "student val acc",
        "direction": tuned["direction"],
        "val_acc": best["val_acc"],
        "test_acc": best["test_acc"],
        "params": best["params"],
        "overrides": best["overrides"],
        "command": " ".join(["python train.py", *single]),
    }
    header = (
        "# The tuning trial with the best student validation accuracy (the objective).\n"
        "# test_acc is reported only: it never took part in the choice.\n"
    )
    path = atomic_write_text(sweep_dir / BEST_TRIAL_FILE, header + OmegaConf.to_yaml(content))
    settings = " ".join(f"{name}={best['params'][name]}" for name in tuned["params"])
    log.info("best trial %s: val acc %.4f: %s (%s)", best["trial"], best["val_acc"], settings, path)
    return path


# -- files, command line and Hydra ------------------------------------------------------------
def write_report(sweep_dir: str | os.PathLike, x: str = "params") -> dict[str, Path]:
    """Write the report next to the jobs, so it travels with the sweep folder.

    Returns the paths under the keys ``csv``, ``markdown`` and ``plot``, and ``best_trial``
    for a tuning sweep with a finished trial.
    """
    check_x(x)
    root = Path(sweep_dir)
    records = collect(root)
    rows = summarize(records, x)
    tuned = tuning(root, records)
    title = "/".join(root.resolve().parts[-2:])
    figure = accuracy_figure(rows, x, f"Test accuracy vs {x}: {title}")
    markdown = markdown_text(records, rows, x, title) + tuning_markdown(tuned)
    paths = {
        "csv": atomic_write_text(root / "summary.csv", csv_text(rows)),
        "markdown": atomic_write_text(root / "summary.md", markdown),
        "plot": atomic_save(
            root / f"accuracy_vs_{x}.png", lambda handle: figure.savefig(handle, format="png", dpi=120)
        ),
    }
    best = write_best_trial(root, tuned) if tuned else None
    return paths | ({"best_trial": best} if best else {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m distillab.report", description="Summarize the results.json files of a Hydra multirun sweep."
    )
    parser.add_argument("sweep_dir", type=Path, help="the sweep folder (hydra.sweep.dir)")
    parser.add_argument(
        "--x",
        choices=list(X_AXES),
        default="params",
        help="cost on the x axis and for the Pareto front (default: params)",
    )
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: no such sweep folder: {args.sweep_dir}", file=sys.stderr)
        return 2
    paths = write_report(args.sweep_dir, args.x)
    print(paths["markdown"].read_text())
    for path in paths.values():
        print(f"wrote {path}")
    return 0


class SweepReportCallback(Callback):
    """Writes the report when a multirun ends.

    Any error is logged as one line and swallowed: the jobs' results are already on disk, and
    a failing plot must not turn a finished sweep into a failed command.
    """

    def __init__(self, x: str = "params") -> None:
        check_x(x)
        self.x = x

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            paths = write_report(str(config.hydra.sweep.dir), self.x)
        except Exception as exc:  # logged, never raised
            log.error("sweep report failed: %s: %s", type(exc).__name__, _one_line(str(exc)))
            return
        for name, path in paths.items():
            log.info("sweep report %s: %s", name, path)
        _log_problems(Path(str(config.hydra.sweep.dir)))
        log_summary_run(config, Path(str(config.hydra.sweep.dir)), paths["plot"], self.x)


def _log_problems(sweep_dir: Path) -> None:
    """Failed, missing and unreadable jobs on the console too, not only in summary.md."""
    try:
        records = collect(sweep_dir)
    except Exception as exc:  # logged, never raised
        log.error("sweep report failed: %s: %s", type(exc).__name__, _one_line(str(exc)))
        return
    problems = problem_summary(records)
    if problems:
        log.warning(
            "sweep report: %d of %d jobs did not finish ok; re-run the same command to run them again",
            len(problems),
            len(records),
        )
    for line in problems:
        log.warning("  %s", line)


def log_summary_run(config: DictConfig, sweep_dir: Path, plot: Path, x: str = "params") -> None:
    """When the sweep's jobs logged to wandb, one more run of their group holds the summary table
    and the plot (``loggers.log_sweep_summary``). Errors are logged as one line, never raised."""
    from distillab import loggers  # imports Lightning: only when a sweep ends

    try:
        if loggers.uses_wandb(config.get("logger")):
            loggers.log_sweep_summary(config.logger.wandb, sweep_dir, COLUMNS, summarize(collect(sweep_dir), x), plot)
    except Exception as exc:  # logged, never raised
        log.error("wandb sweep summary failed: %s: %s", type(exc).__name__, _one_line(str(exc)))


if __name__ == "__main__":
    sys.exit(main())
