"""LightningModules: ``ClassifierModule`` trains one model on a loss; ``DistillationModule``
adds a frozen teacher whose logits feed the distillation loss.

Step losses and accuracy are summed on the device and logged once per epoch: a ``self.log``
call per step costs about as much as a small student's whole step.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]

# how often (in steps) the running loss is checked for NaN/inf: each check is a device sync
FINITE_CHECK_EVERY = 50


class ClassifierModule(pl.LightningModule):
    """Trains ``model`` with ``loss(logits, teacher_logits, targets) -> {"loss": ..., term: ...}``.

    ``optimizer`` and ``scheduler`` are factories (Hydra ``_partial_: true`` configs) applied
    to the trainable parameters: the model's and the loss's own (adapters of feature methods).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        optimizer: OptimizerFactory = partial(torch.optim.Adam, lr=1e-3),
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self._sums: dict[str, dict[str, Tensor]] = {"train": {}, "val": {}}

    # -- the forward pass and the teacher (none here) ---------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def teacher_logits(self, x: Tensor, index: Tensor | None) -> Tensor | None:
        return None

    # -- steps ----------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x, y, index = _unpack(batch)
        logits = self.model(x)
        terms = self.loss(logits, self.teacher_logits(x, index), y)
        self._accumulate("train", terms, logits, y)
        return terms["loss"]

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        x, y, _ = _unpack(batch)
        logits = self.model(x)
        ce = nn.functional.cross_entropy(logits, y)
        self._accumulate("val", {"loss": ce}, logits, y)

    # -- per-epoch logging ------------------------------------------------------------------
    def _accumulate(self, stage: str, terms: dict[str, Tensor], logits: Tensor, y: Tensor) -> None:
        sums = self._sums[stage]
        n = y.new_tensor(len(y), dtype=torch.float32)
        values = {name: value.detach().float() * n for name, value in terms.items()}
        values["acc"] = (logits.detach().argmax(dim=1) == y).sum().float()
        values["count"] = n
        for name, value in values.items():
            sums[name] = sums[name] + value if name in sums else value

    def _log_epoch(self, stage: str) -> dict[str, Tensor]:
        sums, self._sums[stage] = self._sums[stage], {}
        if not sums:
            return {}
        count = sums.pop("count")
        means = {f"{stage}/{name}": value / count for name, value in sums.items()}
        self.log_dict(means, prog_bar=stage == "val", sync_dist=True)
        return means

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx % FINITE_CHECK_EVERY == 0:
            self._check_finite(self._sums["train"].get("loss"))

    def on_train_epoch_end(self) -> None:
        means = self._log_epoch("train")
        self._check_finite(means.get("train/loss"))

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def _check_finite(self, value: Tensor | None) -> None:
        if value is not None and not math.isfinite(float(value)):
            raise FloatingPointError(
                f"training loss became {float(value)} at epoch {self.current_epoch}: "
                "lower the learning rate (optim.optimizer.lr) or check the inputs"
            )

    # -- optimisation ----------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


class DistillationModule(ClassifierModule):
    """A student trained against a frozen teacher.

    The teacher is kept outside the module's registered children on purpose: it is then in
    neither the optimizer, the checkpoint, nor DDP's gradient buckets, and ``.train()`` calls
    made by the training loop cannot reach it. It is pinned to eval mode with gradients off,
    so its BatchNorm statistics and dropout never change during the fit.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, loss: nn.Module, **kwargs: Any) -> None:
        super().__init__(model=student, loss=loss, **kwargs)
        if getattr(loss, "needs_teacher", False) and teacher is None:
            raise ValueError(f"{type(loss).__name__} needs a teacher, but none was given")
        object.__setattr__(self, "_teacher", teacher)
        self._freeze_teacher()

    @property
    def student(self) -> nn.Module:
        return self.model

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher

    def _freeze_teacher(self) -> None:
        if self._teacher is None:
            return
        self._teacher.eval()
        for parameter in self._teacher.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> "DistillationModule":
        super().train(mode)
        self._freeze_teacher()
        return self

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> "DistillationModule":
        # .to(device) / .half() reach registered children only; keep the teacher alongside
        super()._apply(fn, *args, **kwargs)
        if self._teacher is not None:
            self._teacher._apply(fn, *args, **kwargs)
        return self

    def teacher_logits(self, x: Tensor, index: Tensor | None) -> Tensor | None:
        if self._teacher is None or not getattr(self.loss, "needs_teacher", False):
            return None
        with torch.no_grad():
            return self._teacher(x)


def _unpack(batch: Any) -> tuple[Tensor, Tensor, Tensor | None]:
    if isinstance(batch, (tuple, list)) and len(batch) == 3:
        return batch[0], batch[1], batch[2]
    x, y = batch
    return x, y, None
