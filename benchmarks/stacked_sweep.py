"""Wall-clock time of the 27-job λ × T × seed digits sweep under ``hydra/launcher=stacked``, divided
by the wall-clock time of one job of it; and the training throughput of 27 stacked students against
the same 27 trained one after another.

    PYTHONPATH=src:. python3 benchmarks/stacked_sweep.py [--rounds 1] [--basic] [--threads N]

Both arms are the commands a user types, timed from start to exit, with the default digits pair
(CNN teacher, MLP[32] student, KD, 100 student epochs, CSV logger) and no progress bar:

    python train.py distill.lam=0.5 distill.temperature=2 seed=0                        (one job)
    python train.py -m hydra/launcher=stacked distill.lam=0.1,0.5,0.9 \\
        distill.temperature=1,2,4 seed=0,1,2                                            (27 jobs)

so both include what every run pays once (interpreter and imports, the check of the command line,
for the sweep the report at the end). A warm-up run trains the teacher into a private cache
first, so both arms read it from there (a cached teacher, its outputs cached too). ``--basic`` also
runs the sweep under the basic launcher (a few minutes), prints its ratio, and compares every
job's test accuracy between the two launchers (the largest difference, in test images).
``--threads N`` adds ``num_threads=N`` to every command (default: torch's own thread count).

The throughput part runs in this process on one thread: one epoch of 27 digits MLP students
with their own λ, T and seed (``distillab.stacked.fit``) against the same 27 students each
trained for one epoch by a plain PyTorch loop (forward, KD loss, backward, Adam step), on the
same batches. Printed: student-steps per second of each, and their ratio.

The exit status is 1 if the sweep / one-job ratio exceeds the target (3), 2 if a run failed.
Other work on the machine skews the result: compare the printed load averages with the cores.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sweep_parallel import load, train  # the same timed command and load readout

ROOT = Path(__file__).resolve().parents[1]
TARGET = 3.0
SWEEP = ["distill.lam=0.1,0.5,0.9", "distill.temperature=1,2,4", "seed=0,1,2"]
ONE_JOB = ["distill.lam=0.5", "distill.temperature=2", "seed=0"]
JOBS = 27


def records(sweep: Path) -> dict[str, dict]:
    """The sweep's results by their overrides (minus the sweep folder), all of which must be ok."""
    found = {}
    for path in sweep.glob("*/results.json"):
        record = json.loads(path.read_text())
        if record.get("status") != "ok":
            print(f"{path}: status {record.get('status')}: {record.get('error')}", file=sys.stderr)
            sys.exit(2)
        found[" ".join(o for o in record["overrides"] if not o.startswith("hydra."))] = record
    if len(found) != JOBS:
        print(f"{sweep}: expected {JOBS} results, found {len(found)}", file=sys.stderr)
        sys.exit(2)
    return found


def throughput() -> tuple[float, float]:
    """Student-steps per second of 27 stacked students and of the same 27 one after another."""
    from distillab import conf
    from distillab.distill.methods.kd import KD, kd_terms
    from distillab.models import MLP
    from distillab.stacked import fit

    torch.set_num_threads(1)
    data = conf.build("data", "digits")
    x_all, y_all = data.splits["train"]
    table = torch.randn(len(y_all), 10)  # a teacher's logits; the cost does not depend on their values
    settings = [
        (lam, temperature, seed) for lam in (0.1, 0.5, 0.9) for temperature in (1.0, 2.0, 4.0) for seed in (0, 1, 2)
    ]

    def students() -> list[torch.nn.Module]:
        built = []
        for _, _, seed in settings:
            torch.manual_seed(seed)
            built.append(MLP((1, 8, 8), 10, [32], 0.0, 0.0))
        return built

    members = [
        fit.Member(student, KD(lam, temperature, False), functools.partial(torch.optim.Adam, lr=1e-3), seed)
        for student, (lam, temperature, seed) in zip(students(), settings)
    ]
    fit.GroupFit(members, data, None, table, None, 1, torch.device("cpu")).run()  # warm-up
    start = time.perf_counter()
    fit.GroupFit(members, data, None, table, None, 3, torch.device("cpu")).run()
    stacked_seconds = time.perf_counter() - start
    steps = 3 * len(data.train_dataloader())

    def one_after_another() -> None:
        for student, (lam, temperature, seed) in zip(students(), settings):
            optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
            for epoch in range(3):
                order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(seed + epoch))
                for start in range(0, len(order), 64):
                    index = order[start : start + 64]
                    logits = student(x_all[index])
                    terms = kd_terms(logits, table[index], y_all[index], lam, temperature)
                    optimizer.zero_grad(set_to_none=True)
                    (terms["ce"] + terms["kd"]).backward()
                    optimizer.step()
            with torch.no_grad():
                F.cross_entropy(student(data.splits["val"][0]), data.splits["val"][1])

    start = time.perf_counter()
    one_after_another()
    sequential_seconds = time.perf_counter() - start
    return JOBS * steps / stacked_seconds, JOBS * steps / sequential_seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="alternate the arms this many times; median ratio")
    parser.add_argument("--basic", action="store_true", help="also run the sweep under the basic launcher")
    parser.add_argument("--threads", type=int, default=None, help="num_threads of every run (default: torch's)")
    args = parser.parse_args()

    cores = os.cpu_count()
    print(
        f"python {platform.python_version()}, torch {torch.__version__}; {cores} cores; "
        f"load average (1/5/15 min) before: {load()}"
    )
    ratios, ones, basic_ratio = [], [], None
    with tempfile.TemporaryDirectory(prefix="stacked_sweep-") as tmp:
        folder = Path(tmp)
        shared = [f"paths.cache_dir={folder / 'cache'}", "trainer.enable_progress_bar=false"]
        shared += [f"num_threads={args.threads}"] if args.threads else []
        warm = train([*ONE_JOB, *shared, f"hydra.run.dir={folder / 'warmup'}"], folder / "warmup.log")
        print(f"warm-up run (trains and caches the teacher and its outputs): {warm:.1f} s")
        print(f"{'round':>5}  {'run':<28} {'wall s':>8}  load after")
        for round_ in range(args.rounds):
            wall = {}
            for arm in ("one", "stacked") if round_ % 2 == 0 else ("stacked", "one"):
                if arm == "one":
                    command = [*ONE_JOB, *shared, f"hydra.run.dir={folder / f'one-{round_}'}"]
                else:
                    command = [
                        "-m",
                        "hydra/launcher=stacked",
                        *SWEEP,
                        *shared,
                        f"hydra.sweep.dir={folder / f'stacked-{round_}'}",
                    ]
                wall[arm] = train(command, folder / f"{arm}-{round_}.log")
                label = "one job" if arm == "one" else f"{JOBS} jobs, hydra/launcher=stacked"
                print(f"{round_:>5}  {label:<28} {wall[arm]:>8.1f}  {load()}")
            ratios.append(wall["stacked"] / wall["one"])
            ones.append(wall["one"])
        stacked = records(folder / "stacked-0")
        if args.basic:
            seconds = train(["-m", *SWEEP, *shared, f"hydra.sweep.dir={folder / 'basic'}"], folder / "basic.log")
            basic_ratio = seconds / statistics.median(ones)
            basic = records(folder / "basic")
            test_images = basic[next(iter(basic))]["test_samples"]
            gaps = [abs(stacked[k]["student"]["test"]["acc"] - basic[k]["student"]["test"]["acc"]) for k in basic]
            same_epoch = sum(stacked[k]["student"]["best_epoch"] == basic[k]["student"]["best_epoch"] for k in basic)
            print(f"      {JOBS} jobs, hydra/launcher=basic  {seconds:>8.1f}  {load()}")
            print(
                f"stacked vs basic, test accuracy per job: largest difference {max(gaps):.4f} "
                f"({round(max(gaps) * test_images)} of {test_images} test images), mean {statistics.mean(gaps):.4f}; "
                f"same best epoch in {same_epoch} of {JOBS} jobs"
            )
    stacked_rate, sequential_rate = throughput()
    print(
        f"training throughput, 27 digits MLP students, 1 thread: stacked {stacked_rate:.0f} student-steps/s, "
        f"one after another {sequential_rate:.0f} student-steps/s ({stacked_rate / sequential_rate:.1f}x)"
    )
    if basic_ratio is not None:
        print(f"basic sweep / one job: {basic_ratio:.1f}x")
    ratio = statistics.median(ratios)
    verdict = "PASS" if ratio <= TARGET else "FAIL"
    print(f"stacked sweep of {JOBS} jobs / one job: {ratio:.2f}x (target <= {TARGET}) {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
