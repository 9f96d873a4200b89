"""Time per training epoch of every distillation method, relative to ``distill=kd``, on the
digits pair (teacher ``cnn``, student ``cnn`` width 8), and the parameters each method adds.

    PYTHONPATH=src:. python3 benchmarks/method_epoch_time.py [--epochs 5] [--rounds 3] [--threads 1]
    PYTHONPATH=src:. python3 benchmarks/method_epoch_time.py --methods kd,crd,reviewkd

Each method is built by the real run (``pipeline.prepare`` on the composed config: the method's
YAML, its layers bound, its adapters built) and trained by the real fit (``steps.fit``: the
teacher's logits from the cached table when the run would use it, the live teacher otherwise;
co-training methods train their peers). The teacher is untrained: the time of an epoch does not
depend on its weights. The methods alternate within each round, so a busy machine slows them
alike; the first epoch of each fit is warm-up. Output: per method the median ms per training
epoch, its ratio to KD's in the same round (median over rounds), how the teacher's logits were
obtained, and the parameters trained beside the student (adapters, heads, other peers), which are
not deployed.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")]

from distillab import conf, pipeline, training  # noqa: E402
from distillab.distill.methods.base import cotrains  # noqa: E402
from distillab.steps import fit  # noqa: E402
from distillab.steps.teacher import cache  # noqa: E402

PAIR = ["student=cnn", "student.width=8", "teacher=cnn"]


class EpochClock(pl.Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if hasattr(self, "_start") and trainer.current_epoch == len(self.seconds):
            self.seconds.append(time.perf_counter() - self._start)


class ClockedFitting(training.Fitting):
    """The run's Trainer with the clock added and no loggers."""

    def __init__(self, base: training.Fitting, clock: EpochClock) -> None:
        super().__init__(base.trainer, base.callbacks, base.root_dir, lambda role: [])
        self.clock = clock

    def trainer_for(self, role, checkpoint_dir, max_epochs, extra=None, single_process=False):
        return super().trainer_for(None, checkpoint_dir, max_epochs, [*(extra or []), self.clock], single_process)


def compose_run(method: str, epochs: int, threads: int, out: Path):
    GlobalHydra.instance().clear()
    overrides = [
        f"distill={method}",
        *PAIR,
        f"trainer.max_epochs={epochs}",
        "trainer.enable_progress_bar=false",
        "logger=none",
        f"num_threads={threads}",
    ]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir, cfg.paths.output_dir = str(ROOT), str(out)
        cfg.paths.cache_dir = str(out / "cache")
        del cfg.hydra
    return cfg


def time_method(method: str, epochs: int, threads: int) -> tuple[float, str, int]:
    """Median seconds per training epoch after the first, the teacher-output mode, and the
    parameters trained beside the student."""
    with tempfile.TemporaryDirectory() as folder:
        cfg = compose_run(method, epochs, threads, Path(folder))
        pl.seed_everything(0, verbose=False)
        parts = pipeline.prepare(cfg)
        clock = EpochClock()
        fitting = ClockedFitting(pipeline._fitting(cfg, parts), clock)
        beside = sum(p.numel() for p in parts.method.parameters())
        if cotrains(parts.method):
            schedule = dataclasses.replace(parts.plan.schedule, checkpoint_dir=None, max_epochs=epochs)
            fitted = fit.cotrain(parts.peers, parts.method, parts.data, fitting, schedule)
            beside += sum(p.numel() for peer in parts.peers[1:] for p in peer.parameters())
        else:
            teacher = cache.Teacher(parts.teacher.eval(), "benchmark", "file", Path(folder))
            schedule = dataclasses.replace(parts.plan.schedule, checkpoint_dir=None, max_epochs=epochs, seed=0)
            fitted = fit.distill(
                parts.student, parts.method, teacher, parts.data, fitting, schedule, parts.plan.teaching
            )
    return statistics.median(clock.seconds[1:]), fitted.mode, beside


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(conf.options("distill")), help="comma-separated options")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per fit; the first is warm-up")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    if "kd" not in methods:
        methods.insert(0, "kd")
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.epochs} epochs per fit, {args.rounds} rounds")
    times: dict[str, list[float]] = {m: [] for m in methods}
    ratios: dict[str, list[float]] = {m: [] for m in methods}
    modes: dict[str, str] = {}
    beside: dict[str, int] = {}
    for _ in range(args.rounds):
        for method in methods:
            seconds, modes[method], beside[method] = time_method(method, args.epochs, args.threads)
            times[method].append(seconds)
        for method in methods:
            ratios[method].append(times[method][-1] / times["kd"][-1])
    print(f"{'distill':<10} {'ms/epoch':>9} {'vs kd':>6}  {'teacher logits':<14} {'trained beside the student':>26}")
    for method in methods:
        ms, ratio = 1000 * statistics.median(times[method]), statistics.median(ratios[method])
        print(f"{method:<10} {ms:9.1f} {ratio:6.2f}  {modes[method]:<14} {beside[method]:>26,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
