"""The distillation loss of M stacked students, each with its own weights.

``StackedLoss`` returns each term as a tensor [M] (member m's value), with the total under
``"loss"``: summed over the members it is one scalar whose gradient with respect to member m's
parameters is member m's own gradient, since no member's loss reads another member's logits.

Hinton KD (``distill=kd``) and cross-entropy alone (``distill=none``) are computed for all members
at once, with λ and T as tensors [M]; the class dimension is put second ([M, C, B]), where torch's
CPU log-softmax runs about 3× faster on small class counts than over the last dimension. With
cached teacher outputs the teacher's log-probabilities at each member's T are computed once per
fit, not at every step. Any other logit method is called once per member with that member's own
instance (its own weights), on its slice of the logits: the students' forward and backward
passes are still stacked, only the loss is not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillab.distill.methods.base import on_epoch_start
from distillab.distill.methods.kd import KD, standardize_logits
from distillab.distill.methods.none import CrossEntropy
from distillab.labels import UNLABELLED


def labelled_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Each member's mean cross-entropy over its labelled samples: logits [M, C, B], targets [M, B]
    → [M] (``labelled_cross_entropy`` of each member)."""
    nll = F.cross_entropy(logits, targets, ignore_index=UNLABELLED, reduction="none")
    return nll.sum(1) / (targets != UNLABELLED).sum(1).clamp_min(1)


class StackedLoss:
    """The loss of M members, ``methods[m]`` being member m's method (one class for all)."""

    def __init__(self, methods: Sequence[nn.Module], device: torch.device) -> None:
        self.methods = list(methods)
        kind = type(self.methods[0])
        if any(type(method) is not kind for method in self.methods):
            raise ValueError("the members' methods differ in class")
        self.kind = "kd" if kind is KD else "ce" if kind is CrossEntropy else "loop"
        if self.kind == "kd":
            self.lam = torch.tensor([m.lam for m in self.methods], device=device)
            self.temperature = torch.tensor([m.temperature for m in self.methods], device=device)
            self.kd_weight = self.lam * self.temperature**2
            self.standardize = self.methods[0].standardize
            self.needs_ce, self.needs_kd = bool((self.lam < 1).any()), bool((self.lam > 0).any())
            # one row of teacher log-probabilities per distinct temperature
            distinct = sorted(set(self.temperature.tolist()))
            self._row = torch.tensor([distinct.index(t) for t in self.temperature.tolist()], device=device)
            self._distinct = torch.tensor(distinct, device=device)

    def epoch_start(self, epoch: int) -> None:
        for method in self.methods:
            on_epoch_start(method, epoch)

    # -- the teacher's side --------------------------------------------------------------------------
    def from_table(self, table: Tensor) -> Tensor:
        """What ``teacher_batch`` reads for a table of the teacher's logits [N, C]: for KD, the
        teacher's log-probabilities at each distinct temperature, computed once, [K, N, C]."""
        if self.kind != "kd":
            return table
        logits = standardize_logits(table) if self.standardize else table
        return torch.stack([F.log_softmax(logits / t, dim=1) for t in self._distinct.tolist()])

    def teacher_batch(self, prepared: Tensor, index: Tensor) -> Tensor:
        """The teacher's side of a batch (``index`` [M, B] into ``from_table``'s result)."""
        if self.kind != "kd":
            return prepared[index]
        return prepared[self._row[:, None], index]

    def teacher_log_probs(self, logits: Tensor) -> Tensor:
        """A live teacher's logits [M, B, C] as ``teacher_batch`` gives them from a table."""
        logits = standardize_logits(logits.flatten(0, 1)).view_as(logits) if self.standardize else logits
        return F.log_softmax(logits / self.temperature[:, None, None], dim=-1)

    # -- the loss --------------------------------------------------------------------------------------
    def __call__(self, logits: Tensor, teacher: Tensor | None, targets: Tensor) -> dict[str, Tensor]:
        """Each member's terms: ``logits`` [M, B, C]; ``teacher`` what ``teacher_batch`` (or, for a
        live teacher, ``teacher_log_probs`` for KD) gives; ``targets`` [M, B]."""
        if self.kind == "ce":
            ce = labelled_ce(logits.transpose(1, 2), targets)
            return {"ce": ce, "loss": ce}
        if self.kind == "kd":
            return self._kd(logits, teacher, targets)
        terms = [
            method(logits[m], None if teacher is None else teacher[m], targets[m])
            for m, method in enumerate(self.methods)
        ]
        return {name: torch.stack([t[name] for t in terms]) for name in terms[0]}

    def _kd(self, logits: Tensor, teacher_log_probs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        zeros = logits.new_zeros(len(self.methods))
        student = logits.transpose(1, 2)  # [M, C, B]
        ce = (1 - self.lam) * labelled_ce(student, targets) if self.needs_ce else zeros
        if self.needs_kd:
            if self.standardize:
                student = standardize_logits(logits.flatten(0, 1)).view_as(logits).transpose(1, 2)
            log_p = F.log_softmax(student / self.temperature[:, None, None], dim=1)
            log_q = teacher_log_probs.transpose(1, 2)
            kl = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum((1, 2)) / logits.shape[1]
            kd = self.kd_weight * kl
        else:
            kd = zeros
        return {"ce": ce, "kd": kd, "loss": ce + kd}
