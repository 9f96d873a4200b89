"""Per-epoch overhead of distillab's training path against a plain PyTorch loop.

    PYTHONPATH=src:. python3 benchmarks/overhead.py [--epochs N] [--repeats R] [--threads T]

For each setup the same student is distilled from the same (untrained, frozen) teacher for N
epochs on the same data and batch size, once through distillab -- ``DistillationModule`` and
the Trainer that ``training.make_trainer`` builds from the real config (progress bar off as in
sweeps, no logger, the real best-on-val/acc checkpoint callback) -- and once through the plain
loop below, which does the same work per epoch: teacher forward in eval mode under no_grad,
``kd_loss``, an optimizer step per batch (the config's: Adam), a validation pass computing
accuracy, and an in-memory copy of the best state_dict as the checkpoint equivalent.

The two alternate R times in this one process (plain first in even rounds, distillab first in
odd ones) with fixed torch threads, so a busy machine slows both alike; each round gives one
ratio and the median of the R ratios is reported. One untimed run of each comes first
(warm-up), and the first epoch of every run is dropped too.

What is timed: one epoch is the span from one ``on_train_epoch_start`` to the next (to
``on_train_end`` for the last epoch), i.e. everything the fit loop does per epoch: training
batches, validation, epoch-end logging and the checkpoint save. The plain loop times the same
span around its epoch body. Trainer construction and fit set-up are outside it (printed
separately as "fit set-up"). Wall time (``perf_counter``) decides PASS/FAIL; the ratio of
process CPU time is printed beside it, as a check on a loaded machine.

Importing Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1 for the whole process, which makes
every ``torch.cuda.is_available()`` (torch's optimizers call it once per step) slower on a
machine without a GPU. The plain loop runs without it, as a script that never imports
Lightning would.

Printed: notes, then a table with one line per setup -- parameters, median plain and
distillab ms/epoch, the ratio distillab / plain, the target and PASS/FAIL -- the default
digits pair on the last line. The exit status is 1 if a setup misses its target.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "src", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from tests.conftest import compose_cfg  # noqa: E402

from distillab import build as parts  # noqa: E402
from distillab import training  # noqa: E402
from distillab.data import adapter  # noqa: E402
from distillab.distill.methods.base import needs_teacher  # noqa: E402
from distillab.distill.methods.kd import kd_loss  # noqa: E402
from distillab.distill.module import DistillationModule, without_env  # noqa: E402
from distillab.steps.teacher.training import scheduler_factory  # noqa: E402

warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")

COMMON = ["trainer.enable_progress_bar=false", "logger=none", "trainer.accelerator=cpu"]
NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


@dataclass
class Setup:
    name: str
    overrides: list[str]
    target: float


SETUPS = [
    # compute-bound: a 4.2M-parameter MLP student under a 10.5M-parameter MLP teacher on
    # CIFAR-shaped synthetic data (700 training samples), ~40 ms per step on one core
    Setup(
        "compute-bound: MLP[1024,1024] <- MLP[2048,2048], synthetic 3x32x32",
        [
            "data=synthetic",
            "data.input_shape=[3,32,32]",
            "data.num_samples=1000",
            "teacher=mlp",
            "teacher.hidden=[2048,2048]",
            "student=mlp",
            "student.hidden=[1024,1024]",
        ],
        1.05,
    ),
    # the default pair of conf/train.yaml on digits: ~2.5 ms per step, most of it the teacher
    Setup("default: MLP[32] <- CNN(32,2), digits", [], 1.5),
]


@dataclass
class Timing:
    wall: list[float] = field(default_factory=list)  # seconds per epoch, first epoch dropped
    cpu: list[float] = field(default_factory=list)
    setup: float = 0.0  # wall seconds of a fit outside its epochs


class EpochClock(pl.Callback):
    """Marks the start of every training epoch and the end of training."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float]] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))


def _spans(marks: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    pairs = list(zip(marks, marks[1:]))
    return [b[0] - a[0] for a, b in pairs], [b[1] - a[1] for a, b in pairs]


# -- the two ways of training ----------------------------------------------------------------
def build(cfg: DictConfig, seed: int = 0) -> tuple[Any, nn.Module, nn.Module]:
    """Data, student and teacher of ``cfg``, with the same initial weights every time."""
    data = instantiate(cfg.data)
    info = adapter.prepare(data, int(cfg.seed))
    torch.manual_seed(seed)
    student = parts.model("student", cfg.student, info)
    teacher = parts.model("teacher", cfg.teacher, info)
    return data, student, teacher


def run_distillab(cfg: DictConfig, epochs: int, workdir: Path) -> Timing:
    data, student, teacher = build(cfg)
    loss = instantiate(cfg.distill)
    module = DistillationModule(
        student,
        teacher if needs_teacher(loss) else None,
        loss,
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=scheduler_factory(cfg.optim),
    )
    trainer = training.make_trainer(
        cfg.trainer, cfg.get("callbacks"), [], workdir / "checkpoints", epochs, root_dir=workdir
    )
    clock = EpochClock()
    trainer.callbacks.insert(0, clock)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    total = time.perf_counter() - start
    wall, cpu = _spans(clock.marks)
    if len(wall) != epochs:
        raise RuntimeError(f"expected {epochs} epoch times, got {len(wall)}")
    return Timing(wall[1:], cpu[1:], total - sum(wall))


def run_plain(cfg: DictConfig, epochs: int) -> Timing:
    data, student, teacher = build(cfg)
    lam, temperature = float(cfg.distill.lam), float(cfg.distill.temperature)
    # the optimizer and learning-rate schedule of the config (Adam, constant), as distillab's
    optimizer = instantiate(cfg.optim.optimizer)(student.parameters())
    make_scheduler = scheduler_factory(cfg.optim)
    scheduler = make_scheduler(optimizer) if make_scheduler is not None else None
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    augment = data.augment if getattr(data, "augments", False) else None
    train_batches, val_batches = data.train_dataloader(), data.val_dataloader()
    best_acc, best_state = -1.0, None
    marks = []
    with without_env(NVML_CHECK):
        for _ in range(epochs):
            marks.append((time.perf_counter(), time.process_time()))
            student.train()
            for x, y, _index in train_batches:
                if augment is not None:
                    x = augment(x)
                with torch.no_grad():
                    teacher_logits = teacher(x)
                loss = kd_loss(student(x), teacher_logits, y, lam, temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            student.eval()
            correct = total = 0
            with torch.no_grad():
                for x, y, _index in val_batches:
                    correct += int((student(x).argmax(dim=1) == y).sum())
                    total += len(y)
            acc = correct / total
            if acc > best_acc:  # ties keep the earlier epoch, as the checkpoint callback does
                best_acc = acc
                best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
            if scheduler is not None:
                scheduler.step()
        marks.append((time.perf_counter(), time.process_time()))
    assert best_state is not None
    wall, cpu = _spans(marks)
    return Timing(wall[1:], cpu[1:])


# -- the benchmark -----------------------------------------------------------------------------
def benchmark(setup: Setup, epochs: int, repeats: int, workdir: Path) -> dict[str, Any]:
    cfg = compose_cfg(COMMON + setup.overrides, workdir / "run")
    data, student, teacher = build(cfg)
    params = (sum(p.numel() for p in student.parameters()), sum(p.numel() for p in teacher.parameters()))

    def distillab(tag: str, n: int) -> Timing:
        return run_distillab(cfg, n, workdir / tag)

    run_plain(cfg, 2)  # warm-up, untimed
    distillab("warm-up", 2)
    plain, lightning = [], []
    for i in range(repeats):
        if i % 2 == 0:
            plain.append(run_plain(cfg, epochs))
            lightning.append(distillab(f"r{i}", epochs))
        else:
            lightning.append(distillab(f"r{i}", epochs))
            plain.append(run_plain(cfg, epochs))

    def ratios(kind: str) -> list[float]:
        return [
            statistics.median(getattr(d, kind)) / statistics.median(getattr(p, kind)) for d, p in zip(lightning, plain)
        ]

    return {
        "setup": setup,
        "params": params,
        "steps": len(data.train_dataloader()),
        "plain_ms": 1e3 * statistics.median(t for run in plain for t in run.wall),
        "distillab_ms": 1e3 * statistics.median(t for run in lightning for t in run.wall),
        "ratios": ratios("wall"),
        "ratio": statistics.median(ratios("wall")),
        "cpu_ratio": statistics.median(ratios("cpu")),
        "fit_setup_ms": 1e3 * statistics.median(run.setup for run in lightning),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is warm-up (default 4)")
    parser.add_argument("--repeats", type=int, default=9, help="runs of each, interleaved (default 9)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, fixed for all runs (default 1)")
    args = parser.parse_args(argv)
    if args.epochs < 2 or args.repeats < 1 or args.threads < 1:
        parser.error("need --epochs >= 2 (the first epoch is warm-up), --repeats >= 1, --threads >= 1")
    torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory(prefix="distillab-overhead-") as tmp:
        for setup in SETUPS:
            workdir = Path(tmp) / str(len(rows))
            rows.append(benchmark(setup, args.epochs, args.repeats, workdir))
    if torch.get_num_threads() != args.threads:
        raise RuntimeError(f"torch threads changed during the runs: {torch.get_num_threads()}")

    print(
        f"torch {torch.__version__}, lightning {pl.__version__}, threads={args.threads}, "
        f"{args.epochs} epochs x {args.repeats} runs each (first epoch of a run dropped), "
        "checkpoint: the pipeline's ModelCheckpoint"
    )
    for row in rows:
        print(
            f"  {row['setup'].name}: {row['steps']} steps/epoch; wall ratio per round "
            + " ".join(f"{r:.3f}" for r in row["ratios"])
            + f"; CPU-time ratio {row['cpu_ratio']:.3f}; fit set-up {row['fit_setup_ms']:.0f} ms (not in ms/epoch)"
        )
    print(
        f"{'setup':<68} {'params student/teacher':>22} {'plain ms/ep':>11} {'distillab ms/ep':>15} "
        f"{'ratio':>6} {'target':>7} {'result':>6}"
    )
    ok = True
    for row in rows:
        target = row["setup"].target
        passed = row["ratio"] <= target
        ok &= passed
        params = f"{row['params'][0]:,}/{row['params'][1]:,}"
        print(
            f"{row['setup'].name:<68} {params:>22} {row['plain_ms']:>11.2f} {row['distillab_ms']:>15.2f} "
            f"{row['ratio']:>6.3f} {'<= ' + format(target, '.2f'):>7} {'PASS' if passed else 'FAIL':>6}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
