"""Sweep report: tables, paired comparisons and plots from the ``results.json`` files of one or
several multirun folders.

Jobs with the same configuration (everything but ``seed`` and ``data.split_seed``) are replicates
of one setting: they are averaged, with a t-interval (``summary.py``). Configurations that differ
in the method or the compression alone are compared replicate by replicate, with a paired
t-test and Holm's correction (``compare.py``, ``stats.py``). Jobs that failed, never wrote
results or wrote a file that does not parse are listed by name: a sweep that looks complete
but is not is worse than one that plainly says which jobs are missing.

Run it by hand with ``distillab-report DIR [DIR ...] [--out DIR] [--x params]``, or let Hydra
run it after every multirun through ``SweepReportCallback`` (``hydra.callbacks.report``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from distillab.io import atomic_save, atomic_write_text
from distillab.report import render
from distillab.report.compare import COMPARISON_COLUMNS, comparisons
from distillab.report.jobs import (
    RESULTS_FILE,
    X_AXES,
    check_x,
    collect,
    collect_many,
    frame,
    job_overrides,
    one_line,
    problem_summary,
    sweep_labels,
)
from distillab.report.plots import accuracy_figure, forest_figure
from distillab.report.render import csv_text, markdown_text
from distillab.report.summary import COLUMNS, shared_overrides, summarize
from distillab.report.tuning import BEST_TRIAL_FILE, tuning, tuning_markdown, write_best_trial

__all__ = [
    "BEST_TRIAL_FILE",
    "COLUMNS",
    "COMPARISON_COLUMNS",
    "RESULTS_FILE",
    "X_AXES",
    "SweepReportCallback",
    "accuracy_figure",
    "collect",
    "collect_many",
    "comparisons",
    "csv_text",
    "forest_figure",
    "job_overrides",
    "markdown_text",
    "problem_summary",
    "shared_overrides",
    "summarize",
    "write_report",
]

log = logging.getLogger("distillab.report")


def write_report(
    sweep_dirs: str | os.PathLike | Sequence[str | os.PathLike], x: str = "params", out: str | os.PathLike | None = None
) -> dict[str, Path]:
    """Write the report of one sweep folder next to its jobs, or of several into ``out``.

    Files: ``summary.csv``, ``summary.md``, ``comparisons.csv``, ``comparisons.md``,
    ``comparisons_forest.png`` (forest plot) and ``accuracy_vs_<x>.png`` for each cost of ``X_AXES``;
    ``best_trial.yaml`` for a tuning sweep with a finished trial. Returns their paths under
    ``csv``, ``markdown``, ``comparisons_csv``, ``comparisons_markdown``, ``forest``, ``plot``
    (the plot of ``x``), ``plot_<other x>`` and ``best_trial``.
    """
    check_x(x)
    folders = [Path(sweep_dirs)] if isinstance(sweep_dirs, (str, os.PathLike)) else [Path(d) for d in sweep_dirs]
    if not folders:
        raise ValueError("no sweep folder given")
    if len(folders) > 1 and out is None:
        raise ValueError("several sweep folders need --out DIR, the folder for the pooled report")
    target = Path(out) if out is not None else folders[0]
    records = collect_many(folders)
    sweeps = sweep_labels(folders)
    jobs = frame(records)
    rows = summarize(records, x)
    compared = _compare(jobs, rows)
    title = sweeps[0] if len(folders) == 1 else f"{len(folders)} sweeps into {'/'.join(target.resolve().parts[-2:])}"
    tuned = tuning(folders[0], records) if len(folders) == 1 else None
    target.mkdir(parents=True, exist_ok=True)
    markdown = markdown_text(records, rows, x, title, sweeps, compared) + tuning_markdown(tuned)
    if jobs.attrs.get("duplicates"):
        markdown += (
            f"\n{jobs.attrs['duplicates']} jobs repeat a replicate another folder already holds; the first was kept.\n"
        )
    paths = {
        "csv": atomic_write_text(target / "summary.csv", csv_text(rows)),
        "markdown": atomic_write_text(target / "summary.md", markdown),
        "comparisons_csv": atomic_write_text(target / "comparisons.csv", render.comparisons_csv(compared)),
        "comparisons_markdown": atomic_write_text(
            target / "comparisons.md", render.comparisons_markdown(compared, jobs, title, sweeps)
        ),
    }
    test_samples = jobs["test_samples"].dropna()
    samples = int(test_samples.mode().iloc[0]) if len(test_samples) else None
    figures = {
        "forest": ("comparisons_forest", forest_figure(compared, f"Paired differences: {title}", samples, sweeps))
    }
    for name in sorted(X_AXES, key=lambda name: name != x):
        figures["plot" if name == x else f"plot_{name}"] = (
            f"accuracy_vs_{name}",
            accuracy_figure(rows, name, f"Test accuracy vs {name}: {title}", sweeps),
        )
    for key, (stem, figure) in figures.items():
        paths[key] = atomic_save(
            target / f"{stem}.png", lambda handle, f=figure: f.savefig(handle, format="png", dpi=120)
        )
    best = write_best_trial(folders[0], tuned) if tuned else None
    return paths | ({"best_trial": best} if best else {})


def _compare(jobs: Any, rows: list[dict[str, Any]]) -> Any:
    """The comparisons table, each configuration named by its row's ``setting`` in the summary."""
    settings = {row["group"]: row["setting"] for row in rows if row["role"] == "student"}
    labels = {
        key: settings.get(runs["group"].iloc[0], runs["group"].iloc[0]) for key, runs in jobs.groupby("setting_key")
    }
    return comparisons(jobs, labels)


def parser() -> argparse.ArgumentParser:
    """The command line of ``distillab-report`` (also ``python -m distillab.report``)."""
    parser = argparse.ArgumentParser(
        prog="distillab-report",
        description="Summarize and compare the results.json files of one or several Hydra multirun sweeps.",
    )
    parser.add_argument("sweep_dirs", type=Path, nargs="+", metavar="DIR", help="a sweep folder (hydra.sweep.dir)")
    parser.add_argument(
        "--out", type=Path, help="where the report goes (default: the sweep folder; needed for several)"
    )
    parser.add_argument(
        "--x",
        choices=list(X_AXES),
        default="params",
        help="cost for the Pareto front and the first plot (default: params)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser_ = parser()
    args = parser_.parse_args(argv)
    missing = [str(d) for d in args.sweep_dirs if not d.is_dir()]
    if missing:
        print(f"error: no such sweep folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    if len(args.sweep_dirs) > 1 and args.out is None:
        print("error: several sweep folders need --out DIR, the folder for the pooled report", file=sys.stderr)
        return 2
    paths = write_report(args.sweep_dirs, args.x, args.out)
    print(paths["markdown"].read_text())
    print(paths["comparisons_markdown"].read_text())
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
            sweep_dir = Path(str(config.hydra.sweep.dir))
            paths = write_report(sweep_dir, self.x)
        except Exception as exc:  # logged, never raised
            log.error("sweep report failed: %s: %s", type(exc).__name__, one_line(str(exc)))
            return
        for name, path in paths.items():
            log.info("sweep report %s: %s", name, path)
        _log_problems(sweep_dir)
        log_summary_run(config, sweep_dir, paths, self.x)


def _log_problems(sweep_dir: Path) -> None:
    """Failed, missing and unreadable jobs on the console too, not only in summary.md."""
    try:
        records = collect(sweep_dir)
    except Exception as exc:  # logged, never raised
        log.error("sweep report failed: %s: %s", type(exc).__name__, one_line(str(exc)))
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


def log_summary_run(config: DictConfig, sweep_dir: Path, paths: dict[str, Path], x: str = "params") -> None:
    """When the sweep's jobs logged to wandb, one more run of their group holds the summary and
    comparisons tables and the plots (``loggers.log_sweep_summary``). Errors are logged as one
    line, never raised."""
    from distillab import loggers  # imports Lightning: only when a sweep ends

    try:
        if loggers.uses_wandb(config.get("logger")):
            records = collect(sweep_dir)
            rows = summarize(records, x)
            tables = {
                "summary": (COLUMNS, rows),
                "comparisons": (COMPARISON_COLUMNS, _compare(frame(records), rows).to_dict("records")),
            }
            loggers.log_sweep_summary(config.logger.wandb, sweep_dir, tables, [paths["plot"], paths["forest"]])
    except Exception as exc:  # logged, never raised
        log.error("wandb sweep summary failed: %s: %s", type(exc).__name__, one_line(str(exc)))
