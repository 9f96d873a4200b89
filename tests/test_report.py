"""Sweep report: collecting job folders, averaging over seeds, the files, the CLI, the callback."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import hydra
import pytest
from omegaconf import OmegaConf
from scipy import stats

from distillab import report
from distillab.report import (
    COLUMNS,
    SweepReportCallback,
    accuracy_figure,
    collect,
    summarize,
    write_report,
)

SRC = Path(__file__).resolve().parents[1] / "src"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GROUP_A = "distill=kd student.hidden=[64]"
GROUP_B = "compress=prune distill=none"


def model_block(acc: float, params: int, arch: str = "mlp", latency: float = 0.2) -> dict:
    return {
        "arch": arch,
        "params": params,
        "nonzero_params": params,
        "size_bytes": params * 4,
        "macs": params * 2,
        "latency_ms": {"batch_1": 99.0, "batch_64": latency},
        "test": {"acc": acc, "f1": acc - 0.01, "precision": acc, "recall": acc, "agreement": acc + 0.04},
        "val": {"acc": acc - 0.02},
    }


def make_result(
    group: str,
    seed: int,
    acc: float,
    *,
    params: int = 1000,
    method: str = "kd",
    compress: str = "none",
    compressed: dict | None = None,
    retention: float = 0.9,
    teacher_key: str = "t1key0000",
    teacher_acc: float = 0.99,
    latency: float = 0.2,
) -> dict:
    """One ok results.json; ``compressed`` replaces the student as the evaluated model."""
    overrides = ([] if group == "(defaults)" else group.split()) + [f"seed={seed}"]
    result = {
        "status": "ok",
        "config_hash": f"hash{seed}",
        "group": group,
        "overrides": overrides,
        "seed": seed,
        "dataset": "digits",
        "method": method,
        "compress": compress,
        "teacher": {
            "arch": "cnn",
            "params": 90000,
            "cache": "hit",
            "cache_key": teacher_key,
            "test": {"acc": teacher_acc, "f1": teacher_acc, "precision": teacher_acc, "recall": teacher_acc},
        },
        "student": model_block(acc, params, latency=latency),
        "ratios": {"params": params / 90000, "size": 0.03, "acc_retention": retention},
        "timing_s": {"teacher": 1.0, "student": 10.0, "compress": 0.0, "total": 12.0},
        "env": {"python": "3.11"},
    }
    if compressed is not None:
        result["compressed"] = compressed
    return result


def write_job(sweep: Path, job: str, result: dict | str | None) -> Path:
    """A job folder as Hydra leaves it; ``None`` means the job never wrote results."""
    folder = sweep / job
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("seed: 0\n")
    if result is not None:
        text = result if isinstance(result, str) else json.dumps(result)
        (folder / "results.json").write_text(text)
    return folder


def ok_records(results: list[dict]) -> list[dict]:
    return [{"job": str(i), "status": "ok", "results": r} for i, r in enumerate(results)]


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """2 groups x 3 seeds, a failed job, a job without results and an unparsable file."""
    root = tmp_path / "multirun" / "2024-05-01" / "12-00-00"
    for seed, (acc, retention) in enumerate([(0.90, 0.90), (0.92, 0.93), (0.94, 0.96)]):
        write_job(root, str(seed), make_result(GROUP_A, seed, acc, retention=retention))
    for seed, acc in enumerate([0.80, 0.84, 0.88]):
        result = make_result(GROUP_B, seed, 0.95, method="none", compress="prune", compressed=model_block(acc, 400))
        write_job(root, str(seed + 3), result)
    write_job(root, "6", {"status": "failed", "error": "RuntimeError: CUDA out of memory", "group": GROUP_A, "seed": 3})
    write_job(root, "7", None)
    write_job(root, "10", '{"status": "ok", "group": ')
    # artefact folders may hold a results.json of their own; they are not jobs
    for skipped in ("0/wandb/run-1", "teacher_cache/abc", "1/checkpoints"):
        (root / skipped).mkdir(parents=True)
        (root / skipped / "results.json").write_text(json.dumps(make_result("ghost", 9, 0.1)))
    return root


# -- collect ----------------------------------------------------------------------------------
def test_collect_lists_every_job_in_natural_order(sweep: Path) -> None:
    records = collect(sweep)
    assert [r["job"] for r in records] == ["0", "1", "2", "3", "4", "5", "6", "7", "10"]
    statuses = {r["job"]: r["status"] for r in records}
    assert statuses == {**{str(i): "ok" for i in range(6)}, "6": "failed", "7": "missing", "10": "unreadable"}
    by_job = {r["job"]: r for r in records}
    assert by_job["6"]["error"] == "RuntimeError: CUDA out of memory"
    assert by_job["10"]["path"] == str(sweep / "10" / "results.json")
    assert by_job["10"]["error"].startswith("cannot parse results.json")
    assert by_job["0"]["results"]["student"]["test"]["acc"] == 0.90


def test_collect_finds_nested_jobs_and_keeps_errors_on_one_line(tmp_path: Path) -> None:
    write_job(tmp_path, "kd/0", make_result(GROUP_A, 0, 0.9))
    write_job(tmp_path, "kd/2", {"status": "failed", "error": "first line\nsecond line"})
    write_job(tmp_path, "kd/10", '["not", "a", "record"]')
    records = collect(tmp_path)
    assert [r["job"] for r in records] == ["kd/0", "kd/2", "kd/10"]
    assert records[1]["error"] == "first line"
    assert records[2]["status"] == "unreadable"


def test_collect_rejects_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        collect(tmp_path / "nope")


# -- summarize --------------------------------------------------------------------------------
def test_summarize_averages_seeds_per_group(sweep: Path) -> None:
    rows = summarize(collect(sweep))
    students = {row["group"]: row for row in rows if row["role"] == "student"}
    assert set(students) == {GROUP_A, GROUP_B}
    a, b = students[GROUP_A], students[GROUP_B]
    # accuracies 0.90, 0.92, 0.94: mean 0.92, sample std sqrt((0.02^2 + 0 + 0.02^2) / 2) = 0.02
    assert (a["n_seeds"], a["seeds"]) == (3, [0, 1, 2])
    assert a["acc_mean"] == pytest.approx(0.92)
    assert a["acc_std"] == pytest.approx(0.02)
    assert a["f1_mean"] == pytest.approx(0.91)
    assert a["f1_std"] == pytest.approx(0.02)
    assert a["val_acc_mean"] == pytest.approx(0.90)
    assert a["agreement_mean"] == pytest.approx(0.96)
    assert a["acc_retention_mean"] == pytest.approx(0.93)
    assert a["params_mean"] == 1000
    assert (a["method"], a["compress"], a["student_arch"]) == ("kd", "none", "mlp")
    # the compressed block is evaluated, not the student (acc 0.95, 1000 params)
    assert b["evaluated"] == "compressed"
    assert b["acc_mean"] == pytest.approx(0.84)
    assert b["acc_std"] == pytest.approx(0.04)
    assert b["params_mean"] == 400
    assert b["size_bytes_mean"] == 1600
    assert (b["method"], b["compress"]) == ("none", "prune")
    assert all(set(row) == set(COLUMNS) for row in rows)


def test_summarize_single_seed_has_no_std() -> None:
    (row, _teacher) = summarize(ok_records([make_result(GROUP_A, 0, 0.9)]))
    assert row["n_seeds"] == 1
    assert row["acc_mean"] == pytest.approx(0.9)
    assert row["acc_std"] is None and row["f1_std"] is None


def test_summarize_teacher_rows_per_cache_key() -> None:
    results = [
        make_result(GROUP_A, 0, 0.9, teacher_key="t1", teacher_acc=0.98),
        make_result(GROUP_A, 1, 0.9, teacher_key="t1", teacher_acc=0.96),
        make_result(GROUP_B, 0, 0.9, teacher_key="t2", teacher_acc=0.90),
    ]
    teachers = [row for row in summarize(ok_records(results)) if row["role"] == "teacher"]
    assert [(t["teacher_key"], t["n_seeds"]) for t in teachers] == [("t1", 2), ("t2", 1)]
    assert teachers[0]["acc_mean"] == pytest.approx(0.97)
    assert teachers[1]["acc_mean"] == pytest.approx(0.90)
    assert teachers[0]["params_mean"] == 90000
    assert teachers[0]["teacher_arch"] == "cnn"
    assert teachers[0]["seeds"] == [0, 1]
    assert not any(t["pareto"] for t in teachers)


def test_pareto_front_on_a_constructed_case() -> None:
    points = {
        "g1": (100, 0.80),
        "g2": (200, 0.90),
        "g3": (300, 0.85),
        "g4": (200, 0.70),
        "g5": (50, 0.50),
        "g6": (400, 0.90),
        "g7": (100, 0.80),
    }
    results = [make_result(group, 0, acc, params=params) for group, (params, acc) in points.items()]
    rows = [row for row in summarize(ok_records(results)) if row["role"] == "student"]
    front = {row["group"] for row in rows if row["pareto"]}
    # g3, g4 are beaten by g2; g6 has g2's accuracy at a higher cost; g1 and g7 tie
    assert front == {"g1", "g2", "g5", "g7"}
    assert [row["params_mean"] for row in rows] == sorted(row["params_mean"] for row in rows)


def test_latency_axis_uses_batch_64_and_moves_the_front() -> None:
    results = [
        make_result("small", 0, 0.80, params=100, latency=2.0),
        make_result("big", 0, 0.90, params=200, latency=1.0),
    ]
    by_params = {r["group"]: r for r in summarize(ok_records(results), x="params")}
    by_latency = {r["group"]: r for r in summarize(ok_records(results), x="latency_ms")}
    assert by_latency["small"]["latency_ms_mean"] == 2.0
    assert by_params["small"]["pareto"] and by_params["big"]["pareto"]
    assert not by_latency["small"]["pareto"] and by_latency["big"]["pareto"]


@pytest.mark.parametrize(
    "call",
    [lambda: summarize([], x="flops"), lambda: write_report(".", x="flops"), lambda: SweepReportCallback(x="flops")],
)
def test_bad_x_names_the_allowed_values(call) -> None:
    with pytest.raises(ValueError, match="flops") as info:
        call()
    for allowed in ("params", "size_bytes", "macs", "latency_ms"):
        assert allowed in str(info.value)


# -- files ------------------------------------------------------------------------------------
def test_write_report_markdown_lists_groups_and_problem_jobs(sweep: Path) -> None:
    paths = write_report(sweep)
    assert paths["markdown"] == sweep / "summary.md"
    text = paths["markdown"].read_text()
    assert "acc (mean ± std)" in text and "n seeds" in text
    assert "0.9200 ± 0.0200" in text and "0.8400 ± 0.0400" in text
    assert "- `6` **failed**: RuntimeError: CUDA out of memory" in text
    assert "- `7` **missing**: no results.json" in text
    assert f"- `10` **unreadable** (`{sweep / '10' / 'results.json'}`): cannot parse" in text
    assert "9 jobs: 6 ok, 1 failed, 1 missing, 1 unreadable." in text
    assert "## Teachers (reference)" in text and "t1key000" in text
    assert "ghost" not in text
    group_a_line = next(line for line in text.splitlines() if GROUP_A in line)
    assert group_a_line.startswith("| **yes** |")


def test_write_report_csv_has_one_row_per_group_and_teacher(sweep: Path) -> None:
    paths = write_report(sweep)
    with open(paths["csv"], newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == COLUMNS
    assert [(r["role"], r["group"]) for r in rows] == [
        ("student", GROUP_B),
        ("student", GROUP_A),
        ("teacher", "teacher cnn [t1key000]"),
    ]
    a = rows[1]
    assert a["n_seeds"] == "3" and a["seeds"] == "0 1 2" and a["pareto"] == "true"
    assert float(a["acc_mean"]) == pytest.approx(0.92)
    assert float(a["acc_std"]) == pytest.approx(0.02)
    assert float(rows[2]["acc_mean"]) == pytest.approx(0.99)
    assert rows[2]["acc_retention_mean"] == ""


def test_write_report_plot_is_a_png_named_after_x(sweep: Path) -> None:
    paths = write_report(sweep)
    assert paths["plot"] == sweep / "accuracy_vs_params.png"
    assert paths["plot"].read_bytes()[:8] == PNG_MAGIC
    macs = write_report(sweep, x="macs")["plot"]
    assert macs == sweep / "accuracy_vs_macs.png"
    assert macs.read_bytes()[:8] == PNG_MAGIC
    assert not list(sweep.glob(".*.tmp"))


def test_figure_has_log_x_ci_error_bars_front_and_teacher(sweep: Path) -> None:
    figure = accuracy_figure(summarize(collect(sweep)), "params", "Test accuracy: 12-00-00")
    ax = figure.axes[0]
    assert ax.get_xscale() == "log"
    assert "12-00-00" in ax.get_title()
    assert "(count)" in ax.get_xlabel() and "accuracy" in ax.get_ylabel()
    labels = ax.get_legend_handles_labels()[1]
    front_label = "Pareto front (chosen on val acc)"
    assert {"method=kd", "method=none, compress=prune", front_label} <= set(labels)
    assert any(label.startswith("teacher cnn") for label in labels)
    spans = {}
    for container in ax.containers:
        marker = container.lines[0].get_marker()
        segment = container.lines[2][0].get_segments()[0]
        spans[marker] = (segment[0][1], segment[1][1])
    assert len(spans) == 2  # one marker per method
    (front,) = [line for line in ax.get_lines() if line.get_label() == front_label]
    assert list(front.get_xdata()) == [400, 1000]
    assert list(front.get_ydata()) == pytest.approx([0.84, 0.92])
    # kd: 0.90, 0.92, 0.94: the bar is the 95 % t-interval of the mean, not the std
    low, high = stats.t.interval(0.95, 2, loc=0.92, scale=0.02 / 3**0.5)
    assert sorted(spans.values())[1] == pytest.approx((low, high))


def test_figure_without_completed_jobs_says_so() -> None:
    ax = accuracy_figure([], "params", "empty").axes[0]
    assert any("no completed jobs" in text.get_text() for text in ax.texts)


def test_write_report_on_a_sweep_without_ok_jobs(tmp_path: Path) -> None:
    write_job(tmp_path, "0", {"status": "failed", "error": "ValueError: lr=-1 is not allowed"})
    write_job(tmp_path, "1", None)
    paths = write_report(tmp_path)
    text = paths["markdown"].read_text()
    assert "No completed jobs yet" in text
    assert "- `0` **failed**: ValueError: lr=-1 is not allowed" in text
    assert "- `1` **missing**" in text
    assert paths["csv"].read_text().strip() == ",".join(COLUMNS)
    assert paths["plot"].read_bytes()[:8] == PNG_MAGIC


def _run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_report_never_imports_pyplot(sweep: Path) -> None:
    code = (
        "import sys; from distillab.report import write_report; "
        f"write_report({str(sweep)!r}); print('matplotlib.pyplot' in sys.modules)"
    )
    out = _run(["-c", code])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# -- command line -----------------------------------------------------------------------------
def test_cli_prints_the_table_and_the_paths(sweep: Path) -> None:
    out = _run(["-m", "distillab.report", str(sweep), "--x", "size_bytes"])
    assert out.returncode == 0, out.stderr
    assert "| Pareto | setting |" in out.stdout
    assert "0.9200 ± 0.0200" in out.stdout
    assert f"wrote {sweep / 'accuracy_vs_size_bytes.png'}" in out.stdout
    assert (sweep / "accuracy_vs_size_bytes.png").is_file()


def test_cli_missing_folder_is_one_line_and_exit_2(tmp_path: Path) -> None:
    out = _run(["-m", "distillab.report", str(tmp_path / "absent")])
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "absent" in out.stderr and out.stderr.startswith("error:")
    assert out.stdout == ""


def test_cli_rejects_an_unknown_x(sweep: Path) -> None:
    out = _run(["-m", "distillab.report", str(sweep), "--x", "flops"])
    assert out.returncode == 2
    assert "latency_ms" in out.stderr
    assert not (sweep / "summary.md").exists()


# -- Hydra callback ---------------------------------------------------------------------------
def _sweep_config(folder: Path):
    return OmegaConf.create({"hydra": {"sweep": {"dir": str(folder)}}})


def test_callback_writes_the_report(sweep: Path, caplog: pytest.LogCaptureFixture) -> None:
    callback = hydra.utils.instantiate({"_target_": "distillab.report.SweepReportCallback", "x": "latency_ms"})
    with caplog.at_level(logging.INFO, logger="distillab.report"):
        callback.on_multirun_end(config=_sweep_config(sweep))
    assert (sweep / "summary.md").is_file() and (sweep / "summary.csv").is_file()
    assert (sweep / "accuracy_vs_latency_ms.png").read_bytes()[:8] == PNG_MAGIC
    logged = " ".join(r.getMessage() for r in caplog.records if r.name == "distillab.report")
    assert str(sweep / "summary.md") in logged


@pytest.mark.parametrize("broken", ["missing folder", "write fails", "no sweep key"])
def test_callback_logs_one_error_line_and_never_raises(
    broken: str, sweep: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config = _sweep_config(sweep / "absent")
    if broken == "write fails":

        def fail(*args, **kwargs):
            raise RuntimeError("disk full\ntraceback details")

        monkeypatch.setattr(report, "write_report", fail)
        config = _sweep_config(sweep)
    elif broken == "no sweep key":
        config = OmegaConf.create({"hydra": {}})
    with caplog.at_level(logging.INFO, logger="distillab.report"):
        SweepReportCallback().on_multirun_end(config=config)
    errors = [r for r in caplog.records if r.name == "distillab.report" and r.levelname == "ERROR"]
    assert len(errors) == 1
    assert "\n" not in errors[0].getMessage()
    assert errors[0].exc_info is None
    assert not (sweep / "summary.md").exists()


def test_callback_runs_at_the_end_of_a_real_multirun(tmp_path: Path) -> None:
    """The sweep folder's ${now:} must resolve to the folder the jobs were written to."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "cfg.yaml").write_text(
        textwrap.dedent("""\
        seed: 0
        hydra:
          sweep:
            dir: multirun/${now:%H-%M-%S-%f}
          callbacks:
            report:
              _target_: distillab.report.SweepReportCallback
        """)
    )
    (tmp_path / "app.py").write_text(
        textwrap.dedent("""\
        import json
        from pathlib import Path

        import hydra
        from hydra.core.hydra_config import HydraConfig


        @hydra.main(version_base=None, config_path="conf", config_name="cfg")
        def app(cfg):
            out = Path(HydraConfig.get().runtime.output_dir)
            block = {"arch": "mlp", "params": 100, "test": {"acc": 0.5 + cfg.seed / 10}}
            result = {"status": "ok", "group": "(defaults)", "seed": cfg.seed, "method": "kd",
                      "compress": "none", "student": block}
            (out / "results.json").write_text(json.dumps(result))


        if __name__ == "__main__":
            app()
        """)
    )
    out = _run(["app.py", "-m", "seed=0,1"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (folder,) = (tmp_path / "multirun").iterdir()
    with open(folder / "summary.csv", newline="") as handle:
        (row,) = csv.DictReader(handle)
    assert (row["n_seeds"], row["seeds"]) == ("2", "0 1")
    assert float(row["acc_mean"]) == pytest.approx(0.55)
    assert "sweep report markdown" in out.stdout + out.stderr


def test_rows_are_named_by_the_overrides_that_differ() -> None:
    groups = ["distill=kd trainer.max_epochs=5", "distill=none trainer.max_epochs=5"]
    assert report.shared_overrides(groups) == ["trainer.max_epochs=5"]
    assert report.shared_overrides(groups[:1]) == []


def test_unstructured_pruning_rows_carry_the_dense_latency_note(tmp_path: Path) -> None:
    write_job(
        tmp_path,
        "0",
        make_result(
            "compress=prune_unstructured", 0, 0.9, compress="prune_unstructured", compressed=model_block(0.9, 1000)
        ),
    )
    write_job(tmp_path, "1", make_result("compress=none", 0, 0.9))
    records = collect(tmp_path)
    rows = summarize(records)
    assert "dense latency does not change" in report.markdown_text(records, rows, "params", "t")
    others = [row for row in rows if row["compress"] != "prune_unstructured"]
    assert "dense latency" not in report.markdown_text(records, others, "params", "t")


def test_compression_methods_get_their_own_markers() -> None:
    rows = summarize(
        ok_records(
            [
                make_result("compress=none", 0, 0.95),
                make_result(
                    "compress=quant_dynamic", 0, 0.94, compress="quant_dynamic", compressed=model_block(0.94, 1000)
                ),
            ]
        )
    )
    labels = [line.get_label() for line in accuracy_figure(rows, "params", "t").axes[0].containers]
    assert {"method=kd", "method=kd, compress=quant_dynamic"} <= set(labels)


def test_teachers_without_a_cache_key_get_a_row_per_architecture_and_size() -> None:
    """Teachers trained alongside their students (distill=online, dml's peer) have no cache key;
    an online cnn teacher and a dml peer must not be averaged into one reference row."""
    results = []
    for seed, params in ((0, 65834), (1, 65834), (0, 4370)):
        result = make_result(GROUP_A if params > 5000 else GROUP_B, seed, 0.9)
        result["teacher"].update(cache="cotrained", cache_key="", params=params)
        results.append(result)
    teachers = [row for row in summarize(ok_records(results)) if row["role"] == "teacher"]
    assert sorted((row["teacher_key"], row["n_seeds"], row["params_mean"]) for row in teachers) == [
        ("cotrained:cnn:4370", 1, 4370),
        ("cotrained:cnn:65834", 2, 65834),
    ]
    assert {row["group"] for row in teachers} == {"teacher cotrained:cnn:4370", "teacher cotrained:cnn:65834"}
