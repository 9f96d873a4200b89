"""LightningModules: ``ClassifierModule`` trains one model on a loss; ``DistillationModule``
adds a frozen teacher whose logits feed the distillation loss.

Step losses and accuracy are kept on the device and logged once per epoch: a ``self.log``
call per step costs about as much as a small student's whole step. The per-step work of the
module is kept to a few tensor ops, so a small student trains at close to the speed of a
plain PyTorch loop (``benchmarks/overhead.py`` measures it).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from distillab.distill.hooks import FeatureTaps
from distillab.distill.methods.base import is_feature_method, needs_index, needs_teacher, on_epoch_start
from distillab.labels import UNLABELLED

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]  # (optimizer, max_epochs=...) -> LR scheduler

# how often (in steps) the running loss is checked for NaN/inf: each check is a device sync
FINITE_CHECK_EVERY = 50

# Importing Lightning sets this for the whole process, so that asking whether CUDA is available
# never initialises CUDA. On a machine without a usable GPU each such question then tries to
# load the NVML library again, and torch's optimizers ask once per ``step()``.
_NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


class _EpochTotals:
    """One epoch's step values of one stage (train or val), kept on the device.

    A step appends one stacked tensor of its loss terms, its predicted classes and its targets
    (two tensor ops; every op adds microseconds to a small student's step of a millisecond or
    two); the batch-size-weighted means and the accuracy are computed once, at the end of the
    epoch. Accuracy is over the labelled samples (an ``UNLABELLED`` target is never a correct
    prediction).
    """

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.rows: list[Tensor] = []
        self.predicted: list[Tensor] = []
        self.targets: list[Tensor] = []
        self.counts: list[int] = []
        self.checked = 0  # rows already checked for NaN/inf

    def add(self, terms: dict[str, Tensor], logits: Tensor, y: Tensor) -> None:
        if len(terms) != len(self.names) or list(terms) != self.names:
            raise ValueError(f"the loss returned terms {list(terms)} after {self.names} earlier in the epoch")
        with torch.no_grad():
            self.rows.append(torch.stack(list(terms.values())))
            self.predicted.append(logits.argmax(dim=1))
        self.targets.append(y)
        self.counts.append(len(y))

    def unchecked_sum(self, name: str) -> Tensor | None:
        """The sum of ``name`` over the steps added since the last call."""
        if self.checked == len(self.rows):
            return None
        rows, self.checked = self.rows[self.checked :], len(self.rows)
        return torch.stack(rows)[:, self.names.index(name)].float().sum()

    def means(self, stage: str) -> dict[str, Tensor]:
        rows = torch.stack(self.rows).float()
        weights = torch.tensor(self.counts, dtype=rows.dtype, device=rows.device)
        count = sum(self.counts)
        means = dict(zip((f"{stage}/{name}" for name in self.names), (weights @ rows / count).unbind()))
        predicted, targets = torch.cat(self.predicted), torch.cat(self.targets)
        labelled = (targets != UNLABELLED).sum().clamp_min(1)
        means[f"{stage}/acc"] = (predicted == targets).sum().float() / labelled
        return means


@contextlib.contextmanager
def without_env(name: str) -> Iterator[None]:
    """Unset an environment variable for the duration of the block."""
    value = os.environ.pop(name, None)
    try:
        yield
    finally:
        if value is not None:
            os.environ[name] = value


#: the types of value ``ClassifierModule.__setattr__`` stores without nn.Module's tests
_PLAIN = frozenset((str, int, float, bool, type(None)))


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
        self._totals: dict[str, _EpochTotals | None] = {"train": None, "val": None}
        self._nvml_check_off = False
        self._epoch_lr: float | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets a plain attribute (the running hook's name) around every hook it calls,
        # some 35 times a step, and nn.Module.__setattr__ tests each value against parameters,
        # submodules and buffers (about 4 us a call). A plain value for a name already held in
        # __dict__ can be none of those (registering one removes its name from __dict__), so it is
        # stored as nn.Module would store it, without the tests.
        if type(value) in _PLAIN and name in self.__dict__:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # -- the forward pass and the teacher (none here) ---------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def teacher_logits(self, x: Tensor, index: Tensor | None) -> Tensor | None:
        return None

    # -- steps ----------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x, y, index = _unpack(batch)
        logits = self.model(x)
        terms = self.loss_terms(x, y, index, logits)
        self._accumulate("train", terms, logits, y)
        return terms["loss"]

    def loss_terms(self, x: Tensor, y: Tensor, index: Tensor | None, logits: Tensor) -> dict[str, Tensor]:
        return self.loss(logits, self.teacher_logits(x, index), y)

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        x, y, _ = _unpack(batch)
        logits = self.model(x)
        ce = nn.functional.cross_entropy(logits, y)
        self._accumulate("val", {"loss": ce}, logits, y)

    # -- per-epoch logging ------------------------------------------------------------------
    def _accumulate(self, stage: str, terms: dict[str, Tensor], logits: Tensor, y: Tensor) -> None:
        totals = self._totals[stage]
        if totals is None:
            totals = self._totals[stage] = _EpochTotals(list(terms))
        totals.add(terms, logits, y)

    def _log_epoch(self, stage: str) -> dict[str, Tensor]:
        totals, self._totals[stage] = self._totals[stage], None
        if totals is None:
            return {}
        means = totals.means(stage)
        self.log_dict(means, prog_bar=stage == "val", sync_dist=True)
        return means

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        totals = self._totals["train"]
        if batch_idx % FINITE_CHECK_EVERY == 0 and totals is not None:
            self._check_finite(totals.unchecked_sum("loss"))

    def on_train_epoch_end(self) -> None:
        means = self._log_epoch("train")
        self._check_finite(means.get("train/loss"))
        if self._epoch_lr is not None:
            self.log("train/lr", self._epoch_lr)

    def on_train_epoch_start(self) -> None:
        # Lightning steps epoch schedules before on_train_epoch_end: keep the rate used now
        on_epoch_start(self.loss, int(self.current_epoch))
        optimizers = self.trainer.optimizers
        self._epoch_lr = float(optimizers[0].param_groups[0]["lr"]) if optimizers else None

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

    def on_fit_start(self) -> None:
        # Without a usable GPU the NVML-based check gives the same answer (none) as the plain
        # one, at 50-250 µs a call instead of ~2 µs (5-10% of a digits student's step), and
        # with no CUDA device there is nothing a CUDA query could initialise. With a GPU
        # present the setting is left alone.
        self._nvml_check_off = (
            os.environ.get(_NVML_CHECK) == "1" and torch.backends.cuda.is_built() and not torch.cuda.is_available()
        )

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        if not self._nvml_check_off:
            return super().optimizer_step(*args, **kwargs)
        with without_env(_NVML_CHECK):
            return super().optimizer_step(*args, **kwargs)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        # schedules know the length of the run they belong to (teacher and student differ)
        scheduler = self.scheduler_factory(optimizer, max_epochs=int(self.trainer.max_epochs))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


class DistillationModule(ClassifierModule):
    """A student trained against a frozen teacher.

    The teacher is kept outside the module's registered children on purpose: it is then in
    neither the optimizer, the checkpoint, nor DDP's gradient buckets, and ``.train()`` calls
    made by the training loop cannot reach it. It is pinned to eval mode with gradients off,
    so its BatchNorm statistics and dropout never change during the fit.

    With a ``teacher_table`` (cached teacher outputs) the teacher's side of a loss is constant
    for the fit. A logit method may then say how to compute it once for the whole table, by an
    optional pair of methods beside ``forward`` (``KD`` has them): ``prepare_teacher(logits)``
    maps an N×C table of teacher logits to a table whose row i depends on row i alone, and
    ``forward_prepared(student_logits, rows, targets)`` returns what ``forward`` returns for the
    logits those rows were prepared from. The module prepares the table once (again when it is
    moved or cast) and calls ``forward_prepared`` with the rows of the batch's samples. A method
    without the pair is called as ``forward(student_logits, teacher_logits, targets)``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        loss: nn.Module,
        teacher_table: Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model=student, loss=loss, **kwargs)
        if needs_teacher(loss) and teacher is None and teacher_table is None:
            raise ValueError(f"{type(loss).__name__} needs a teacher, but none was given")
        object.__setattr__(self, "_teacher", teacher)
        # the teacher's logits for every training sample (teacher.outputs): row i is
        # sample i of the train split; not a buffer, so DDP never broadcasts it at each step
        object.__setattr__(self, "_teacher_table", teacher_table)
        object.__setattr__(self, "_prepared_table", prepared_table(loss, teacher_table))
        object.__setattr__(self, "_taps", None)
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

    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        self._freeze_teacher()
        return self

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> DistillationModule:
        # .to(device) / .half() reach registered children only; keep the teacher alongside
        super()._apply(fn, *args, **kwargs)
        if self._teacher is not None:
            self._teacher._apply(fn, *args, **kwargs)
        if self._teacher_table is not None:
            object.__setattr__(self, "_teacher_table", fn(self._teacher_table))
            # prepared again from the moved table, not moved itself: a cast to float64 then
            # gives what float64 logits give
            object.__setattr__(self, "_prepared_table", prepared_table(self.loss, self._teacher_table))
        return self

    def teacher_logits(self, x: Tensor, index: Tensor | None) -> Tensor | None:
        if not needs_teacher(self.loss):
            return None
        if self._teacher_table is not None:  # cached outputs: the teacher is not run
            return _rows(self._teacher_table, index)
        if self._teacher is None:
            return None
        with torch.no_grad():
            return self._teacher(x)

    # -- features of feature methods (forward hooks, alive during fit only) --------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        if is_feature_method(self.loss) and self._taps is None:
            # hooks are created here, not in __init__: a spawned DDP worker gets a pickled copy
            # of the module, and hooks on the models cannot travel with it
            student = FeatureTaps(self.model, self.loss.student_paths, "distill.student_layers")
            teacher = FeatureTaps(self._teacher, self.loss.teacher_paths, "distill.teacher_layers")
            object.__setattr__(self, "_taps", (student, teacher))

    def on_fit_end(self) -> None:
        if self._taps is not None:
            for taps in self._taps:
                taps.remove()
            object.__setattr__(self, "_taps", None)

    def loss_terms(self, x: Tensor, y: Tensor, index: Tensor | None, logits: Tensor) -> dict[str, Tensor]:
        if self._taps is None:
            if self._prepared_table is not None:
                return self.loss.forward_prepared(logits, _rows(self._prepared_table, index), y)
            return super().loss_terms(x, y, index, logits)
        student_taps, teacher_taps = self._taps
        with torch.no_grad():
            teacher_logits = self._teacher(x)  # the live teacher: its features are needed too
        extra = {"index": index} if needs_index(self.loss) else {}
        return self.loss(
            logits, teacher_logits, y, student_feats=student_taps.take(), teacher_feats=teacher_taps.take(), **extra
        )

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_taps"] = None
        return state


def prepared_table(loss: nn.Module, table: Tensor | None) -> Tensor | None:
    """``loss.prepare_teacher(table)`` when there is a table and ``loss`` has the pair of methods
    ``prepare_teacher``/``forward_prepared`` (``DistillationModule``), else None."""
    if table is None or not callable(getattr(loss, "prepare_teacher", None)):
        return None
    if not callable(getattr(loss, "forward_prepared", None)):
        raise TypeError(f"{type(loss).__name__} has prepare_teacher but no forward_prepared to read its rows")
    with torch.no_grad():
        return loss.prepare_teacher(table)


def _rows(table: Tensor, index: Tensor | None) -> Tensor:
    """The rows of a table of the training samples for the batch's sample indices."""
    if index is None:
        raise ValueError("a teacher_table needs (x, y, index) training batches, index = the sample's row")
    return table.index_select(0, index)


def _unpack(batch: Any) -> tuple[Tensor, Tensor, Tensor | None]:
    if isinstance(batch, (tuple, list)) and len(batch) == 3:
        return batch[0], batch[1], batch[2]
    x, y = batch
    return x, y, None
