"""Lightning callbacks of the ``callbacks`` group."""

from __future__ import annotations

import sys
from typing import Any

from pytorch_lightning.callbacks import TQDMProgressBar


class EpochProgressBar(TQDMProgressBar):
    """The training progress bar for a terminal, without the per-epoch validation bar.

    Validation of a small model takes milliseconds, so its bar only floods the screen. When
    the output is not a terminal (a sweep's log file, CI) the bar turns itself off.
    """

    def __init__(self, refresh_rate: int = 20, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)

    def on_train_start(self, *args: Any, **kwargs: Any) -> None:
        if not sys.stderr.isatty():
            self.disable()
        super().on_train_start(*args, **kwargs)

    def on_validation_batch_start(self, *args: Any, **kwargs: Any) -> None:
        return None

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        return None

    def on_validation_start(self, *args: Any, **kwargs: Any) -> None:
        return None

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.train_progress_bar is not None and not self.is_disabled:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
