"""The trials of an Optuna sweep (``hydra/sweeper=optuna``, e.g. ``sweep=tune_kd``) in the
report, and ``best_trial.yaml``: the best trial by the student's validation accuracy."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from distillab.io import atomic_write_text
from distillab.report.jobs import dig, job_overrides, number
from distillab.report.render import num, table
from distillab.results import tuned_model

log = logging.getLogger("distillab.report")

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
    """``hydra.sweeper`` as the first job that saved it whole saved it in ``.hydra/hydra.yaml``."""
    for record in records:
        path = root / record["job"] / ".hydra" / "hydra.yaml"
        if path.is_file():
            try:
                sweeper = OmegaConf.to_container(OmegaConf.load(path).hydra.sweeper, resolve=False)
            except Exception:  # noqa: BLE001 - a job killed while Hydra wrote the file: the next job's
                continue
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
        "val_acc": number(dig(model, "val", "acc")),
        "test_acc": number(dig(model, "test", "acc")),
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
            num(trial["val_acc"], ".4f"),
            num(trial["test_acc"], ".4f"),
        ]
        for trial in tuned["trials"]
    ]
    return "\n".join(lines + [""] + table(header, body)) + "\n"


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
