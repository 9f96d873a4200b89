"""Paired comparisons and pooled reports, on fake sweep folders (no training)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from distillab.report import accuracy_figure, collect_many, comparisons, forest_figure, stats, summarize, write_report
from distillab.report.jobs import frame
from distillab.results import group_of

SRC = Path(__file__).resolve().parents[1] / "src"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TEST_SAMPLES = 270
FIRST_COLUMNS = [
    "baseline",
    "candidate",
    "n_pairs",
    "diff_mean",
    "diff_ci_low",
    "diff_ci_high",
    "p_value",
    "p_adjusted",
    "verdict",
]

# 3 seeds x 2 data split seeds
REPLICATES = [(seed, split) for seed in (0, 1, 2) for split in (0, 1)]
BASE = [0.812, 0.834, 0.851, 0.829, 0.866, 0.842]
GAINS = {
    "kd": [0.031, 0.028, 0.035, 0.030, 0.026, 0.033],  # clearly better
    "fitnet": [-0.040, -0.035, -0.044, -0.038, -0.041, -0.036],  # clearly worse
    "at": [0.004, -0.006, 0.002, -0.003, 0.005, -0.004],  # tied
}


# -- fake jobs --------------------------------------------------------------------------------
def digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def model(acc: float, params: int, val_acc: float | None = None, arch: str = "mlp") -> dict:
    return {
        "arch": arch,
        "params": params,
        "nonzero_params": params,
        "size_bytes": params * 4,
        "macs": params * 2,
        "latency_ms": {"batch_1": 1.0, "batch_64": params / 1000},
        "test": {"acc": acc, "f1": acc - 0.01, "precision": acc, "recall": acc, "agreement": acc},
        "val": {"acc": acc - 0.02 if val_acc is None else val_acc},
    }


def result(
    method: str = "none",
    seed: int = 0,
    split_seed: int | None = 0,
    acc: float = 0.9,
    *,
    compress: str = "none",
    amount: float | None = None,
    student: str = "mlp",
    params: int = 1000,
    val_acc: float | None = None,
    context: str = "",
    extra: tuple[str, ...] = (),
    hashes: bool = True,
) -> dict:
    """One ok results.json. ``context`` stands for settings the overrides do not show (it
    changes every hash); ``extra`` adds overrides that change nothing (no hash changes);
    ``split_seed=None`` is a result written before split seeds were recorded."""
    overrides = [f"distill={method}", f"compress={compress}"]
    overrides += [f"compress.amount={amount}"] if amount is not None else []
    overrides += [f"student={student}"] if student != "mlp" else []
    overrides += [*extra, f"seed={seed}"]
    overrides += [f"data.split_seed={split_seed}"] if split_seed is not None else []
    evaluated = model(acc, params, val_acc, arch=student)
    record = {
        "status": "ok",
        "config_hash": digest(overrides, context),
        "group": group_of(overrides),
        "overrides": overrides,
        "seed": seed,
        "dataset": "digits",
        "method": method,
        "compress": compress,
        "teacher": {
            "arch": "cnn",
            "params": 90000,
            "cache": "hit",
            "cache_key": "teacherkey0",
            "test": {"acc": 0.97, "f1": 0.97, "precision": 0.97, "recall": 0.97},
        },
        "student": evaluated if compress == "none" else model(0.95, params, arch=student),
        "ratios": {"params": params / 90000, "size": 0.01, "acc_retention": acc / 0.97},
        "timing_s": {"teacher": 1.0, "student": 2.0, "compress": 0.0, "total": 3.0},
        "env": {"python": "3.11"},
    }
    if compress != "none":
        record["compressed"] = model(acc, params // 2, val_acc, arch=student)
    if split_seed is not None:
        record["split_seed"] = split_seed
        record["test_samples"] = TEST_SAMPLES
    if hashes:
        record["setting_hashes"] = {
            "setting": digest(context, student, method, compress, amount),
            "without_distill": digest(context, student, compress, amount),
            "without_compress": digest(context, student, method),
        }
    return record


def write_job(sweep: Path, job: str, record: dict) -> Path:
    folder = sweep / job
    (folder / ".hydra").mkdir(parents=True)
    split = record.get("split_seed")
    (folder / ".hydra" / "config.yaml").write_text(
        f"seed: {record['seed']}\ndata:\n  split_seed: {0 if split is None else split}\n"
    )
    (folder / "results.json").write_text(json.dumps(record))
    return folder


def write_sweep(root: Path, records: list[dict]) -> Path:
    for i, record in enumerate(records):
        write_job(root, str(i), record)
    return root


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    return list(reader.fieldnames or []), rows


def by_pair(rows: list[dict[str, str]]) -> dict[tuple[str, str], dict[str, str]]:
    return {(row["baseline"], row["candidate"]): row for row in rows}


def accs(method: str) -> dict[tuple[int, int], float]:
    gains = GAINS.get(method, [0.0] * len(BASE))
    return {rep: round(b + g, 6) for rep, b, g in zip(REPLICATES, BASE, gains)}


def method_records(drop: tuple[str, tuple[int, int]] | None = None) -> list[dict]:
    """distill=none, at, fitnet, kd over 3 seeds x 2 split seeds; the candidates' jobs are
    written in reverse replicate order, so pairing by position would pair the wrong jobs."""
    records = []
    for method in ("none", "at", "fitnet", "kd"):
        order = REPLICATES if method == "none" else REPLICATES[::-1]
        for seed, split in order:
            if drop == (method, (seed, split)):
                continue
            records.append(result(method, seed, split, accs(method)[(seed, split)]))
    return records


def scipy_paired(candidate: dict, baseline: dict) -> tuple[int, float, float, float, float]:
    """n, mean difference, its 95 % CI and the p-value, from scipy on hand-paired arrays."""
    shared = sorted(set(candidate) & set(baseline))
    cand = np.array([candidate[key] for key in shared])
    base = np.array([baseline[key] for key in shared])
    test = sps.ttest_rel(cand, base)
    ci = test.confidence_interval(0.95)
    return len(shared), float(np.mean(cand - base)), float(ci.low), float(ci.high), float(test.pvalue)


def assert_row_matches(row: dict[str, str], expected: tuple[int, float, float, float, float]) -> None:
    n, mean, low, high, p = expected
    assert int(row["n_pairs"]) == n
    assert float(row["diff_mean"]) == pytest.approx(mean, abs=1e-9)
    assert float(row["diff_ci_low"]) == pytest.approx(low, abs=1e-8)
    assert float(row["diff_ci_high"]) == pytest.approx(high, abs=1e-8)
    assert float(row["p_value"]) == pytest.approx(p, rel=1e-5, abs=1e-300)


def sweep_dir(tmp_path: Path, name: str = "12-00-00") -> Path:
    return tmp_path / "multirun" / "2024-05-01" / name


@pytest.fixture(scope="module")
def method_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = write_sweep(sweep_dir(tmp_path_factory.mktemp("methods")), method_records())
    return root, write_report(root)


# -- pairing ----------------------------------------------------------------------------------
def test_pairs_are_seed_and_split_seed(method_report: tuple[Path, dict[str, Path]]) -> None:
    _, paths = method_report
    _, rows = read_csv(paths["comparisons_csv"])
    row = by_pair(rows)[("distill=none", "distill=kd")]
    assert int(row["n_pairs"]) == 6
    assert_row_matches(row, scipy_paired(accs("kd"), accs("none")))


def test_a_missing_replicate_drops_one_pair(tmp_path: Path) -> None:
    root = write_sweep(sweep_dir(tmp_path), method_records(drop=("kd", (2, 1))))
    paths = write_report(root)
    rows = by_pair(read_csv(paths["comparisons_csv"])[1])
    kd = {rep: acc for rep, acc in accs("kd").items() if rep != (2, 1)}
    row = rows[("distill=none", "distill=kd")]
    assert int(row["n_pairs"]) == 5
    assert_row_matches(row, scipy_paired(kd, accs("none")))
    # the other methods still have all six pairs, also against kd
    assert int(rows[("distill=none", "distill=at")]["n_pairs"]) == 6
    assert int(rows[("distill=fitnet", "distill=kd")]["n_pairs"]) == 5
    assert_row_matches(rows[("distill=fitnet", "distill=kd")], scipy_paired(kd, accs("fitnet")))


def test_comparison_columns_come_first(method_report: tuple[Path, dict[str, Path]]) -> None:
    _, paths = method_report
    columns, _ = read_csv(paths["comparisons_csv"])
    assert columns[: len(FIRST_COLUMNS)] == FIRST_COLUMNS


def test_every_method_against_the_baseline_and_each_other(method_report: tuple[Path, dict[str, Path]]) -> None:
    _, paths = method_report
    _, rows = read_csv(paths["comparisons_csv"])
    table = by_pair(rows)
    expected = {
        ("distill=none", "distill=at"): "not distinguishable",
        ("distill=none", "distill=fitnet"): "worse",
        ("distill=none", "distill=kd"): "better",
        ("distill=at", "distill=fitnet"): "worse",
        ("distill=at", "distill=kd"): "better",
        ("distill=fitnet", "distill=kd"): "better",
    }
    assert len(rows) == 6
    assert {pair: row["verdict"] for pair, row in table.items()} == expected
    assert {pair for pair, row in table.items() if row["vs_baseline"] == "true"} == {
        pair for pair in expected if pair[0] == "distill=none"
    }
    assert {row["kind"] for row in rows} == {"distill"}
    for (base, cand), row in table.items():
        assert_row_matches(row, scipy_paired(accs(cand.split("=")[1]), accs(base.split("=")[1])))


def test_p_adjusted_is_holm_over_all_rows(method_report: tuple[Path, dict[str, Path]]) -> None:
    _, paths = method_report
    _, rows = read_csv(paths["comparisons_csv"])
    p_values = [float(row["p_value"]) for row in rows]
    # Holm by hand: sorted p times (m - rank), running maximum, capped at 1
    order = np.argsort(p_values)
    expected = np.empty(len(p_values))
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        expected[i] = running
    assert [float(row["p_adjusted"]) for row in rows] == pytest.approx(list(expected), rel=1e-6)
    assert all(float(row["p_adjusted"]) >= float(row["p_value"]) for row in rows)


def test_a_single_pair_says_so_and_has_no_p(tmp_path: Path) -> None:
    records = [result("none", seed, 0, 0.80 + seed / 100) for seed in range(3)]
    records += [result("kd", 0, 0, 0.85)]
    records += [result("fitnet", seed, 0, 0.90 + seed / 100 + (seed == 1) / 1000) for seed in range(3)]
    paths = write_report(write_sweep(sweep_dir(tmp_path), records))
    _, rows = read_csv(paths["comparisons_csv"])
    table = by_pair(rows)
    single = table[("distill=none", "distill=kd")]
    assert single["n_pairs"] == "1"
    assert "fewer than 2 pairs" in single["verdict"]
    assert single["p_value"] == "" and single["p_adjusted"] == ""
    assert float(single["diff_mean"]) == pytest.approx(0.05)
    assert single["diff_ci_low"] == "" and single["diff_ci_high"] == ""
    # rows without a p-value are not counted by Holm: one tested row remains
    tested = [row for row in rows if row["p_value"]]
    assert len(tested) == 1
    (fitnet,) = tested
    assert float(fitnet["p_adjusted"]) == pytest.approx(float(fitnet["p_value"]))
    assert "fewer than 2 pairs" in paths["comparisons_markdown"].read_text()


def test_different_contexts_are_not_compared(tmp_path: Path) -> None:
    records = []
    for seed in range(3):
        records += [
            result("none", seed, 0, 0.80 + seed / 100),
            result("kd", seed, 0, 0.83 + seed / 100 + seed / 1000),
            # another student: its own family, without a baseline
            result("fitnet", seed, 0, 0.70 + seed / 100, student="cnn"),
            # the same overrides as a kd job, but another hidden setting
            result("at", seed, 0, 0.60 + seed / 100, context="other data"),
            result("none", seed, 0, 0.50 + seed / 100, context="other data 2"),
        ]
    paths = write_report(write_sweep(sweep_dir(tmp_path), records))
    _, rows = read_csv(paths["comparisons_csv"])
    assert len(rows) == 1
    (row,) = rows
    assert int(row["n_pairs"]) == 3
    assert float(row["diff_mean"]) == pytest.approx(0.031)
    assert float(row["candidate_acc_mean"]) == pytest.approx(0.841)
    assert float(row["baseline_acc_mean"]) == pytest.approx(0.81)


def test_same_overrides_other_hash_are_not_compared(tmp_path: Path) -> None:
    records = [result("none", seed, 0, 0.80 + seed / 100, context="a") for seed in range(3)]
    records += [result("kd", seed, 0, 0.85 + seed / 100, context="b") for seed in range(3)]
    paths = write_report(write_sweep(sweep_dir(tmp_path), records))
    _, rows = read_csv(paths["comparisons_csv"])
    assert rows == []
    assert "nothing to compare" in paths["comparisons_markdown"].read_text()


def test_compression_against_one_compress_none_baseline(tmp_path: Path) -> None:
    none_acc = {seed: 0.90 + seed / 100 for seed in range(3)}
    prune_acc = {
        0.3: {seed: none_acc[seed] - 0.010 - seed / 1000 for seed in range(3)},
        0.5: {seed: none_acc[seed] - 0.050 + seed / 1000 for seed in range(3)},
    }
    records = []
    for amount in (0.3, 0.5):
        for seed in range(3):
            # compress=none trains the same model whatever compress.amount says
            records.append(result("kd", seed, 0, none_acc[seed], compress="none", amount=amount))
            records.append(result("kd", seed, 0, prune_acc[amount][seed], compress="prune", amount=amount))
    jobs = frame(collect_many([write_sweep(sweep_dir(tmp_path), records)]))
    # the two compress=none configurations are distinct settings sharing the context
    none_jobs = jobs[jobs["compress"] == "none"]
    assert none_jobs["setting_key"].nunique() == 2 and none_jobs["context_compress"].nunique() == 1
    paths = write_report(sweep_dir(tmp_path))
    _, rows = read_csv(paths["comparisons_csv"])
    table = by_pair(rows)
    assert set(table) == {
        ("compress=none", "compress.amount=0.3 compress=prune"),
        ("compress=none", "compress.amount=0.5 compress=prune"),
    }
    assert {row["kind"] for row in rows} == {"compress"}
    assert {row["vs_baseline"] for row in rows} == {"true"}
    for amount in (0.3, 0.5):
        row = table[("compress=none", f"compress.amount={amount} compress=prune")]
        expected = scipy_paired(
            {(s, 0): a for s, a in prune_acc[amount].items()}, {(s, 0): none_acc[s] for s in none_acc}
        )
        assert_row_matches(row, expected)
        assert row["verdict"] == "worse"


@pytest.mark.parametrize("old", ["no setting_hashes", "no setting_hashes, split seeds or test sizes"])
def test_old_results_pair_by_their_overrides(tmp_path: Path, old: str) -> None:
    splits = (0, 1) if old == "no setting_hashes" else (None,)
    records, none_acc, kd_acc = [], {}, {}
    for seed in range(3):
        for split in splits:
            key = (seed, split)
            none_acc[key] = 0.80 + seed / 100 + (split or 0) / 200
            kd_acc[key] = none_acc[key] + 0.02 + seed / 1000 - (split or 0) / 700
            records.append(result("none", seed, split, none_acc[key], hashes=False))
            records.append(result("kd", seed, split, kd_acc[key], hashes=False))
    assert not any("setting_hashes" in record for record in records)
    paths = write_report(write_sweep(sweep_dir(tmp_path), records))
    _, rows = read_csv(paths["comparisons_csv"])
    (row,) = rows
    assert (row["baseline"], row["candidate"]) == ("distill=none", "distill=kd")
    assert_row_matches(row, scipy_paired(kd_acc, none_acc))
    assert int(row["n_pairs"]) == 3 * len(splits)
    summary = [r for r in read_csv(paths["csv"])[1] if r["role"] == "student"]
    assert sorted(r["n_seeds"] for r in summary) == [str(3 * len(splits))] * 2
    if old != "no setting_hashes":
        assert "test-set size is not in these results.json" in paths["comparisons_markdown"].read_text()


# -- pooling several sweep folders ------------------------------------------------------------
def pooled_folders(tmp_path: Path) -> tuple[Path, Path]:
    """seeds 0, 1 in the first folder, 1, 2 in the second: seed 1 is in both (with another
    accuracy in the second, which must be ignored). The second spells its command line with an
    extra override that changes nothing."""
    first = write_sweep(
        tmp_path / "multirun" / "2024-05-01" / "10-00-00",
        [
            result(m, s, 0, acc)
            for s, (a, b) in {0: (0.80, 0.83), 1: (0.81, 0.845)}.items()
            for m, acc in (("none", a), ("kd", b))
        ],
    )
    second = write_sweep(
        tmp_path / "multirun" / "2024-05-02" / "11-00-00",
        [
            result(m, s, 0, acc, extra=("trainer.max_epochs=50",))
            for s, (a, b) in {1: (0.10, 0.20), 2: (0.82, 0.852)}.items()
            for m, acc in (("none", a), ("kd", b))
        ],
    )
    return first, second


LABELS = ("2024-05-01/10-00-00", "2024-05-02/11-00-00")


def test_pooled_report_merges_identical_configurations(tmp_path: Path) -> None:
    first, second = pooled_folders(tmp_path)
    out = tmp_path / "pooled"
    paths = write_report([first, second], out=out)
    assert {path.parent for path in paths.values()} == {out}
    summary = {r["method"]: r for r in read_csv(out / "summary.csv")[1] if r["role"] == "student"}
    assert set(summary) == {"none", "kd"}
    for method, accs_ in (("none", [0.80, 0.81, 0.82]), ("kd", [0.83, 0.845, 0.852])):
        row = summary[method]
        assert (row["n_seeds"], row["seeds"]) == ("3", "0 1 2")
        assert row["sweeps"] == " ".join(LABELS)
        assert float(row["acc_mean"]) == pytest.approx(np.mean(accs_))
    (compared,) = read_csv(out / "comparisons.csv")[1]
    assert int(compared["n_pairs"]) == 3
    assert_row_matches(
        compared,
        scipy_paired({0: 0.83, 1: 0.845, 2: 0.852}, {0: 0.80, 1: 0.81, 2: 0.82}),
    )
    for name in ("summary.md", "comparisons.md"):
        text = (out / name).read_text()
        assert f"Pooled from 2 sweep folders: `{LABELS[0]}`, `{LABELS[1]}`." in text
    assert "2 jobs repeat a replicate" in (out / "summary.md").read_text()
    # nothing is written into the sweep folders themselves
    assert not (first / "summary.csv").exists() and not (second / "summary.csv").exists()


def test_several_folders_need_out(tmp_path: Path) -> None:
    first, second = pooled_folders(tmp_path)
    with pytest.raises(ValueError, match="--out"):
        write_report([first, second])
    with pytest.raises(ValueError, match="no sweep folder"):
        write_report([], out=tmp_path / "pooled")


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=120)


def test_cli_pools_folders_into_out(tmp_path: Path) -> None:
    first, second = pooled_folders(tmp_path)
    out = tmp_path / "pooled"
    done = _run(["-m", "distillab.report", str(first), str(second), "--out", str(out)])
    assert done.returncode == 0, done.stderr
    for name in ("summary.csv", "summary.md", "comparisons.csv", "comparisons.md", "comparisons_forest.png"):
        assert (out / name).is_file()
        assert f"wrote {out / name}" in done.stdout
    assert "Pooled from 2 sweep folders" in done.stdout


def test_cli_several_folders_without_out_is_one_line_and_exit_2(tmp_path: Path) -> None:
    first, second = pooled_folders(tmp_path)
    done = _run(["-m", "distillab.report", str(first), str(second)])
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "--out" in done.stderr
    assert not (first / "summary.md").exists()


# -- summary rows -----------------------------------------------------------------------------
def test_pareto_front_is_chosen_on_validation_accuracy(tmp_path: Path) -> None:
    records = []
    for seed in range(2):
        # same cost: kd has the higher test accuracy, at the higher validation accuracy
        records.append(result("kd", seed, 0, 0.90 + seed / 100, val_acc=0.80))
        records.append(result("at", seed, 0, 0.85 + seed / 100, val_acc=0.85))
        # cheaper and worse on validation: on the front by cost
        records.append(result("none", seed, 0, 0.70, params=500, val_acc=0.70))
    paths = write_report(write_sweep(sweep_dir(tmp_path), records))
    summary = {r["method"]: r for r in read_csv(paths["csv"])[1] if r["role"] == "student"}
    assert summary["kd"]["params_mean"] == summary["at"]["params_mean"]
    assert float(summary["kd"]["acc_mean"]) > float(summary["at"]["acc_mean"])
    assert {m: r["pareto"] for m, r in summary.items()} == {"kd": "false", "at": "true", "none": "true"}


def test_summary_ci_is_scipy_t_interval(method_report: tuple[Path, dict[str, Path]]) -> None:
    _, paths = method_report
    summary = {r["method"]: r for r in read_csv(paths["csv"])[1] if r["role"] == "student"}
    assert set(summary) == {"none", "at", "fitnet", "kd"}
    for method, row in summary.items():
        values = np.array(list(accs(method).values()))
        low, high = sps.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=sps.sem(values))
        assert row["n_seeds"] == "6" and row["seeds"] == "0 1 2" and row["split_seeds"] == "0 1"
        assert float(row["acc_ci_low"]) == pytest.approx(low, abs=1e-10)
        assert float(row["acc_ci_high"]) == pytest.approx(high, abs=1e-10)


# -- plots and the markdown -------------------------------------------------------------------
def test_forest_plot_rows_and_noise_band(tmp_path: Path) -> None:
    records = collect_many([write_sweep(sweep_dir(tmp_path), method_records())])
    jobs = frame(records)
    labels = {key: runs["group"].iloc[0] for key, runs in jobs.groupby("setting_key")}
    compared = comparisons(jobs, labels)
    assert len(compared) == 6 and int(compared["vs_baseline"].sum()) == 3
    ax = forest_figure(compared, "forest", TEST_SAMPLES).axes[0]
    ticks = [label.get_text() for label in ax.get_yticklabels()]
    assert len(ax.get_yticks()) == 3 and len(ticks) == 3
    assert all("distill=none" in tick and "(n=6)" in tick for tick in ticks)
    (band,) = [patch for patch in ax.patches if patch.get_label().startswith("± one test sample")]
    assert band.get_x() == pytest.approx(-1 / TEST_SAMPLES)
    assert band.get_width() == pytest.approx(2 / TEST_SAMPLES)
    assert "0.0037" in band.get_label()


def test_forest_plot_without_comparisons_says_so(tmp_path: Path) -> None:
    records = collect_many([write_sweep(sweep_dir(tmp_path), [result("kd", 0, 0, 0.9)])])
    jobs = frame(records)
    compared = comparisons(jobs, {key: "kd" for key in jobs["setting_key"]})
    ax = forest_figure(compared, "empty", TEST_SAMPLES).axes[0]
    assert any("no paired comparisons" in text.get_text() for text in ax.texts)


def test_accuracy_plot_with_a_single_cost_shows_the_points(tmp_path: Path) -> None:
    records = [result(m, s, 0, acc + s / 100) for s in range(2) for m, acc in (("none", 0.80), ("kd", 0.90))]
    rows = summarize(collect_many([write_sweep(sweep_dir(tmp_path), records)]), "macs")
    assert {row["macs_mean"] for row in rows if row["role"] == "student"} == {2000}
    figure = accuracy_figure(rows, "macs", "one cost")
    figure.canvas.draw()
    low, high = figure.axes[0].get_xlim()
    assert low < 2000 < high


def test_write_report_writes_every_png(method_report: tuple[Path, dict[str, Path]]) -> None:
    root, paths = method_report
    assert paths["forest"] == root / "comparisons_forest.png"
    for name in ("comparisons_forest", *(f"accuracy_vs_{x}" for x in ("params", "size_bytes", "macs", "latency_ms"))):
        assert (root / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    assert paths["plot"] == root / "accuracy_vs_params.png"
    assert paths["plot_latency_ms"] == root / "accuracy_vs_latency_ms.png"


def test_comparisons_markdown_states_the_noise_floor(method_report: tuple[Path, dict[str, Path]]) -> None:
    _, paths = method_report
    text = paths["comparisons_markdown"].read_text()
    assert "270 test samples: one sample is 0.0037 accuracy" in text
    assert "pairs for 80 % power" in text
    assert "80% power" in text
    (tied,) = [r for r in read_csv(paths["comparisons_csv"])[1] if r["verdict"] == "not distinguishable"]
    diffs = np.subtract(list(accs("at").values()), list(accs("none").values()))
    needed = stats.pairs_for_power(float(diffs.mean()), float(diffs.std(ddof=1)))
    assert needed is not None and needed > 6
    assert int(tied["pairs_for_80pct_power"]) == needed
    assert f"{needed} pairs" in text
    assert "6 comparisons: 3 better, 2 worse, 1 not distinguishable." in text
    summary = paths["markdown"].read_text()
    assert "## Paired comparisons" in summary and "3 better, 2 worse" in summary
