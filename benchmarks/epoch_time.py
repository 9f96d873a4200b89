"""Wall time of one training epoch of a zoo architecture, through distillab's module and
Trainer, on synthetic data shaped like a real dataset (no download needed).

    python benchmarks/epoch_time.py                          # resnet20, CIFAR-10 shape, 45,000 images
    python benchmarks/epoch_time.py --model wrn_16_2 --classes 100 --batch-size 64

Useful to plan a sweep: a 240-epoch recipe takes about 240 times the printed figure (plus
validation, which is printed apart).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")]

from distillab import conf  # noqa: E402
from distillab.distill.methods.none import CrossEntropy  # noqa: E402
from distillab.distill.module import ClassifierModule  # noqa: E402


class EpochClock(pl.Callback):
    def __init__(self) -> None:
        self.train_s: list[float] = []
        self.val_s: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._val = time.perf_counter()
        self.train_s.append(self._val - self._start)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.val_s.append(time.perf_counter() - self._val)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20", help="a file name of conf/model/ (default resnet20)")
    parser.add_argument("--input-shape", type=int, nargs="+", default=[3, 32, 32])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train-size", type=int, default=45000, help="training images (CIFAR-10 minus 5,000 for val)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*|.*does not have many workers.*")
    model_cfg = OmegaConf.load(ROOT / "conf" / "model" / f"{args.model}.yaml")
    model = instantiate(model_cfg, input_shape=tuple(args.input_shape), num_classes=args.classes)
    # 90 % of the samples train, as the split below makes them
    total = round(args.train_size / 0.9)
    data = conf.build(
        "data",
        "synthetic",
        input_shape=list(args.input_shape),
        num_classes=args.classes,
        num_samples=total,
        batch_size=args.batch_size,
        val_fraction=0.05,
        test_fraction=0.05,
    )
    module = ClassifierModule(model, CrossEntropy(), optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    clock = EpochClock()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            max_epochs=1,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=[clock],
            default_root_dir=tmp,
        )
        trainer.fit(module, datamodule=data)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{args.model} ({params:,} parameters), input {tuple(args.input_shape)}, {args.classes} classes, "
        f"{data.split_sizes['train']:,} training images, batch {args.batch_size}, {args.threads} threads, "
        f"torch {torch.__version__}"
    )
    print(
        f"one training epoch: {clock.train_s[0]:.1f} s; validation of {data.split_sizes['val']:,} images: "
        f"{clock.val_s[0]:.1f} s"
    )


if __name__ == "__main__":
    main()
