"""What a deployment sees of compression: latency by runtime, pruning to a budget against uniform
amounts, one-shot against cyclic pruning, and calibration before and after.

    PYTHONPATH=src:. python3 benchmarks/deployment.py [--parts latency runs] [--setups digits resnet20]
        [--rounds 5] [--epochs 20] [--threads 1]

``latency``: for each setup's student, eager PyTorch float against ONNX Runtime float (the file
``export=onnx`` writes) and against each int8 path: torch.ao (``quant_dynamic``, ``quant_static``)
and ONNX Runtime (``ort_int8_dynamic``, ``ort_int8_static``), each built by the real compressor
from its ``conf/compress`` file (calibrated on random batches: latency does not depend on the
weights' values). Every model is timed by ``measure.latency_ms`` (the run's protocol: median of
``repeats`` passes after ``warmup``) at batch 1 and 64; the variants alternate within each round,
and the median over ``--rounds`` rounds is printed with its ratio to eager float.

``runs``: real runs (``pipeline.run``) of one distilled student per setup, seed 0, compressed in
several ways; the student's training is seeded, so every run compresses the same student. The
teacher is trained once into a private cache. Printed per run: the compressed model's
validation and test accuracy, the share of parameters removed (nonzero parameters for
unstructured pruning), and the expected calibration error of the student before and after.
Then the two comparisons the numbers are for: the budget search (``compress.max_acc_drop``)
against the largest uniform ``amount`` that stays within the same validation budget, and
``compress.cycles`` against one shot at the same final amount and the same total fine-tuning
epochs. Setups: ``digits`` (a CNN student of the default CNN teacher) and ``resnet20``
(resnet56 → resnet20 on CIFAR-shaped synthetic data, fewer runs: it is the slow one, about two
minutes a run on one thread, and its synthetic classes are separable, so every model there
reaches a test accuracy of 1.0: its runs show what is removed, not what it costs).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "src", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from tests.conftest import compose_cfg  # noqa: E402

from distillab import build, compress, conf, formats, measure, pipeline  # noqa: E402
from distillab.data import adapter  # noqa: E402

COMMON = ["trainer.enable_progress_bar=false", "logger=none", "trainer.accelerator=cpu"]
INT8 = ("quant_dynamic", "quant_static", "ort_int8_dynamic", "ort_int8_static")
BUDGET = 0.01


@dataclass
class Setup:
    key: str
    overrides: list[str]
    uniform: list[float]  # structured amounts tried against the budget search
    cycles_amount: float  # the final amount of the one-shot / cycles comparison (structured)
    unstructured: bool = True  # also compare one-shot and cycles of unstructured pruning
    epochs: int | None = None  # student epochs, instead of --epochs


SETUPS = {
    "digits": Setup("digits", ["student=cnn", "teacher=cnn"], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], 0.6),
    "resnet20": Setup(
        "resnet20",
        [
            "data=synthetic",
            "data.input_shape=[3,32,32]",
            "data.num_samples=1200",
            "teacher=resnet56",
            "student=resnet20",
            "teacher.recipe.max_epochs=10",
        ],
        [0.3, 0.5, 0.7],
        0.5,
        unstructured=False,
        epochs=10,
    ),
}


# -- latency -----------------------------------------------------------------------------------
def variants(cfg: Any) -> dict[str, torch.nn.Module]:
    """The setup's student as eager float, ONNX Runtime float and each int8 path."""
    parts = pipeline.prepare(cfg)
    model, shape = parts.student.eval(), tuple(parts.info.input_shape)
    batches = [(torch.randn(64, *shape), torch.zeros(64, dtype=torch.long), torch.arange(64)) for _ in range(4)]
    context = compress.Context(input_shape=shape, train_batches=lambda: batches)
    from distillab.compress.ort import OrtModel

    found = {
        "eager float": model,
        "onnxruntime float": OrtModel(formats.to_onnx(model, shape, opset=20, exporter="dynamo")),
    }
    for option in INT8:
        node = conf.load("compress", option)
        (method,) = compress.methods(node)
        found[option] = method(model, context).model
    return found


def latency(setup: Setup, rounds: int, threads: int, folder: Path) -> None:
    cfg = compose_cfg([*COMMON, *setup.overrides, f"num_threads={threads}"], folder / "latency")
    models = variants(cfg)
    shape = tuple(adapter.prepare(build.part("data", cfg.data), 0).input_shape)
    how = {"warmup": 5, "repeats": 30, "threads": threads}
    times: dict[str, dict[int, list[float]]] = {name: {1: [], 64: []} for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            for batch in (1, 64):
                times[name][batch].append(measure.latency_ms(model, shape, batch, **how))
    base = {batch: statistics.median(times["eager float"][batch]) for batch in (1, 64)}
    print(f"\nlatency, {setup.key} ({sum(p.numel() for p in models['eager float'].parameters()):,} parameters)")
    print(f"{'model':<20} {'b1 ms':>8} {'x eager':>8} {'b64 ms':>8} {'x eager':>8}")
    for name in models:
        b1, b64 = (statistics.median(times[name][b]) for b in (1, 64))
        print(f"{name:<20} {b1:8.3f} {b1 / base[1]:8.2f} {b64:8.3f} {b64 / base[64]:8.2f}")


# -- runs --------------------------------------------------------------------------------------
def run(setup: Setup, overrides: list[str], epochs: int, threads: int, folder: Path, name: str) -> dict:
    cfg = compose_cfg(
        [*COMMON, *setup.overrides, f"trainer.max_epochs={epochs}", f"num_threads={threads}", *overrides],
        folder / name,
        folder / "cache",
    )
    start = time.perf_counter()
    record = pipeline.run(cfg, raise_on_failure=True)
    record["seconds"] = time.perf_counter() - start
    return record


def removed(record: dict) -> float:
    """The share of the student's parameters the compression removed (nonzero ones: unstructured
    pruning keeps the zeros)."""
    student, compressed = record["student"], record["compressed"]
    return 1.0 - compressed["nonzero_params"] / student["nonzero_params"]


def row(name: str, record: dict) -> str:
    student, compressed = record["student"], record["compressed"]
    return (
        f"{name:<34} {compressed['val']['acc']:8.4f} {compressed['test']['acc']:8.4f} {removed(record):8.3f} "
        f"{student['calibration']['ece']:8.4f} {compressed['calibration']['ece']:8.4f} {record['seconds']:7.1f}"
    )


def runs(setup: Setup, epochs: int, threads: int, folder: Path) -> None:
    structured = ["compress=prune_structured"]
    plans = {f"structured amount={a}": [*structured, f"compress.amount={a}"] for a in setup.uniform}
    plans[f"structured max_acc_drop={BUDGET}"] = [
        *structured,
        "compress.amount=null",
        f"compress.max_acc_drop={BUDGET}",
    ]
    a = setup.cycles_amount
    plans[f"structured {a} one shot, 12 ep"] = [*structured, f"compress.amount={a}", "compress.finetune_epochs=12"]
    plans[f"structured {a} 3 cycles x 4 ep"] = [
        *structured,
        f"compress.amount={a}",
        "compress.cycles=3",
        "compress.finetune_epochs=4",
    ]
    if setup.unstructured:
        unstructured = ["compress=prune_unstructured", "compress.amount=0.9"]
        plans["unstructured 0.9 one shot, 12 ep"] = [*unstructured, "compress.finetune_epochs=12"]
        plans["unstructured 0.9 3 cycles x 4 ep"] = [*unstructured, "compress.cycles=3", "compress.finetune_epochs=4"]
    epochs = setup.epochs or epochs
    records = {}
    print(f"\nruns, {setup.key}: {epochs} student epochs, seed 0")
    print(f"{'compression':<34} {'val acc':>8} {'test acc':>8} {'removed':>8} {'ECE st':>8} {'ECE cmp':>8} {'s':>7}")
    for name, overrides in plans.items():
        records[name] = run(setup, overrides, epochs, threads, folder, name.replace(" ", "_").replace("=", "-"))
        print(row(name, records[name]), flush=True)
    budgeted = records[f"structured max_acc_drop={BUDGET}"]
    reference = budgeted["student"]["val"]["acc"]
    within = [
        (amount, records[f"structured amount={amount}"])
        for amount in setup.uniform
        if records[f"structured amount={amount}"]["compressed"]["val"]["acc"] >= reference - BUDGET - 1e-9
    ]
    print(f"\nbudget {BUDGET} on validation (student val acc {reference:.4f}):")
    print(
        f"  search: val {budgeted['compressed']['val']['acc']:.4f}, removed {removed(budgeted):.3f} of the parameters"
    )
    if within:
        amount, best = max(within, key=lambda item: removed(item[1]))
        print(
            f"  largest uniform amount within it: {amount}, val {best['compressed']['val']['acc']:.4f}, "
            f"removed {removed(best):.3f}"
        )
    else:
        print("  no uniform amount tried stays within it")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=("latency", "runs"), default=["latency", "runs"])
    parser.add_argument("--setups", nargs="+", choices=sorted(SETUPS), default=sorted(SETUPS))
    parser.add_argument("--rounds", type=int, default=5, help="rounds of latency timing (default 5)")
    parser.add_argument("--epochs", type=int, default=20, help="student epochs of each run (default 20)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    import onnxruntime

    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {args.threads} thread(s)")
    with tempfile.TemporaryDirectory() as folder:
        for key in args.setups:
            if "latency" in args.parts:
                latency(SETUPS[key], args.rounds, args.threads, Path(folder))
            if "runs" in args.parts:
                runs(SETUPS[key], args.epochs, args.threads, Path(folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
