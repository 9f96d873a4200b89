"""Learning-rate schedules that know the run's length.

The module calls ``scheduler(optimizer, max_epochs=...)``, so a schedule configured once works
for a 40-epoch teacher recipe and a 240-epoch student alike; schedules step once per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler


def _check_warmup(warmup_epochs: int, max_epochs: int) -> None:
    if not 0 <= warmup_epochs < max(max_epochs, 1):
        raise ValueError(f"warmup_epochs={warmup_epochs}: must be in [0, max_epochs={max_epochs})")


def multistep(
    optimizer: Optimizer,
    max_epochs: int,
    milestones: Sequence[int] = (150, 180, 210),
    gamma: float = 0.1,
    warmup_epochs: int = 0,
) -> LRScheduler:
    """Multiply the learning rate by ``gamma`` at each milestone epoch (the CIFAR KD recipe:
    ×0.1 at 150, 180, 210 of 240), after an optional linear warm-up."""
    _check_warmup(warmup_epochs, max_epochs)
    if any(m < 1 for m in milestones) or list(milestones) != sorted(milestones):
        raise ValueError(f"milestones={list(milestones)}: must be increasing epochs >= 1")

    def factor(epoch: int) -> float:
        warm = min(1.0, (epoch + 1) / warmup_epochs) if warmup_epochs else 1.0
        return warm * gamma ** sum(epoch >= m for m in milestones)

    return LambdaLR(optimizer, factor)


def cosine(optimizer: Optimizer, max_epochs: int, eta_min_ratio: float = 0.0, warmup_epochs: int = 0) -> LRScheduler:
    """Cosine decay from the base rate to ``eta_min_ratio`` × base over the run, after an
    optional linear warm-up."""
    _check_warmup(warmup_epochs, max_epochs)
    if not 0.0 <= eta_min_ratio <= 1.0:
        raise ValueError(f"eta_min_ratio={eta_min_ratio}: must be in [0, 1]")

    def factor(epoch: int) -> float:
        if epoch < warmup_epochs:
            return (epoch + 1) / warmup_epochs
        progress = (epoch - warmup_epochs) / max(1, max_epochs - warmup_epochs)
        return eta_min_ratio + (1 - eta_min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return LambdaLR(optimizer, factor)
