"""Wall-clock time of one sweep of equal digits jobs run one after another (``hydra/launcher=basic``)
against the same sweep run two jobs at a time (``hydra/launcher=joblib hydra.launcher.n_jobs=2``).

    PYTHONPATH=src:. python3 benchmarks/sweep_parallel.py [--jobs 8] [--n-jobs 2] [--epochs 300] [--rounds 1]

Each arm is the command a user types, timed from start to exit: ``python train.py -m
seed=0,1,...,7`` with the default digits pair (CNN teacher, MLP[32] student, KD), ``--epochs``
student epochs, no logger and no progress bar, plus the launcher. So the times include what
every sweep pays once (interpreter and imports, the pre-run check of the overrides, the report
at the end) and, for joblib, the start of its worker processes. A warm-up run trains the teacher
into a private cache first, so every job of both arms finds it there and the jobs are equal.

Threads: under basic each job runs torch with its default thread count (one per core); under
joblib each job gets cores // n_jobs threads (``distillab.slots``). With ``--rounds`` > 1 the
order of the arms alternates (basic first in even rounds) and the median ratio is reported.

Printed: a header (versions, cores, the load average before the run), one line per arm and
round (wall seconds, the jobs' mean in-job seconds from results.json, the load average after),
then the ratio basic / joblib of the wall times with the target (>= 1.6 with 2 jobs at once on
2 cores) and PASS/FAIL. The exit status is 1 if the ratio misses the target, 2 if a sweep failed.
Other work on the machine skews the result, the basic arm most (its two threads per job wait
for busy cores): compare the printed load averages with the core count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hydra
import joblib
import torch

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.6


def common(epochs: int, cache: Path) -> list[str]:
    # the teacher's own epochs only shorten the warm-up; both arms read the same cached teacher
    return [
        f"trainer.max_epochs={epochs}",
        "teacher.recipe.max_epochs=5",
        "logger=none",
        "trainer.enable_progress_bar=false",
        f"paths.cache_dir={cache}",
    ]


def launcher_args(name: str, n_jobs: int) -> list[str]:
    return ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={n_jobs}"] if name == "joblib" else []


def train(args: list[str], log: Path) -> float:
    """``python train.py ARGS``; its wall seconds. Output goes to ``log``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        print(f"failed (exit {done.returncode}): python train.py {' '.join(args)}; see {log}", file=sys.stderr)
        sys.exit(2)
    return seconds


def job_seconds(sweep: Path, jobs: int) -> float:
    """Mean in-job time (results.json timing_s.total) of the sweep's jobs, all of which must be ok."""
    records = [json.loads(path.read_text()) for path in sweep.glob("*/results.json")]
    if len(records) != jobs or any(r.get("status") != "ok" for r in records):
        print(f"{sweep}: expected {jobs} ok jobs, found {[r.get('status') for r in records]}", file=sys.stderr)
        sys.exit(2)
    return statistics.mean(r["timing_s"]["total"] for r in records)


def load() -> str:
    return "/".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8, help="jobs of the sweep (seeds 0..jobs-1)")
    parser.add_argument("--n-jobs", type=int, default=2, help="hydra.launcher.n_jobs of the joblib arm")
    parser.add_argument("--epochs", type=int, default=300, help="student epochs per job (300: about 10 s)")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    cores = joblib.cpu_count()
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, hydra {hydra.__version__}, "
        f"joblib {joblib.__version__}; {cores} cores; {args.jobs} jobs of {args.epochs} epochs; "
        f"load average (1/5/15 min) before: {load()}"
    )
    if os.getloadavg()[0] > cores / 2:
        print(
            f"warning: the machine is busy (1-minute load {os.getloadavg()[0]:.2f} on {cores} cores); "
            "the ratio will not be that of an idle machine"
        )
    seeds = "seed=" + ",".join(str(seed) for seed in range(args.jobs))
    ratios = []
    with tempfile.TemporaryDirectory(prefix="sweep_parallel-") as tmp:
        folder = Path(tmp)
        shared = common(args.epochs, folder / "cache")
        warm = train([*shared, f"hydra.run.dir={folder / 'warmup'}"], folder / "warmup.log")
        print(f"warm-up run (trains and caches the teacher): {warm:.1f} s")
        print(f"{'round':>5}  {'launcher':<22} {'wall s':>8} {'s per job':>10}  load after")
        for round_ in range(args.rounds):
            order = ["basic", "joblib"] if round_ % 2 == 0 else ["joblib", "basic"]
            wall = {}
            for name in order:
                sweep = folder / f"{name}-{round_}"
                wall[name] = train(
                    ["-m", seeds, *shared, *launcher_args(name, args.n_jobs), f"hydra.sweep.dir={sweep}"],
                    folder / f"{name}-{round_}.log",
                )
                label = name if name == "basic" else f"joblib n_jobs={args.n_jobs}"
                print(f"{round_:>5}  {label:<22} {wall[name]:>8.1f} {job_seconds(sweep, args.jobs):>10.2f}  {load()}")
            ratios.append(wall["basic"] / wall["joblib"])
    ratio = statistics.median(ratios)
    verdict = "PASS" if ratio >= TARGET else "FAIL"
    print(
        f"wall-clock ratio basic / joblib (n_jobs={args.n_jobs}): {ratio:.2f}x faster in parallel "
        f"(target >= {TARGET}) {verdict}"
    )
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
