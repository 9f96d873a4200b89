"""The fit of a stacked group: M students trained at once, each as its own basic job would be.

Each member keeps what makes it its own run: its initial weights (built after seeding with its
seed), its order of training batches (``TensorBatches`` of its seed: the same permutations the
basic launcher's job draws), its method with its own weights, its own learning rate and weight
decay, its best-on-validation epoch (ties keep the earlier epoch, as Lightning's ModelCheckpoint
does), and its per-epoch metrics, logged at the same steps under the same names. The group
shares the data, the teacher (or its table of cached outputs) and the architecture.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distillab.labels import UNLABELLED
from distillab.stacked.loss import StackedLoss
from distillab.stacked.model import StackedModel
from distillab.stacked.optim import StackedOptimizer

# how often (in steps) the members' running losses are checked for NaN/inf (each check is a sync)
FINITE_CHECK_EVERY = 50


@dataclasses.dataclass
class Trained:
    """One member's outcome: its best state, epoch and step, its metric rows ``(step, metrics)``
    in the order Lightning logs them, and the error that ended it (a non-finite loss), if any."""

    state: dict[str, Tensor]
    best_epoch: int
    best_step: int
    history: list[tuple[int, dict[str, float]]]
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Member:
    """What one member brings to the group fit."""

    student: torch.nn.Module
    method: torch.nn.Module
    optimizer: Any  # the optim.optimizer factory (functools.partial)
    seed: int


def as_float32(value: float) -> float:
    """A value as Lightning logs it: through a float32 tensor."""
    return float(torch.tensor(value, dtype=torch.float32))


class GroupFit:
    """A group's fit: the stacked students, their loss and optimizer, each member's batch order,
    and each member's outcome so far. ``GroupFit(members, data, teacher, table, scheduler,
    max_epochs, device).run()`` trains ``members`` together on ``data`` (an ``InMemoryDataModule``)
    against ``teacher`` (its outputs from ``table`` when given; neither when the method reads no
    teacher) and returns each member's outcome and the seconds of the fit, setting up included."""

    def __init__(
        self,
        members: Sequence[Member],
        data: Any,
        teacher: torch.nn.Module | None,
        table: Tensor | None,
        scheduler: Any,
        max_epochs: int,
        device: torch.device,
    ) -> None:
        self.tick, self.max_epochs = time.perf_counter(), max_epochs
        self.model = StackedModel([m.student for m in members], device)
        self.loss = StackedLoss([m.method for m in members], device)
        self.params = list(self.model.params.values())
        self.optimizer = StackedOptimizer(self.params, [m.optimizer for m in members], scheduler, max_epochs)
        self.data, self.device, self.size = data, device, len(members)
        self.loaders = []
        for member in members:  # each member's own TensorBatches: the permutations its basic job draws
            loader = copy.copy(data.train_dataloader())
            loader.seed, loader.epoch = int(member.seed), 0
            self.loaders.append(loader)
        self.x, self.y = self.loaders[0].x.to(device), self.loaders[0].y.to(device)
        self.prepared = self.loss.from_table(table.to(device)) if table is not None else None
        if teacher is not None:  # frozen for the whole fit, as DistillationModule pins it
            teacher = teacher.to(device).eval().requires_grad_(False)
        self.teacher = teacher
        self.val = [(x.to(device), y.to(device)) for x, y, *_ in data.val_dataloader()]
        self.best = torch.full((self.size,), -1.0, device=device)
        self.outcomes = [Trained(self.model.state_dict(m), 0, 0, []) for m in range(self.size)]
        self.failed: list[str | None] = [None] * self.size
        self.step = 0

    def run(self) -> tuple[list[Trained], float]:
        for epoch in range(self.max_epochs):
            train = self.train_epoch(epoch)
            self.model.train(False)
            self.record(epoch, train, _validate(self.model, self.val))
            self.optimizer.schedule_step()
        return self.outcomes, time.perf_counter() - self.tick

    def train_epoch(self, epoch: int) -> dict[str, Tensor]:
        """One epoch of every member on its own batches; each member's epoch means (name → [M])."""
        self.model.train(True)
        self.loss.epoch_start(epoch)
        self.lrs = self.optimizer.lr.tolist()  # the rate of this epoch, logged as train/lr
        orders = torch.stack([loader._indices() for loader in self.loaders]).to(self.device)
        for loader in self.loaders:
            loader.epoch += 1
        # the epoch's inputs, labels and teacher side gathered once, then sliced batch by batch
        xs, ys = self.x[orders], self.y[orders]
        sides = self.loss.teacher_batch(self.prepared, orders) if self.prepared is not None else None
        labelled = (ys != UNLABELLED).sum(1)
        batch, rows, correct = self.loaders[0].batch_size, [], []
        for start in range(0, orders.shape[1], batch):
            x, y = xs[:, start : start + batch], ys[:, start : start + batch]
            if self.data.augments:
                x = torch.stack([self.data.augment(x[m]) for m in range(self.size)])
            side = sides[:, start : start + batch] if sides is not None else _live_teacher(self.loss, self.teacher, x)
            logits = self.model(x)
            terms = self.loss(logits, side, y)
            self.optimizer.step(torch.autograd.grad(terms["loss"].sum(), self.params))
            with torch.no_grad():
                rows.append(torch.stack(list(terms.values()), dim=1))
                correct.append((logits.argmax(-1) == y).sum(1))
            self.step += 1
            if self.step % FINITE_CHECK_EVERY == 1:
                _check_finite(rows[-1][:, list(terms).index("loss")], epoch, self.failed)
        counts = [min(batch, orders.shape[1] - start) for start in range(0, orders.shape[1], batch)]
        train = _epoch_means("train", list(terms), rows, correct, labelled, counts)
        _check_finite(train["train/loss"], epoch, self.failed)
        return train

    def record(self, epoch: int, train: dict[str, Tensor], scores: dict[str, Tensor]) -> None:
        """Log each member's epoch at Lightning's step, and keep its weights when its validation
        accuracy improved (strictly: ties keep the earlier epoch)."""
        improved = (scores["val/acc"] > self.best).tolist()
        self.best = torch.maximum(scores["val/acc"], self.best)
        vals = {name: value.tolist() for name, value in scores.items()}
        trains = {name: value.tolist() for name, value in train.items()}
        for m, outcome in enumerate(self.outcomes):
            if self.failed[m] is not None and outcome.error is None:
                outcome.error = self.failed[m]
            if outcome.error is not None:
                continue
            val_row = {name: values[m] for name, values in vals.items()} | {"epoch": epoch}
            train_row = {name: values[m] for name, values in trains.items()} | {"train/lr": as_float32(self.lrs[m])}
            outcome.history += [(self.step - 1, val_row), (self.step - 1, train_row | {"epoch": epoch})]
            if improved[m]:
                outcome.state, outcome.best_epoch, outcome.best_step = self.model.state_dict(m), epoch, self.step


def _live_teacher(loss: StackedLoss, teacher: torch.nn.Module | None, x: Tensor) -> Tensor | None:
    """The teacher's side of a batch x [M, B, ...] from the live teacher (None: the method reads none)."""
    if teacher is None:
        return None
    with torch.no_grad():
        logits = teacher(x.flatten(0, 1)).view(*x.shape[:2], -1)
    return loss.teacher_log_probs(logits) if loss.kind == "kd" else logits


def _epoch_means(
    stage: str, names: list[str], rows: list[Tensor], correct: list[Tensor], labelled: Tensor, counts: list[int]
) -> dict[str, Tensor]:
    """Each member's batch-size-weighted mean of every term, and its accuracy over its ``labelled``
    samples (as ``distill.module._EpochTotals`` computes them for one model): name → [M]."""
    stacked = torch.stack(rows).float()  # [steps, M, terms]
    weights = torch.tensor(counts, dtype=stacked.dtype, device=stacked.device)
    means = torch.einsum("s,smk->mk", weights, stacked) / sum(counts)
    out = {f"{stage}/{name}": means[:, k] for k, name in enumerate(names)}
    out[f"{stage}/acc"] = torch.stack(correct).sum(0).float() / labelled.clamp_min(1)
    return out


def _validate(model: StackedModel, batches: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """Each member's validation cross-entropy and accuracy, the same batches for all: name → [M]."""
    losses, correct, labelled, counts = [], [], [], []
    with torch.no_grad():
        for x, y in batches:
            logits = model(x, shared=True)  # [M, B, C]
            ce = F.cross_entropy(logits.flatten(0, 1), y.repeat(model.size), reduction="none").view(model.size, -1)
            losses.append(ce.mean(1))
            correct.append((logits.argmax(-1) == y).sum(1))
            labelled.append((y != UNLABELLED).sum().expand(model.size))
            counts.append(len(y))
    weights = torch.tensor(counts, dtype=torch.float32, device=losses[0].device)
    loss = torch.einsum("b,bm->m", weights, torch.stack(losses)) / sum(counts)
    acc = torch.stack(correct).sum(0).float() / torch.stack(labelled).sum(0).clamp_min(1)
    return {"val/acc": acc, "val/loss": loss}


def _check_finite(losses: Tensor, epoch: int, failed: list[str | None]) -> None:
    """Mark each member whose loss is not finite with the error its basic job would raise."""
    for m, value in enumerate(losses.tolist()):
        if failed[m] is None and not math.isfinite(value):
            failed[m] = (
                f"training loss became {value} at epoch {epoch}: "
                "lower the learning rate (optim.optimizer.lr) or check the inputs"
            )
