"""The teacher stays frozen and in eval mode through fit and validation, and stays out of the
optimizer and the student's checkpoint."""

from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from distillab.data import SyntheticDataModule
from distillab.distill.losses import KDLoss
from distillab.distill.module import DistillationModule


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
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(32, 4))


def _fit(tmp_path: Path, teacher: nn.Module) -> tuple[DistillationModule, TeacherWatch, pl.Trainer]:
    data = SyntheticDataModule(input_shape=(1, 4, 4), num_classes=4, num_samples=200, batch_size=32)
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    module = DistillationModule(student, teacher, KDLoss(lam=0.5, temperature=2.0))
    watch = TeacherWatch()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[watch], default_root_dir=tmp_path)
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
    module = DistillationModule(nn.Linear(16, 4), teacher, KDLoss())
    module.train()
    assert not any(m.training for m in teacher.modules())
    assert module.student.training


def test_teacher_follows_module_device_and_dtype():
    teacher = _teacher()
    module = DistillationModule(nn.Linear(16, 4), teacher, KDLoss())
    module.double()
    assert all(p.dtype == torch.float64 for p in teacher.parameters())
