"""The teacher stays frozen and in eval mode through fit and validation, and stays out of the
optimizer and the student's checkpoint; per-epoch metrics, the NaN check, the cheaper training
loop."""

import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from distillab import conf
from distillab.distill.methods.kd import KD
from distillab.distill.module import FINITE_CHECK_EVERY, DistillationModule
from tests.conftest import quiet_trainer


class TeacherWatch(pl.Callback):
    """Records the teacher's mode and gradient flags at every training and validation step."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool, bool]] = []

    def _record(self, stage: str, module: DistillationModule) -> None:
        teacher = module.teacher
        any_training = any(m.training for m in teacher.modules())
        any_grad = any(p.requires_grad for p in teacher.parameters())
        self.seen.append((stage, any_training, any_grad))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._record("train", pl_module)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._record("val", pl_module)


def _teacher() -> nn.Module:
    # BatchNorm and dropout: both change behaviour (and BN its statistics) in train mode
    return nn.Sequential(
        nn.Flatten(), nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4)
    )


def _fit(tmp_path: Path, teacher: nn.Module) -> tuple[DistillationModule, TeacherWatch, pl.Trainer]:
    data = conf.build("data", "synthetic", input_shape=[1, 4, 4], num_classes=4, num_samples=200, batch_size=32)
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    module = DistillationModule(student, teacher, KD(lam=0.5, temperature=2.0, standardize=False))
    watch = TeacherWatch()
    trainer = quiet_trainer(2, tmp_path, [watch], enable_checkpointing=True)
    trainer.fit(module, datamodule=data)
    trainer.validate(module, datamodule=data, verbose=False)
    return module, watch, trainer


def test_teacher_frozen_and_in_eval_mode_through_fit_and_validate(tmp_path):
    teacher = _teacher()
    teacher.train()  # even a teacher handed over in train mode must be pinned to eval
    bn = teacher[2]
    stats_before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    weights_before = [p.clone() for p in teacher.parameters()]

    module, watch, _ = _fit(tmp_path, teacher)

    assert {stage for stage, _, _ in watch.seen} == {"train", "val"}
    assert all(not training and not grad for _, training, grad in watch.seen), watch.seen[:5]
    assert torch.equal(bn.running_mean, stats_before[0])
    assert torch.equal(bn.running_var, stats_before[1])
    assert int(bn.num_batches_tracked) == stats_before[2]
    assert all(torch.equal(a, b) for a, b in zip(weights_before, teacher.parameters()))


def test_teacher_not_in_optimizer_nor_checkpoint(tmp_path):
    teacher = _teacher()
    module, _, trainer = _fit(tmp_path, teacher)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert optimized == {id(p) for p in module.student.parameters()}
    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path, weights_only=True)
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert state and all(key.startswith("model.") for key in state), list(state)
    assert len(state) == len(module.student.state_dict())


def test_module_train_call_cannot_unfreeze_teacher():
    teacher = _teacher()
    module = DistillationModule(nn.Linear(16, 4), teacher, KD(lam=0.5, temperature=2.0, standardize=False))
    module.train()
    assert not any(m.training for m in teacher.modules())
    assert module.student.training


def test_teacher_follows_module_device_and_dtype():
    teacher = _teacher()
    module = DistillationModule(nn.Linear(16, 4), teacher, KD(lam=0.5, temperature=2.0, standardize=False))
    module.double()
    assert all(p.dtype == torch.float64 for p in teacher.parameters())


# -- per-epoch metrics, the NaN check and the speed-ups of the training loop ----------------------
class RecordingLoss(nn.Module):
    """KD that records, per training step, its terms, the batch size, the number of correct
    predictions and the NVML-check setting seen inside the optimizer step; ``nan_at`` makes the
    loss of that step (counted from 0 over the whole fit) NaN."""

    needs_teacher = True

    def __init__(self, nan_at: int | None = None) -> None:
        super().__init__()
        self.inner = KD(lam=0.5, temperature=2.0, standardize=False)
        self.nan_at = nan_at
        self.steps: list[dict] = []

    def forward(self, logits, teacher_logits, targets):
        terms = self.inner(logits, teacher_logits, targets)
        if self.nan_at is not None and len(self.steps) == self.nan_at:
            terms = {name: value * float("nan") for name, value in terms.items()}
        self.steps.append(
            {
                **{name: float(value.detach()) for name, value in terms.items()},
                "n": len(targets),
                "correct": int((logits.argmax(dim=1) == targets).sum()),
                "env": os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK"),
            }
        )
        return terms


def _data(**kwargs):
    return conf.build("data", "synthetic", input_shape=[1, 4, 4], num_classes=4, **kwargs)


def _trainer(tmp_path: Path, epochs: int, callbacks=()) -> pl.Trainer:
    return quiet_trainer(epochs, tmp_path, callbacks, enable_checkpointing=bool(callbacks))


def test_epoch_metrics_are_batch_size_weighted_means_of_the_steps(tmp_path):
    # 140 training samples in batches of 32: the last batch has 12, so plain step means differ
    data = _data(num_samples=200, batch_size=32, eval_batch_size=16)
    loss = RecordingLoss()
    torch.manual_seed(0)
    module = DistillationModule(nn.Sequential(nn.Flatten(), nn.Linear(16, 4)), _teacher(), loss)
    trainer = _trainer(tmp_path, epochs=2)
    trainer.fit(module, datamodule=data)

    steps_per_epoch = len(data.train_dataloader())
    last = loss.steps[-steps_per_epoch:]
    assert [s["n"] for s in last] == [32, 32, 32, 32, 12]
    count = sum(s["n"] for s in last)
    metrics = trainer.callback_metrics
    for name in ("ce", "kd", "loss"):
        expected = sum(s[name] * s["n"] for s in last) / count
        assert float(metrics[f"train/{name}"]) == pytest.approx(expected, rel=1e-5), name
    assert float(metrics["train/acc"]) == pytest.approx(sum(s["correct"] for s in last) / count, rel=1e-6)

    # validation ran after the last step: the final weights give its metrics
    x, y = data.splits["val"]
    assert len(y) == 30  # two batches of 16 and 14
    with torch.no_grad():
        logits = module.student.eval()(x)
    assert float(metrics["val/loss"]) == pytest.approx(float(nn.functional.cross_entropy(logits, y)), rel=1e-5)
    assert float(metrics["val/acc"]) == pytest.approx(float((logits.argmax(1) == y).float().mean()), rel=1e-6)
    assert {"train/ce", "train/kd", "train/loss", "train/acc", "val/loss", "val/acc"} <= set(metrics)


@pytest.mark.parametrize("nan_at, steps_run", [(0, 1), (3, FINITE_CHECK_EVERY + 1)])
def test_a_nan_loss_stops_the_fit_at_the_next_periodic_check(tmp_path, nan_at, steps_run):
    # 140 steps an epoch: the NaN is found by the check every FINITE_CHECK_EVERY steps, before the
    # end of the epoch; the process-wide NVML setting is put back although the fit raised
    data = _data(num_samples=200, batch_size=1)
    loss = RecordingLoss(nan_at=nan_at)
    module = DistillationModule(nn.Sequential(nn.Flatten(), nn.Linear(16, 4)), _teacher(), loss)
    before = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        _trainer(tmp_path, epochs=1).fit(module, datamodule=data)
    assert len(loss.steps) == steps_run
    assert os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == before


def test_optimizer_steps_skip_the_nvml_check_only_without_a_gpu(tmp_path):
    # importing Lightning turned the check on for the process; it costs a library load per
    # optimizer step where there is no GPU, so the module turns it off around its steps
    assert os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1"
    loss = RecordingLoss()
    module = DistillationModule(nn.Sequential(nn.Flatten(), nn.Linear(16, 4)), _teacher(), loss)
    _trainer(tmp_path, epochs=1).fit(module, datamodule=_data(num_samples=200, batch_size=32))
    without_gpu = torch.backends.cuda.is_built() and not torch.cuda.is_available()
    assert {s["env"] for s in loss.steps} == ({None} if without_gpu else {"1"})
    assert os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1"


def test_module_attributes_still_register_parameters_and_submodules():
    module = DistillationModule(nn.Linear(16, 4), _teacher(), KD(lam=0.5, temperature=2.0, standardize=False))
    module._current_fx_name = "training_step"
    assert module._current_fx_name == "training_step"
    module.head = nn.Linear(4, 2)
    module.scale = nn.Parameter(torch.ones(1))
    assert "head" in module._modules and "scale" in module._parameters
    assert {"head.weight", "scale"} <= set(module.state_dict())
    # a name that held a plain value becomes a submodule or parameter when one is set to it
    module.note, module.weight_like = "x", 1.0
    module.note = nn.Linear(2, 2)
    module.weight_like = nn.Parameter(torch.zeros(1))
    assert "note" in module._modules and "weight_like" in module._parameters
    assert not {"note", "weight_like"} & set(vars(module))
    # and a plain value cannot replace a registered submodule, as nn.Module refuses it
    with pytest.raises(TypeError):
        module.head = "not a module"
