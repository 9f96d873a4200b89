"""Rows per configuration: test accuracy over replicates with its t-interval, costs, the
Pareto front (chosen on validation accuracy), and one reference row per teacher."""

from __future__ import annotations

from typing import Any

import pandas as pd

from distillab.report import stats
from distillab.report.jobs import X_AXES, check_x, dig, frame, number

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
    "split_seeds",
    "acc_mean",
    "acc_std",
    "acc_ci_low",
    "acc_ci_high",
    "f1_mean",
    "f1_std",
    "val_acc_mean",
    "params_mean",
    "size_bytes_mean",
    "macs_mean",
    "latency_ms_mean",
    "agreement_mean",
    "ece_mean",
    "acc_retention_mean",
    "pareto",
    "sweeps",
]


def summarize(records: list[dict[str, Any]], x: str = "params") -> list[dict[str, Any]]:
    """Rows per configuration over the ok jobs, then one reference row per teacher.

    Student rows (``role`` = student) are sorted by the mean of ``x``. ``pareto`` marks the
    configurations no other one beats on both ``x`` (lower) and **validation** accuracy
    (higher): the front is a choice, so it is made on the validation split, and the test
    accuracy of the chosen rows is what they report. Teacher rows never take part in the front.
    Every row has the keys of ``COLUMNS``; a std and an interval are None for one replicate.
    """
    check_x(x)
    jobs = frame(records)
    rows = [_student_row(runs) for _, runs in jobs.groupby("setting_key", sort=False)]
    shared = shared_overrides([row["group"] for row in rows])
    for row in rows:
        row["setting"] = " ".join(o for o in row["group"].split(" ") if o not in shared) or row["group"]
    mark_pareto(rows, f"{x}_mean")
    rows.sort(key=lambda row: (row[f"{x}_mean"] is None, row[f"{x}_mean"] or 0, row["group"]))
    return rows + _teacher_rows(records)


def shared_overrides(groups: list[str]) -> list[str]:
    """Overrides every configuration has (e.g. ``trainer.max_epochs=50``): they say nothing about
    how rows differ, so tables and plots name rows by the rest."""
    if len(groups) < 2:
        return []
    return sorted(set.intersection(*(set(group.split(" ")) for group in groups)))


def _student_row(runs: pd.DataFrame) -> dict[str, Any]:
    row = dict.fromkeys(COLUMNS)
    row.update(
        role="student",
        group=runs["group"].iloc[0],
        **{key: distinct(runs[key]) for key in ("method", "compress", "evaluated", "student_arch", "teacher_arch")},
        teacher_key=distinct(runs["teacher_key"]),
        acc_retention_mean=_mean(runs["acc_retention"]),
        sweeps=distinct(runs["sweep"], sort=False, sep=" "),
        **spread(runs),
    )
    for name in X_AXES:
        row[f"{name}_mean"] = _mean(runs[name])
    return row


def spread(runs: pd.DataFrame) -> dict[str, Any]:
    """Replicate counts, and accuracy and F1 over the replicates."""
    acc, f1 = stats.interval(runs["acc"].tolist()), stats.interval(runs["f1"].tolist())
    return {
        "n_seeds": len(runs),
        "seeds": _ints(runs["seed"]),
        "split_seeds": _ints(runs["split_seed"]),
        "acc_mean": acc.mean,
        "acc_std": acc.std,
        "acc_ci_low": acc.low,
        "acc_ci_high": acc.high,
        "f1_mean": f1.mean,
        "f1_std": f1.std,
        "val_acc_mean": _mean(runs["val_acc"]),
        "agreement_mean": _mean(runs["agreement"]),
        "ece_mean": _mean(runs["ece"]),
    }


def _teacher_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per teacher cache key; an ensemble's members get rows next to the ensemble's."""
    blocks = []
    for record in records:
        results = record["results"]
        if record["status"] != "ok":
            continue
        for teacher in [results.get("teacher"), *(results.get("teachers") or [])]:
            if isinstance(teacher, dict):
                blocks.append(
                    {
                        "key": _teacher_key(teacher),
                        "arch": teacher.get("arch"),
                        "sweep": record.get("sweep"),
                        "seed": results.get("seed"),
                        "split_seed": results.get("split_seed"),
                        "acc": number(dig(teacher, "test", "acc")),
                        "f1": number(dig(teacher, "test", "f1")),
                        "val_acc": None,
                        "agreement": None,
                        "ece": number(dig(teacher, "calibration", "ece")),
                        **{name: number(dig(teacher, *keys)) for name, (keys, _) in X_AXES.items()},
                    }
                )
    rows = []
    for key, runs in pd.DataFrame(blocks).groupby("key", sort=True) if blocks else []:
        row = dict.fromkeys(COLUMNS)
        arch = distinct(runs["arch"])
        row.update(
            role="teacher",
            group=f"teacher {arch} [{key[:8]}]" if ":" not in key else f"teacher {key}",
            method="teacher",
            evaluated="teacher",
            teacher_arch=arch,
            teacher_key=key,
            pareto=False,
            sweeps=distinct(runs["sweep"], sort=False, sep=" "),
            **spread(runs),
        )
        row.update({f"{name}_mean": _mean(runs[name]) for name in X_AXES})
        rows.append(row)
    return sorted(rows, key=lambda row: row["group"])


def _teacher_key(teacher: dict) -> str:
    """A teacher's cache key; a teacher without one (trained alongside the student, ``cotrained``,
    or unknown) by how it was obtained, its architecture and size, so unlike ones never share a row."""
    if teacher.get("cache_key"):
        return str(teacher["cache_key"])
    return f"{teacher.get('cache') or 'unknown'}:{teacher.get('arch') or 'model'}:{teacher.get('params')}"


def mark_pareto(rows: list[dict], key: str, accuracy: str = "val_acc_mean") -> None:
    """``pareto`` is true for the rows no other row dominates on (``key`` low, ``accuracy`` high)."""
    points = [(row[key], row[accuracy]) for row in rows]
    for row, point in zip(rows, points, strict=True):
        row["pareto"] = None not in point and not any(dominates(other, point) for other in points)


def dominates(a: tuple, b: tuple) -> bool:
    """``a`` costs no more and is no less accurate than ``b``, and differs in one of them."""
    return None not in a and a[0] <= b[0] and a[1] >= b[1] and a != b


def _mean(values: pd.Series) -> float | None:
    numbers = pd.to_numeric(values, errors="coerce").dropna()
    return float(numbers.mean()) if len(numbers) else None


def _ints(values: pd.Series) -> list[int]:
    return sorted({int(v) for v in values if number(v) is not None})


def distinct(values: pd.Series, sort: bool = True, sep: str = "/") -> str | None:
    """The shared value of a row's jobs; jobs that disagree show every value."""
    seen = [str(v) for v in dict.fromkeys(values) if v is not None and not (isinstance(v, float) and pd.isna(v))]
    return sep.join(sorted(seen) if sort else seen) or None
