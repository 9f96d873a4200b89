"""Epoch time of distillation with cached teacher logits, with the live teacher, and of
cross-entropy-only training, side by side.

    PYTHONPATH=src:. python3 benchmarks/cached_teacher.py [--repeats R] [--threads T] [--samples N]
        [--setups digits plain resnet]

For each setup the same student (same initial weights, data, batch size, optimizer) is trained
three ways through ``DistillationModule`` and the Trainer of ``training.make_trainer``, fitted
as a run fits it (``data.adapter.fit_arguments``, seeded right before the fit):

- *CE only*: ``distill=none``, no teacher at all: the floor a distillation epoch can reach;
- *KD cached*: ``distill=kd`` reading the teacher's logits from the table of
  ``teacher.outputs`` (``teacher_outputs.cache=cached``, what ``auto`` picks here); with a
  plain datamodule the student trains on the indexed copy of its training DataLoader;
- *KD live*: ``distill=kd`` running the frozen teacher at every step (``teacher_outputs.cache=live``).

What is timed, in the same runs: the *epoch* as a run has it, from one ``on_train_epoch_start``
to the next (to ``on_train_end`` for the last): training steps, validation, epoch-end logging
and the save of the best-``val/acc`` checkpoint, as ``benchmarks/overhead.py`` times it; and
the *training steps* alone, from ``on_train_epoch_start`` to the start of validation, where
the difference between the variants is undiluted. The first epoch of every run is dropped
(warm-up), and one untimed run of each comes first. The three runs of a round go in a
rotating order, R rounds in this one process with fixed torch threads, so a busy machine slows
all alike; each round gives one ratio per variant against CE only, and the median over rounds
is reported. The one-time cost of filling the table (one eval pass of the teacher over the
training split) is printed apart: a sweep pays it once per teacher.

Setups: ``digits``, the default pair of ``conf/train.yaml`` (CNN teacher, MLP student) on the
in-memory digits; ``plain``, the same pair on the plain LightningDataModule of
``examples/my_datamodule`` (a TensorDataset of 420 12x12 training images behind DataLoaders);
and ``resnet``, resnet56 -> resnet20 on CIFAR-shaped (3x32x32, 10 classes) synthetic data.
Target: KD cached / CE only <= 1.10 per epoch. The exit status is 1 if a setup misses it.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
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
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "src", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from tests.conftest import compose_cfg  # noqa: E402

from distillab import build as parts_of  # noqa: E402
from distillab import training  # noqa: E402
from distillab.data import adapter  # noqa: E402
from distillab.distill.methods.none import CrossEntropy  # noqa: E402
from distillab.distill.module import DistillationModule  # noqa: E402
from distillab.steps.teacher import outputs as teacher_outputs  # noqa: E402
from distillab.steps.teacher.training import scheduler_factory  # noqa: E402

EXAMPLE = ROOT / "examples" / "my_datamodule"

warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
for _name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
    logging.getLogger(_name).setLevel(logging.WARNING)  # Lightning's banner and tips, once per fit

COMMON = ["trainer.enable_progress_bar=false", "logger=none", "trainer.accelerator=cpu"]
VARIANTS = ("ce", "cached", "live")
TARGET = 1.10


@dataclass
class Setup:
    key: str
    name: str
    overrides: list[str]
    epochs: int  # per run, the first dropped
    data: Path | None = None  # a data config of its own (a plain datamodule), instead of conf/data/


def setups(samples: int) -> list[Setup]:
    return [
        # the default pair of conf/train.yaml: 20 steps of ~1-3 ms per epoch
        Setup("digits", "default: MLP[32] <- CNN(32,2), digits", [], 12),
        # the same pair on a plain LightningDataModule: a TensorDataset behind DataLoaders, 14 steps of 32
        Setup("plain", "MLP[32] <- CNN(32,2), plain datamodule", [], 12, EXAMPLE / "conf" / "data" / "my_data.yaml"),
        # CIFAR-shaped synthetic data; 70 % of the samples train (the split makes val and test 15 % each)
        Setup(
            "resnet",
            "resnet20 <- resnet56, synthetic 3x32x32",
            [
                "data=synthetic",
                "data.input_shape=[3,32,32]",
                f"data.num_samples={samples}",
                "teacher=resnet56",
                "student=resnet20",
            ],
            3,
        ),
    ]


@dataclass
class Timing:
    wall: list[float] = field(default_factory=list)  # seconds per epoch, first epoch dropped
    cpu: list[float] = field(default_factory=list)
    steps: list[float] = field(default_factory=list)  # wall seconds of the training steps of an epoch


class EpochClock(pl.Callback):
    """Marks the start of every training epoch and of its validation, and the end of training."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float]] = []
        self.validation: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.validation.append(time.perf_counter())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))


@dataclass
class Parts:
    cfg: DictConfig
    data: Any
    student: nn.Module  # initial weights, copied for every run
    teacher: nn.Module
    table: torch.Tensor
    table_s: float


def build(cfg: DictConfig) -> Parts:
    data = parts_of.part("data", cfg.data)
    info = adapter.prepare(data, int(cfg.seed))
    if adapter.index_obstacle(data) is not None:
        raise RuntimeError(f"no table for this data: {adapter.index_obstacle(data)}")
    torch.manual_seed(0)
    student = parts_of.model("student", cfg.student, info)
    teacher = parts_of.model("teacher", cfg.teacher, info).eval()
    start = time.perf_counter()
    # as a run fills it: the training inputs in sample order, in training-size batches
    table = teacher_outputs.compute(teacher, adapter.training_inputs(data), int(data.batch_size))
    return Parts(cfg, data, student, teacher, table, time.perf_counter() - start)


def run(parts: Parts, variant: str, epochs: int, workdir: Path) -> Timing:
    cfg = parts.cfg
    if variant == "ce":
        loss, teacher, table = CrossEntropy(), None, None
    else:
        loss = instantiate(cfg.distill)
        teacher, table = (None, parts.table) if variant == "cached" else (parts.teacher, None)
    module = DistillationModule(
        copy.deepcopy(parts.student),
        teacher,
        loss,
        teacher_table=table,
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=scheduler_factory(cfg.optim),
    )
    trainer = training.make_trainer(
        cfg.trainer, cfg.get("callbacks"), [], workdir / "checkpoints", epochs, root_dir=workdir
    )
    clock = EpochClock()
    trainer.callbacks.insert(0, clock)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)  # as a run seeds the fit
    trainer.fit(module, **adapter.fit_arguments(parts.data, indexed=table is not None))
    pairs = list(zip(clock.marks, clock.marks[1:]))
    if len(pairs) != epochs or len(clock.validation) != epochs:
        raise RuntimeError(f"expected {epochs} epoch and validation times, got {len(pairs)}, {len(clock.validation)}")
    steps = [validation - start[0] for start, validation in zip(clock.marks, clock.validation)]
    return Timing([b[0] - a[0] for a, b in pairs][1:], [b[1] - a[1] for a, b in pairs][1:], steps[1:])


def benchmark(setup: Setup, repeats: int, workdir: Path) -> dict[str, Any]:
    cfg = compose_cfg(COMMON + setup.overrides, workdir / "run")
    if setup.data is not None:  # a plain datamodule, importable from its folder
        sys.path.insert(0, str(setup.data.parents[2]))
        with open_dict(cfg):
            cfg.data = OmegaConf.load(setup.data)
    parts = build(cfg)
    for variant in VARIANTS:  # warm-up, untimed
        run(parts, variant, 2, workdir / f"warm-up-{variant}")
    timings: dict[str, list[Timing]] = {variant: [] for variant in VARIANTS}
    for i in range(repeats):
        order = VARIANTS[i % 3 :] + VARIANTS[: i % 3]
        for variant in order:
            timings[variant].append(run(parts, variant, setup.epochs, workdir / f"r{i}-{variant}"))

    def ratios(variant: str, kind: str = "wall") -> list[float]:
        return [
            statistics.median(getattr(v, kind)) / statistics.median(getattr(c, kind))
            for v, c in zip(timings[variant], timings["ce"])
        ]

    def ms(variant: str, kind: str = "wall") -> float:
        return 1e3 * statistics.median(t for timing in timings[variant] for t in getattr(timing, kind))

    params = (sum(p.numel() for p in parts.student.parameters()), sum(p.numel() for p in parts.teacher.parameters()))
    return {
        "setup": setup,
        "params": params,
        "train": len(parts.table),
        "steps": len(parts.data.train_dataloader()),
        "table_ms": 1e3 * parts.table_s,
        "ms": {variant: ms(variant) for variant in VARIANTS},
        "steps_ms": {variant: ms(variant, "steps") for variant in VARIANTS},
        "rounds": {variant: ratios(variant) for variant in ("cached", "live")},
        "ratio": {variant: statistics.median(ratios(variant)) for variant in ("cached", "live")},
        "cpu_ratio": {variant: statistics.median(ratios(variant, "cpu")) for variant in ("cached", "live")},
        "steps_ratio": {variant: statistics.median(ratios(variant, "steps")) for variant in ("cached", "live")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="rounds of the three runs, interleaved (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, fixed for all runs (default 1)")
    parser.add_argument(
        "--samples",
        type=int,
        default=1500,
        help="synthetic samples of the resnet setup, 70%% of them train (default 1500)",
    )
    keys = [setup.key for setup in setups(0)]
    parser.add_argument("--setups", nargs="+", choices=keys, default=keys, help="which setups (default: all)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1 or args.samples < 100:
        parser.error("need --repeats >= 1, --threads >= 1, --samples >= 100")
    torch.set_num_threads(args.threads)

    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="distillab-cached-teacher-") as tmp:
        for setup in [setup for setup in setups(args.samples) if setup.key in args.setups]:
            rows.append(benchmark(setup, args.repeats, Path(tmp) / str(len(rows))))
    load_after = os.getloadavg()
    if torch.get_num_threads() != args.threads:
        raise RuntimeError(f"torch threads changed during the runs: {torch.get_num_threads()}")

    print(
        f"torch {torch.__version__}, lightning {pl.__version__}, threads={args.threads}, {args.repeats} rounds "
        f"of CE only / KD cached / KD live (first epoch of a run dropped); "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after on {os.cpu_count()} CPUs"
    )
    for row in rows:
        rounds = row["rounds"]
        print(
            f"  {row['setup'].name}: {row['train']} training samples, {row['steps']} steps/epoch; "
            f"table filled once in {row['table_ms']:.0f} ms; cached/CE per round "
            + " ".join(f"{r:.3f}" for r in rounds["cached"])
            + "; live/CE per round "
            + " ".join(f"{r:.3f}" for r in rounds["live"])
            + f"; CPU-time ratios cached {row['cpu_ratio']['cached']:.3f}, live {row['cpu_ratio']['live']:.3f}"
            + "; training steps alone (no validation, checkpoint): ms CE/cached/live "
            + "/".join(f"{row['steps_ms'][v]:.1f}" for v in VARIANTS)
            + f", cached/CE {row['steps_ratio']['cached']:.3f}, live/CE {row['steps_ratio']['live']:.3f}"
        )
    print(
        f"{'setup':<42} {'params student/teacher':>22} {'CE ms/ep':>9} {'cached ms/ep':>12} {'live ms/ep':>10} "
        f"{'cached/CE':>9} {'target':>7} {'live/CE':>8} {'result':>6}"
    )
    ok = True
    for row in rows:
        passed = row["ratio"]["cached"] <= TARGET
        ok &= passed
        params = f"{row['params'][0]:,}/{row['params'][1]:,}"
        ms = row["ms"]
        print(
            f"{row['setup'].name:<42} {params:>22} {ms['ce']:>9.1f} {ms['cached']:>12.1f} {ms['live']:>10.1f} "
            f"{row['ratio']['cached']:>9.3f} {'<= ' + format(TARGET, '.2f'):>7} {row['ratio']['live']:>8.3f} "
            f"{'PASS' if passed else 'FAIL':>6}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
