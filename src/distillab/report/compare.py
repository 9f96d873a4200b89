"""Paired comparisons: which configuration beats which, with a test, not by eye.

Two configurations are compared when they differ in one part alone, the distillation method
(``distill`` and its settings) or the compression (``compress``), and everything else is the
same: student, teacher, data, schedule. Their jobs are paired by replicate, (``seed``,
``data.split_seed``), so the seed's and the split's luck cancel in each difference.

- Within a *distill family* (same configuration apart from the method) every method is compared
  with ``distill=none``, the baseline, and with every other method.
- Within a *compress family* (same configuration apart from the compression) every compression
  is compared with ``compress=none``.

Several baseline configurations in one family (``compress=none`` with each ``compress.amount``
a sweep gave it) are one baseline: they train the same model. Holm's correction runs over all
rows of the table.
"""

from __future__ import annotations

import itertools
from typing import Any

import pandas as pd

from distillab.report import stats

COMPARISON_COLUMNS = [
    "baseline",
    "candidate",
    "n_pairs",
    "diff_mean",
    "diff_ci_low",
    "diff_ci_high",
    "p_value",
    "p_adjusted",
    "verdict",
    # what follows adds context; the columns above are the comparison itself
    "kind",
    "vs_baseline",
    "baseline_acc_mean",
    "candidate_acc_mean",
    "diff_sd",
    "pairs_for_80pct_power",
]
KINDS = {"distill": ("context_distill", "method"), "compress": ("context_compress", "compress")}


def comparisons(jobs: pd.DataFrame, labels: dict[str, str]) -> pd.DataFrame:
    """The comparisons table (``COMPARISON_COLUMNS``) of the ok ``jobs`` (``jobs.frame``);
    ``labels`` names each configuration (``setting_key``) as the summary does."""
    rows = []
    for kind, (context, part) in KINDS.items():
        for _, family in jobs.groupby(context, sort=False):
            rows += _family_rows(kind, family, part, labels)
    table = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    table["p_adjusted"] = stats.holm([_maybe(p) for p in table["p_value"]])
    table["verdict"] = [
        stats.verdict(_maybe(mean), _maybe(p), n)
        for mean, p, n in zip(table["diff_mean"], table["p_adjusted"], table["n_pairs"], strict=True)
    ]
    for column in ("n_pairs", "pairs_for_80pct_power"):
        table[column] = table[column].astype("Int64")
    return table.astype(object).where(table.notna(), None)


def _family_rows(kind: str, family: pd.DataFrame, part: str, labels: dict[str, str]) -> list[dict[str, Any]]:
    is_base = family[part] == "none"
    arms = [(labels[key], _by_replicate(runs)) for key, runs in family[~is_base].groupby("setting_key", sort=False)]
    arms.sort(key=lambda arm: arm[0])
    pairs = []
    if is_base.any():
        base_keys = list(dict.fromkeys(family.loc[is_base, "setting_key"]))
        baseline = (_common_label([labels[key] for key in base_keys]), _by_replicate(family[is_base]))
        pairs += [(baseline, arm, True) for arm in arms]
    if kind == "distill":
        pairs += [(a, b, False) for a, b in itertools.combinations(arms, 2)]
    return [_row(kind, base, candidate, vs_baseline) for base, candidate, vs_baseline in pairs]


def _by_replicate(runs: pd.DataFrame) -> pd.Series:
    """Test accuracy per replicate; the first job of a replicate when baselines repeat it."""
    unique = runs.dropna(subset=["acc"]).drop_duplicates("replicate")
    return pd.Series(unique["acc"].to_numpy(), index=unique["replicate"].to_numpy())


def _row(kind: str, baseline: tuple[str, pd.Series], candidate: tuple[str, pd.Series], vs_baseline: bool) -> dict:
    shared = baseline[1].index.intersection(candidate[1].index)
    base, cand = baseline[1][shared], candidate[1][shared]
    result = stats.paired(cand.tolist(), base.tolist())
    return {
        "baseline": baseline[0],
        "candidate": candidate[0],
        "n_pairs": result.n,
        "diff_mean": result.mean,
        "diff_ci_low": result.low,
        "diff_ci_high": result.high,
        "p_value": result.p,
        "kind": kind,
        "vs_baseline": vs_baseline,
        "baseline_acc_mean": float(base.mean()) if len(base) else None,
        "candidate_acc_mean": float(cand.mean()) if len(cand) else None,
        "diff_sd": result.sd,
        "pairs_for_80pct_power": stats.pairs_for_power(result.mean, result.sd),
    }


def _common_label(labels: list[str]) -> str:
    """The overrides all of several baseline configurations share (``compress=none`` of
    ``compress=none compress.amount=0.3`` and ``... 0.5``)."""
    if len(labels) == 1:
        return labels[0]
    shared = set.intersection(*(set(label.split(" ")) for label in labels))
    return " ".join(token for token in labels[0].split(" ") if token in shared) or labels[0]


def _maybe(value: Any) -> Any:
    return None if value is None or (isinstance(value, float) and pd.isna(value)) else value
