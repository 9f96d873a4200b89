"""Per-member optimizers over stacked parameters.

A vectorised sweep stores each parameter of M students as one tensor of shape [M, ...], row m
belonging to member m. torch.optim takes one learning rate per parameter group, so it cannot
give each row its own rate; ``StackedOptimizer`` applies the update of torch's single-tensor
Adam, AdamW and SGD to all rows at once, with each member's learning rate and weight decay as an
[M] tensor broadcast over its rows. Every other setting must be shared by the members.

The learning-rate schedule is not re-implemented: each member keeps a real torch optimizer over
one dummy parameter, with the run's scheduler attached, so any torch schedule (and those of
``distillab.optim``) gives exactly the rates a member trained alone would see.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from distillab.settings import ConfigError

SUPPORTED = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
# the settings a sweep varies per member; they become [M] tensors
PER_MEMBER = ("lr", "weight_decay")
# settings that choose how torch computes the step, not what it computes
IMPLEMENTATION = ("foreach", "fused", "capturable", "differentiable")


def _members(factories: Sequence[Callable]) -> list[Optimizer]:
    """One real optimizer per member, over a dummy parameter: it resolves the factory's defaults
    (AdamW's weight decay, betas given as a list) exactly as torch does, and carries the schedule."""
    return [factory([torch.nn.Parameter(torch.zeros(1))]) for factory in factories]


def _reason(members: Sequence[Optimizer]) -> str | None:
    """Why these members' optimizers cannot share one stacked update, or None when they can."""
    if not members:
        return "no members to stack: at least one optimizer factory is needed"
    names = ", ".join(f"torch.optim.{cls.__name__}" for cls in SUPPORTED)
    for m, member in enumerate(members):
        if type(member) not in SUPPORTED:
            return f"optimizer {type(member).__name__} of member {m} cannot be stacked: the supported ones are {names}"
    first = members[0]
    for m, member in enumerate(members[1:], start=1):
        if type(member) is not type(first):
            return (
                f"optimizer differs between members: {type(first).__name__} in member 0, "
                f"{type(member).__name__} in member {m}; stacked members must share one of {names}"
            )
    ignored = {"params", "initial_lr", *PER_MEMBER, *IMPLEMENTATION}
    group = first.param_groups[0]
    for m, member in enumerate(members[1:], start=1):
        other = member.param_groups[0]
        for key in sorted((group.keys() | other.keys()) - ignored):
            if group.get(key) != other.get(key):
                return (
                    f"optimizer setting '{key}' differs between members: {group.get(key)!r} in member 0, "
                    f"{other.get(key)!r} in member {m}; only {' and '.join(PER_MEMBER)} may differ"
                )
    return None


def why_not_stackable(factories: Sequence[Callable]) -> str | None:
    """None when the members' optimizer factories can be stacked, else a one-line reason.

    A factory is what Hydra builds from an ``optimizer`` node with ``_partial_: true``. The members
    can be stacked when they build the same class among Adam, AdamW and SGD with the same settings
    apart from ``lr`` and ``weight_decay``; settings that change only how torch computes the step
    (foreach, fused, capturable, differentiable) do not matter. Settings are compared after torch
    has filled in its defaults, so an omitted value equals the default written out."""
    return _reason(_members(factories))


class _Rows:
    """A per-member coefficient, an [M] tensor seen as [M, 1, ..., 1] beside each parameter, so one
    foreach op scales every member's rows by that member's own value. One buffer per (device,
    dtype) of the parameters; ``fill`` writes all of them, the views stay valid."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self.views: list[Tensor] = []
        for p in params:
            key = (p.device, p.dtype)
            if key not in self._buffers:
                self._buffers[key] = torch.empty(p.shape[0], device=p.device, dtype=p.dtype)
            self.views.append(self._buffers[key].view(-1, *([1] * (p.dim() - 1))))

    def fill(self, values: Tensor) -> None:
        """Set the coefficient from float64 values: computed in double and rounded once, as torch
        rounds a Python float it is given."""
        for buffer in self._buffers.values():
            buffer.copy_(values)


class _Adam:
    """torch's single-tensor Adam (L2 weight decay added to the gradient) and AdamW (decoupled
    decay, ``p *= 1 - lr * wd``), with amsgrad and maximize, for all members at once. The members
    step together, so the step count and the bias corrections are shared."""

    def __init__(self, params: Sequence[Tensor], group: dict[str, Any], weight_decay: Tensor, lr: Tensor) -> None:
        self.beta1, self.beta2 = (float(beta) for beta in group["betas"])
        self.eps = float(group["eps"])
        self.amsgrad = bool(group["amsgrad"])
        self.maximize = bool(group["maximize"])
        self.decoupled = bool(group["decoupled_weight_decay"])
        self.weight_decay = weight_decay
        self.decays = bool((weight_decay != 0).any())
        self.steps = 0
        self.exp_avgs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        self.exp_avg_sqs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        self.max_exp_avg_sqs = [
            torch.zeros_like(p, memory_format=torch.preserve_format) for p in params if self.amsgrad
        ]
        self.neg_step_size = _Rows(params)
        # decoupled: the factor 1 - lr * wd, which follows the schedule; L2: wd itself, fixed
        self.decay = _Rows(params)
        if not self.decoupled:
            self.decay.fill(weight_decay)
        self.set_lr(lr)

    def set_lr(self, lr: Tensor) -> None:
        """Take the members' current learning rates (float64 [M])."""
        self.lr = lr
        if self.decoupled:
            self.decay.fill(1 - lr * self.weight_decay)

    def step(self, params: list[Tensor], grads: list[Tensor]) -> None:
        """One Adam step of every member, in the order of torch's single-tensor implementation."""
        self.steps += 1
        if self.maximize:
            grads = torch._foreach_neg(grads)
        if self.decays and self.decoupled:
            torch._foreach_mul_(params, self.decay.views)
        elif self.decays:
            grads = torch._foreach_addcmul(grads, params, self.decay.views)
        torch._foreach_lerp_(self.exp_avgs, grads, 1 - self.beta1)
        torch._foreach_mul_(self.exp_avg_sqs, self.beta2)
        torch._foreach_addcmul_(self.exp_avg_sqs, grads, grads, 1 - self.beta2)
        second = self.exp_avg_sqs
        if self.amsgrad:
            torch._foreach_maximum_(self.max_exp_avg_sqs, self.exp_avg_sqs)
            second = self.max_exp_avg_sqs
        denom = torch._foreach_sqrt(second)
        torch._foreach_div_(denom, (1 - self.beta2**self.steps) ** 0.5)
        torch._foreach_add_(denom, self.eps)
        # torch adds value * exp_avg / denom with value = -lr / (1 - beta1^t): the product first
        self.neg_step_size.fill(self.lr / -(1 - self.beta1**self.steps))
        torch._foreach_addcdiv_(params, torch._foreach_mul(self.exp_avgs, self.neg_step_size.views), denom)


class _SGD:
    """torch's single-tensor SGD: L2 weight decay added to the gradient, momentum with dampening
    whose first buffer is the gradient itself, optional Nesterov, maximize."""

    def __init__(self, params: Sequence[Tensor], group: dict[str, Any], weight_decay: Tensor, lr: Tensor) -> None:
        self.momentum = float(group["momentum"])
        self.dampening = float(group["dampening"])
        self.nesterov = bool(group["nesterov"])
        self.maximize = bool(group["maximize"])
        self.decays = bool((weight_decay != 0).any())
        self.weight_decay = _Rows(params)
        self.weight_decay.fill(weight_decay)
        self.neg_lr = _Rows(params)
        self.set_lr(lr)
        self.buffers: list[Tensor] | None = None

    def set_lr(self, lr: Tensor) -> None:
        """Take the members' current learning rates (float64 [M])."""
        self.neg_lr.fill(-lr)

    def step(self, params: list[Tensor], grads: list[Tensor]) -> None:
        """One SGD step of every member, in the order of torch's single-tensor implementation."""
        if self.maximize:
            grads = torch._foreach_neg(grads)
        if self.decays:
            grads = torch._foreach_addcmul(grads, params, self.weight_decay.views)
        if self.momentum != 0:
            if self.buffers is None:
                self.buffers = [grad.detach().clone() for grad in grads]
            else:
                torch._foreach_mul_(self.buffers, self.momentum)
                torch._foreach_add_(self.buffers, grads, alpha=1 - self.dampening)
            grads = torch._foreach_add(grads, self.buffers, alpha=self.momentum) if self.nesterov else self.buffers
        torch._foreach_addcmul_(params, grads, self.neg_lr.views)


class StackedOptimizer:
    """Optimise M stacked members as M separate torch optimizers would, in a few foreach ops.

    ``params`` are the stacked leaf tensors [M, ...]; ``factories`` the members' optimizer
    factories (one per member, stackable by ``why_not_stackable``); ``scheduler`` the run's
    scheduler factory, called per member as ``scheduler(optimizer, max_epochs=max_epochs)`` the
    way ``ClassifierModule.configure_optimizers`` does, or None for a constant rate. The update
    runs in the parameters' device and dtype."""

    def __init__(
        self, params: Sequence[Tensor], factories: Sequence[Callable], scheduler: Callable | None, max_epochs: int
    ) -> None:
        members = _members(factories)
        reason = _reason(members)
        if reason is not None:
            raise ConfigError(reason)
        self._params = list(params)
        self._check_params(len(members))
        self._members = members
        self._schedulers = [] if scheduler is None else [scheduler(m, max_epochs=max_epochs) for m in members]
        group = members[0].param_groups[0]
        weight_decay = torch.tensor([float(m.param_groups[0]["weight_decay"]) for m in members], dtype=torch.float64)
        rule = _SGD if isinstance(members[0], torch.optim.SGD) else _Adam
        lr = self._current_lr()
        self._rule = rule(self._params, group, weight_decay, lr)
        self._lr = self._on_device(lr)

    def _check_params(self, size: int) -> None:
        """Every parameter must hold one row per member."""
        if not self._params:
            raise ValueError("no parameters to optimise")
        for i, p in enumerate(self._params):
            if p.dim() == 0 or p.shape[0] != size:
                raise ValueError(f"parameter {i} has shape {tuple(p.shape)}: its first dimension must be {size}")

    def _current_lr(self) -> Tensor:
        """Each member's rate as its scheduled optimizer shows it, float64 [M] on the CPU."""
        return torch.tensor([float(m.param_groups[0]["lr"]) for m in self._members], dtype=torch.float64)

    def _on_device(self, values: Tensor) -> Tensor:
        """``values`` in the parameters' device and dtype."""
        return values.to(device=self._params[0].device, dtype=self._params[0].dtype)

    def _refresh_lr(self) -> None:
        """Read the members' rates again, after their schedules moved; steps use the cached copy."""
        lr = self._current_lr()
        self._rule.set_lr(lr)
        self._lr = self._on_device(lr)

    @property
    def lr(self) -> Tensor:
        """Each member's current learning rate, [M], as its own optimizer's param group shows it."""
        return self._lr

    @torch.no_grad()
    def step(self, grads: Sequence[Tensor]) -> None:
        """One optimizer step of every member, in place; ``grads`` match ``params`` one to one and
        are left unchanged."""
        if len(grads) != len(self._params):
            raise ValueError(f"{len(grads)} gradients for {len(self._params)} parameters")
        self._rule.step(self._params, list(grads))

    def schedule_step(self) -> None:
        """The end of an epoch: every member's scheduler steps, as Lightning does with interval
        "epoch". The dummy optimizer steps first (it has no gradient, so nothing changes) so the
        scheduler sees the order it expects."""
        for member, scheduler in zip(self._members, self._schedulers):
            member.step()
            scheduler.step()
        self._refresh_lr()
