"""Reading sweep folders: one record per job folder, and a table of the jobs that finished ok.

A job's *configuration* is everything but its replicate, ``seed`` and ``data.split_seed``: jobs
with the same configuration are replicates of one setting and are averaged; jobs of two
configurations that share a replicate are compared pair by pair (``compare.py``). The
configuration is the ``setting_hashes`` a run writes into results.json, so identical
configurations of several sweep folders merge however their command lines spelled them.
Results written before those hashes existed are grouped by their overrides instead.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import ListConfig, OmegaConf

RESULTS_FILE = "results.json"
# folders that hold artefacts of a job, never a job of their own
SKIP_DIRS = frozenset({".hydra", "wandb", "teacher_cache", "checkpoints"})
REPLICATE_KEYS = ("seed", "data.split_seed")
# x name -> (keys inside a model block, axis label with unit)
X_AXES: dict[str, tuple[tuple[str, ...], str]] = {
    "params": (("params",), "parameters (count)"),
    "size_bytes": (("size_bytes",), "model size (bytes)"),
    "macs": (("macs",), "multiply-accumulates per sample (count)"),
    "latency_ms": (("latency_ms", "batch_64"), "latency per batch of 64 (ms)"),
}


def check_x(x: str) -> None:
    if x not in X_AXES:
        raise ValueError(f"x={x!r} is not allowed: use one of {', '.join(X_AXES)}")


# -- records ----------------------------------------------------------------------------------
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


def collect_many(folders: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """The records of several sweep folders, in the given order; each names its ``sweep`` and,
    when there are several, its ``job`` starts with that name."""
    labels = sweep_labels(folders)
    records = []
    for folder, label in zip(folders, labels, strict=True):
        for record in collect(folder):
            record["sweep"] = label
            if len(folders) > 1:
                record["job"] = f"{label}/{record['job']}"
            records.append(record)
    return records


def sweep_labels(folders: Sequence[str | os.PathLike]) -> list[str]:
    """Short names for sweep folders: the last two parts of each path (``<date>/<time>`` for
    Hydra's default), or the whole path when two folders would share a name."""
    paths = [Path(folder).resolve() for folder in folders]
    short = ["/".join(path.parts[-2:]) for path in paths]
    return short if len(set(short)) == len(short) else [str(path) for path in paths]


def _read_job(job: str, path: Path) -> dict[str, Any]:
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        why = f"cannot parse {RESULTS_FILE}: {one_line(str(exc))}"
        return _record(job, "unreadable", path, error=why)
    status = results.get("status") if isinstance(results, dict) else None
    if status not in ("ok", "failed"):
        why = f"status is {status!r}, expected 'ok' or 'failed'"
        return _record(job, "unreadable", path, error=why)
    error = None
    if status == "failed":
        error = one_line(str(results.get("error") or "")) or "failed without an error message"
    return _record(job, status, path, results=results, error=error)


def _record(job: str, status: str, path: Path, results: dict | None = None, error: str | None = None) -> dict[str, Any]:
    return {"job": job, "status": status, "path": str(path), "error": error, "results": results or {}}


def _natural_key(text: str) -> list:
    """Digits compare as numbers, so job 2 sorts before job 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


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


# -- the table of ok jobs ---------------------------------------------------------------------
def dig(mapping: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


def number(value: Any) -> float | None:
    """A finite number, else None: one odd job cannot hide a whole row."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)
    return float(value) if ok else None


def evaluated(results: dict) -> dict:
    """The compressed model when there is one: it is what would be deployed."""
    block = results.get("compressed") or results.get("student")
    return block if isinstance(block, dict) else {}


def _key_of(token: str) -> str:
    return token.split("=", 1)[0].lstrip("+~")


def label_of(group: str) -> str:
    """A configuration's name: its overrides without the replicate."""
    kept = [t for t in str(group).split(" ") if t and _key_of(t) not in REPLICATE_KEYS]
    return " ".join(kept) or "(defaults)"


def _without(label: str, part: str) -> str:
    return " ".join(t for t in label.split(" ") if _key_of(t) != part and not _key_of(t).startswith(part + "."))


JOB_COLUMNS = [
    "sweep",
    "job",
    "group",
    "setting_key",
    "context_distill",
    "context_compress",
    "seed",
    "split_seed",
    "replicate",
    "method",
    "compress",
    "evaluated",
    "student_arch",
    "teacher_arch",
    "teacher_key",
    "acc",
    "f1",
    "val_acc",
    "agreement",
    "ece",
    "acc_retention",
    "test_samples",
    *X_AXES,
]


def frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per ok job (columns ``JOB_COLUMNS``), in record order. A replicate that two sweep
    folders both hold is kept once, from the first folder (``attrs["duplicates"]`` counts the
    rest)."""
    rows = [_job_row(record) for record in records if record["status"] == "ok"]
    jobs = pd.DataFrame(rows, columns=JOB_COLUMNS)
    repeated = jobs.duplicated(["setting_key", "replicate"])
    jobs = jobs[~repeated].reset_index(drop=True)
    jobs.attrs["duplicates"] = int(repeated.sum())
    return jobs


def _job_row(record: dict[str, Any]) -> dict[str, Any]:
    results = record["results"]
    model = evaluated(results)
    group = label_of(results.get("group") or "(defaults)")
    hashes = results.get("setting_hashes") if isinstance(results.get("setting_hashes"), dict) else {}
    seed, split = results.get("seed"), results.get("split_seed")
    row = {
        "sweep": record.get("sweep"),
        "job": record["job"],
        "group": group,
        # old results without hashes: the overrides say what differs
        "setting_key": hashes.get("setting") or f"overrides:{group}",
        "context_distill": hashes.get("without_distill") or f"overrides:{_without(group, 'distill')}",
        "context_compress": hashes.get("without_compress") or f"overrides:{_without(group, 'compress')}",
        "seed": seed,
        "split_seed": split,
        "replicate": f"{seed}/{split}",
        "method": results.get("method"),
        "compress": results.get("compress"),
        "evaluated": "compressed" if "compressed" in results else "student",
        "student_arch": model.get("arch"),
        "teacher_arch": dig(results, "teacher", "arch"),
        "teacher_key": dig(results, "teacher", "cache_key"),
        "acc": number(dig(model, "test", "acc")),
        "f1": number(dig(model, "test", "f1")),
        "val_acc": number(dig(model, "val", "acc")),
        "agreement": number(dig(model, "test", "agreement")),
        "ece": number(dig(model, "calibration", "ece")),
        "acc_retention": number(dig(results, "ratios", "acc_retention")),
        "test_samples": number(results.get("test_samples")),
    }
    for name, (keys, _) in X_AXES.items():
        row[name] = number(dig(model, *keys))
    return row
