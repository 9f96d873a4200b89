"""The model zoo at a glance: every ``conf/model`` entry with its size and cost.

    python -m distillab.zoo                                  # CIFAR-100 geometry (3×32×32, 100 classes)
    python -m distillab.zoo data=digits                      # a known dataset's geometry, no data loaded
    python -m distillab.zoo --input-shape 1 28 28 --classes 10 --markdown

Each ``conf/model/<name>.yaml`` is read and instantiated with Hydra's ``instantiate`` for the
given input shape and class count, exactly as a run builds a teacher or a student; the table
lists its parameters and multiply-accumulates for one sample (``distillab.measure``). Library
entries (``torchvision``, ``timm``) are listed with the model their file names by default.

On the CIFAR-100 geometry the table also gives the parameter count published with the
CIFAR-100 distillation benchmarks, the model code of RepDistiller (Tian et al., "Contrastive
Representation Distillation", ICLR 2020) that mdistiller (Zhao et al., "Decoupled Knowledge
Distillation", CVPR 2022) reuses, and the relative difference of distillab's count from it.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from distillab import measure
from distillab.conf import CONF_DIR

#: (input shape, classes) of the datasets distillab knows, so no data has to be loaded.
DATASETS: dict[str, tuple[tuple[int, int, int], int]] = {
    "digits": ((1, 8, 8), 10),
    "mnist": ((1, 28, 28), 10),
    "fashion_mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
}

#: The geometry the published counts refer to: CIFAR-100.
BENCHMARK_GEOMETRY = ((3, 32, 32), 100)
#: Parameter counts of the CIFAR-100 benchmark model code (RepDistiller/CRD, mdistiller/DKD),
#: 3×32×32 inputs and 100 classes; ``mobilenetv2`` at width 0.5.
PUBLISHED_PARAMS: dict[str, int] = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "mobilenetv2": 812_836,
}


@dataclass
class Row:
    name: str
    target: str
    params: int | None = None
    macs: int | None = None
    published: int | None = None
    note: str = ""

    @property
    def difference(self) -> float | None:
        """Relative difference of ``params`` from ``published``."""
        if self.params is None or not self.published:
            return None
        return (self.params - self.published) / self.published


def _order(name: str) -> tuple[bool, list]:
    """Library entries last, the others in natural order (resnet8 < resnet14)."""
    return name in ("torchvision", "timm"), [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def model_entries(conf_dir: Path = CONF_DIR) -> dict[str, dict]:
    """``{name: node}`` of every ``conf/model/<name>.yaml``: own architectures, then library ones."""
    entries = {}
    for path in sorted((conf_dir / "model").glob("*.yaml"), key=lambda p: _order(p.stem)):
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        node.pop("defaults", None)
        entries[path.stem] = node
    return entries


def measure_entry(name: str, node: dict, input_shape: Sequence[int], num_classes: int) -> Row:
    """Instantiate one zoo entry as a run would, and measure it."""
    target = str(node.get("_target_", ""))
    label = f"{name} ({node['name']})" if node.get("name") else name
    row = Row(label, target.rsplit(".", 1)[-1])
    if (tuple(input_shape), num_classes) == BENCHMARK_GEOMETRY:
        row.published = PUBLISHED_PARAMS.get(name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = instantiate(node, input_shape=list(input_shape), num_classes=num_classes)
    except Exception as error:  # noqa: BLE001 - one entry failing (timm missing) leaves the others listed
        cause = error.__cause__ or error
        row.note = " ".join(str(cause).split())
        return row
    row.params = measure.params(model)
    # counted from shapes alone: on the meta device the forward pass computes nothing
    row.macs = measure.macs(model.to("meta"), input_shape)
    if getattr(model, "input_size", None):
        row.note = "input upsampled to {}×{}".format(*model.input_size)
    return row


def zoo(input_shape: Sequence[int], num_classes: int, conf_dir: Path = CONF_DIR) -> list[Row]:
    return [measure_entry(name, node, input_shape, num_classes) for name, node in model_entries(conf_dir).items()]


def _count(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def _difference(row: Row) -> str:
    difference = row.difference
    if difference is None:
        return ""
    return "0.00 %" if difference == 0 else f"{100 * difference:+.2f} %"


HEADER = ("model", "builder", "params", "MACs / sample", "published params", "difference", "note")


def format_table(rows: list[Row], markdown: bool = False) -> str:
    """A text (or markdown) table; the published/difference/note columns only when some row has them."""
    cells = [
        (
            r.name,
            r.target,
            _count(r.params),
            _count(r.macs),
            _count(r.published) if r.published else "",
            _difference(r),
            r.note,
        )
        for r in rows
    ]
    right = (False, False, True, True, True, True, False)
    keep = [i for i in range(len(HEADER)) if i < 4 or any(row[i] for row in cells)]
    header = [HEADER[i] for i in keep]
    cells = [[row[i] for i in keep] for row in cells]
    right = tuple(right[i] for i in keep)
    if markdown:
        rule = "|" + "|".join("---:" if r else "---" for r in right) + "|"
        lines = ["| " + " | ".join(header) + " |", rule]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, cells)])


def _data_name(text: str) -> str:
    match = re.fullmatch(r"data=(\w+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected data=NAME, got {text!r}")
    if match.group(1) not in DATASETS:
        raise argparse.ArgumentTypeError(f"data={match.group(1)} is not known; allowed: {', '.join(DATASETS)}")
    return match.group(1)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m distillab.zoo",
        description="Parameters and MACs of every conf/model entry, with the published CIFAR-100 counts.",
    )
    parser.add_argument(
        "data",
        nargs="?",
        type=_data_name,
        metavar="data=NAME",
        help=f"take input shape and classes of a known dataset: {', '.join(DATASETS)} (default cifar100)",
    )
    parser.add_argument(
        "--input-shape",
        type=int,
        nargs="+",
        metavar="N",
        help="input shape without the batch, e.g. 3 32 32 (needs --classes)",
    )
    parser.add_argument("--classes", type=int, help="number of classes (needs --input-shape)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument(
        "--conf", type=Path, default=CONF_DIR, help="config folder holding model/ (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    if (args.input_shape is None) != (args.classes is None):
        parser.error("--input-shape and --classes go together")
    if args.input_shape is not None and args.data is not None:
        parser.error("give either data=NAME or --input-shape/--classes, not both")
    if args.input_shape is not None and (min(args.input_shape) < 1 or args.classes < 1):
        parser.error("--input-shape sizes and --classes must be >= 1")
    if not (args.conf / "model").is_dir():
        parser.error(f"--conf {args.conf} has no model/ folder")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.input_shape is not None:
        shape, classes, source = tuple(args.input_shape), args.classes, "given"
    else:
        data = args.data or "cifar100"
        (shape, classes), source = DATASETS[data], data
    torch.manual_seed(0)
    start = time.perf_counter()
    rows = zoo(shape, classes, args.conf)
    print(f"input {'×'.join(map(str, shape))}, {classes} classes ({source}); MACs of one forward pass on one sample")
    if (shape, classes) == BENCHMARK_GEOMETRY:
        print(
            "published params: CIFAR-100 benchmark code of RepDistiller (CRD, ICLR 2020) and mdistiller "
            "(DKD, CVPR 2022)"
        )
    print()
    print(format_table(rows, markdown=args.markdown))
    print(f"\n{len(rows)} models in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
