"""The report's files as text: ``summary.csv``, ``summary.md``, ``comparisons.csv``, ``comparisons.md``."""

from __future__ import annotations

from io import StringIO
from typing import Any

import pandas as pd

from distillab.report import stats
from distillab.report.compare import COMPARISON_COLUMNS
from distillab.report.jobs import job_overrides
from distillab.report.summary import COLUMNS, shared_overrides


# -- CSV --------------------------------------------------------------------------------------
def csv_text(rows: list[dict[str, Any]], columns: list[str] = COLUMNS) -> str:
    """Lists are space-separated, booleans lower-case, missing values empty."""
    cells = [[_csv_value(row.get(column)) for column in columns] for row in rows]
    buffer = StringIO()
    pd.DataFrame(cells, columns=columns, dtype=object).to_csv(buffer, index=False, lineterminator="\n")
    return buffer.getvalue()


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return value


# -- summary.md -------------------------------------------------------------------------------
def markdown_text(
    records: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    x: str,
    title: str,
    sweeps: list[str] | None = None,
    compared: pd.DataFrame | None = None,
) -> str:
    students = [row for row in rows if row["role"] == "student"]
    teachers = [row for row in rows if row["role"] == "teacher"]
    lines = [f"# Sweep report: {title}", "", *sweeps_lines(sweeps), counts(records), ""]
    lines += ["## Students", ""]
    if students:
        lines += [
            "Test metrics of the evaluated model (compressed when present, else the student) over the "
            "replicates of each configuration (its seeds, and its data split seeds when the sweep varies "
            "them): mean ± std and the 95 % t-interval of the mean. Pareto: chosen on **validation** "
            f"accuracy, no other row has {x} as low and validation accuracy as high, and one of them "
            "strictly better; the test accuracy of the chosen rows is reported, not used to choose.",
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
    if compared is not None:
        lines += ["", "## Paired comparisons", "", verdict_counts(compared) + " Details in `comparisons.md`."]
    lines += ["", "## Jobs not included", ""] + _problem_lines(records)
    return "\n".join(lines) + "\n"


def sweeps_lines(sweeps: list[str] | None) -> list[str]:
    if not sweeps or len(sweeps) < 2:
        return []
    return [f"Pooled from {len(sweeps)} sweep folders: " + ", ".join(f"`{s}`" for s in sweeps) + ".", ""]


def counts(records: list[dict]) -> str:
    statuses = ("ok", "failed", "missing", "unreadable")
    text = ", ".join(f"{sum(r['status'] == s for r in records)} {s}" for s in statuses)
    return f"{len(records)} jobs: {text}."


def _student_table(rows: list[dict]) -> list[str]:
    header = [
        "Pareto",
        "setting",
        "method",
        "compress",
        "arch",
        "n seeds",
        "acc (mean ± std)",
        "acc 95 % CI",
        "f1 (mean ± std)",
        "val acc",
        "params",
        "size (bytes)",
        "MACs",
        "latency b64 (ms)",
        "agreement",
        "ECE",
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
            pm(row["acc_mean"], row["acc_std"]),
            interval(row["acc_ci_low"], row["acc_ci_high"]),
            pm(row["f1_mean"], row["f1_std"]),
            num(row["val_acc_mean"], ".4f"),
            num(row["params_mean"], ",.0f"),
            num(row["size_bytes_mean"], ",.0f"),
            num(row["macs_mean"], ",.0f"),
            num(row["latency_ms_mean"], ".3f"),
            num(row["agreement_mean"], ".4f"),
            num(row["ece_mean"], ".4f"),
            num(row["acc_retention_mean"], ".4f"),
        ]
        for row in rows
    ]
    return table(header, body)


def _teacher_table(rows: list[dict]) -> list[str]:
    header = ["teacher", "cache key", "n jobs", "params", "test acc (mean ± std)"]
    body = [
        [
            row["teacher_arch"],
            row["teacher_key"],
            row["n_seeds"],
            num(row["params_mean"], ",.0f"),
            pm(row["acc_mean"], row["acc_std"]),
        ]
        for row in rows
    ]
    return table(header, body)


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


# -- comparisons.md ---------------------------------------------------------------------------
def verdict_counts(compared: pd.DataFrame) -> str:
    if compared.empty:
        return "No two configurations differ in the method or the compression alone: nothing to compare."
    tally = compared["verdict"].value_counts()
    parts = [f"{tally.get(v, 0)} {v}" for v in ("better", "worse", "not distinguishable")]
    few = int(sum(tally.get(v, 0) for v in tally.index if v.startswith("fewer")))
    return (
        f"{len(compared)} comparisons: " + ", ".join(parts) + (f", {few} with fewer than 2 pairs" if few else "") + "."
    )


def comparisons_markdown(
    compared: pd.DataFrame, jobs: pd.DataFrame, title: str, sweeps: list[str] | None = None
) -> str:
    lines = [f"# Paired comparisons: {title}", "", *sweeps_lines(sweeps), verdict_counts(compared), ""]
    lines += [
        "Each row compares two configurations that differ in the distillation method alone "
        "(`kind` distill: each method against `distill=none` and against each other) or in the "
        "compression alone (`kind` compress: against `compress=none`), on the replicates they share: "
        "jobs are paired by (`seed`, `data.split_seed`). diff = candidate − baseline test accuracy, "
        f"averaged over the pairs, with the {stats.LEVEL:.0%} t-interval of the mean difference; p is "
        f"the two-sided paired t-test, adjusted by Holm's method over the {len(compared)} rows of this "
        f"table; the verdict is at α = {stats.ALPHA} on the adjusted p.",
        "",
        *noise_floor(compared, jobs),
    ]
    if not compared.empty:
        lines += ["", *_comparison_table(compared)]
    return "\n".join(lines) + "\n"


def noise_floor(compared: pd.DataFrame, jobs: pd.DataFrame) -> list[str]:
    """How large one test sample is, and how many pairs the observed differences would need."""
    sizes = sorted({int(n) for n in jobs["test_samples"].dropna()}) if not jobs.empty else []
    if sizes:
        floor = "; ".join(f"{n} test samples: one sample is {1 / n:.4f} accuracy" for n in sizes)
        lines = [f"**Noise floor.** {floor}."]
    else:
        lines = ["**Noise floor.** The test-set size is not in these results.json files (written by an older version)."]
    unclear = compared[compared["verdict"] == "not distinguishable"] if not compared.empty else compared
    needed = [int(n) for n in unclear.get("pairs_for_80pct_power", []) if n is not None]
    if len(unclear):
        detail = (
            f"detecting their observed mean differences with {stats.POWER:.0%} power (two-sided paired t-test, "
            f"α = {stats.ALPHA}, unadjusted, from each row's observed std of the differences) would take "
            + _pairs_range(needed)
        )
        zero = len(unclear) - len(needed)
        lines.append(
            f"{len(unclear)} {'row is' if len(unclear) == 1 else 'rows are'} not distinguishable: {detail}"
            + (
                f"; {zero} of them differ by nothing or need more than {stats.MAX_PAIRS:,} pairs"
                if zero and needed
                else ""
            )
            + ". A row's own figure is in the column `pairs for 80 % power`."
        )
    return lines


def _pairs_range(needed: list[int]) -> str:
    if not needed:
        return "no finite number of pairs"
    if min(needed) == max(needed):
        return f"{needed[0]} pairs"
    return f"{min(needed)} to {max(needed)} pairs (median {int(pd.Series(needed).median())})"


def _comparison_table(compared: pd.DataFrame) -> list[str]:
    header = [
        "kind",
        "baseline",
        "candidate",
        "n pairs",
        "diff (mean)",
        "95 % CI",
        "p",
        "p (Holm)",
        "verdict",
        "pairs for 80 % power",
    ]
    body = [
        [
            row["kind"],
            row["baseline"],
            row["candidate"],
            row["n_pairs"],
            num(row["diff_mean"], "+.4f"),
            interval(row["diff_ci_low"], row["diff_ci_high"], "+.4f"),
            num(row["p_value"], ".3g"),
            num(row["p_adjusted"], ".3g"),
            f"**{row['verdict']}**" if row["verdict"] in ("better", "worse") else row["verdict"],
            "n/a" if row["pairs_for_80pct_power"] is None else row["pairs_for_80pct_power"],
        ]
        for row in compared.to_dict("records")
    ]
    return table(header, body)


def comparisons_csv(compared: pd.DataFrame) -> str:
    return csv_text(compared.to_dict("records"), COMPARISON_COLUMNS)


# -- cells ------------------------------------------------------------------------------------
def table(header: list[str], body: list[list[Any]]) -> list[str]:
    def line(cells: list[Any]) -> str:
        text = ("" if cell is None else str(cell).replace("|", "\\|") for cell in cells)
        return "| " + " | ".join(text) + " |"

    return [line(header), line(["---"] * len(header))] + [line(cells) for cells in body]


def pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def interval(low: float | None, high: float | None, spec: str = ".4f") -> str:
    return "n/a" if low is None or high is None else f"[{low:{spec}}, {high:{spec}}]"


def num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
