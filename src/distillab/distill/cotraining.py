"""Peers trained together in one fit, with no pre-trained teacher: the co-training methods
(``distill=dml``, ``distill=online``; ``methods.base``: ``cotrains``, ``peer_roles``).

Every peer is a registered child of the module, so all of them are in the optimizer, the
checkpoint and DDP's gradient buckets, and all of them train (the frozen-teacher rule of
``DistillationModule`` is not for them: here the teacher learns by design). The checkpoint is
chosen on peer 0's validation accuracy, the student's; the other peers are restored from the same
epoch and measured there. Each peer's validation accuracy is logged as ``val/peer<k>/acc``. The
run's cohort is built and checked in ``steps.peers``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from distillab.distill.module import ClassifierModule, _unpack


class CoTrainingModule(ClassifierModule):
    """Trains ``peers`` on ``loss(list of the peers' logits, targets)``; peer 0 is the student."""

    def __init__(self, peers: list[nn.Module], loss: nn.Module, **kwargs: Any) -> None:
        super().__init__(model=peers[0], loss=loss, **kwargs)
        self.others = nn.ModuleList(peers[1:])
        self._peer_val: list[tuple[Tensor, Tensor]] = []

    @property
    def peers(self) -> list[nn.Module]:
        return [self.model, *self.others]

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x, y, _ = _unpack(batch)
        logits = [peer(x) for peer in self.peers]
        terms = self.loss(logits, y)
        self._accumulate("train", terms, logits[0], y)
        return terms["loss"]

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        x, y, _ = _unpack(batch)
        logits = [peer(x) for peer in self.peers]
        self._accumulate("val", {"loss": nn.functional.cross_entropy(logits[0], y)}, logits[0], y)
        with torch.no_grad():
            correct = torch.stack([(z.argmax(dim=1) == y).sum() for z in logits])
        self._peer_val.append((correct, y.new_tensor(len(y))))

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self._peer_val:
            correct = torch.stack([c for c, _ in self._peer_val]).sum(dim=0).float()
            seen = torch.stack([n for _, n in self._peer_val]).sum().float()
            self.log_dict({f"val/peer{k}/acc": value for k, value in enumerate(correct / seen)}, sync_dist=True)
        self._peer_val = []
