"""Many students of one architecture as one vectorised model (``torch.func``).

Every parameter and buffer of M students is stored as one tensor of shape [M, ...], row m being
student m; ``functional_call`` runs the architecture on one row and ``vmap`` maps it over the rows,
so a forward pass of M students is one pass of batched kernels instead of M passes of small ones.
BatchNorm keeps its running statistics per student: the buffers are stacked too, and the in-place
update of each statistic writes its own row. Dropout draws different masks per student
(``randomness="different"``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

#: the share of a GPU's free memory a stacked group may fill
MEMORY_SHARE = 0.8


def members_that_fit(student: nn.Module, example: Tensor, device: torch.device) -> int | None:
    """How many copies of ``student`` a stacked fit can hold at once in ``device``'s free memory, at
    the batch of ``example``; None on a CPU (host memory is not the limit there). One copy is
    trained for one step to measure its peak (parameters, gradients, activations), plus Adam's two
    moments per parameter."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    probe = copy.deepcopy(student).to(device).train()
    probe(example.to(device)).float().logsumexp(1).sum().backward()
    moments = 2 * sum(p.numel() * p.element_size() for p in probe.parameters())
    per_member = torch.cuda.max_memory_allocated(device) - before + moments
    del probe
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, int(MEMORY_SHARE * free // max(per_member, 1)))


def why_not_stackable(models: Sequence[nn.Module]) -> str | None:
    """None when ``models`` share one architecture (the same modules, parameter and buffer names,
    shapes and dtypes), else a one-line reason."""
    first = models[0]
    signature = _signature(first)
    for k, model in enumerate(models[1:], start=1):
        if type(model) is not type(first) or _signature(model) != signature:
            return f"student {k} differs from student 0 in its layers or their shapes"
    if any(p.requires_grad is False for p in first.parameters()):
        return "the student has frozen parameters"
    return None


def _signature(model: nn.Module) -> tuple:
    tensors = [(name, tuple(t.shape), t.dtype) for name, t in model.state_dict().items()]
    return (repr(model), tuple(tensors))


class StackedModel:
    """M students of one architecture, stacked. ``params`` are leaf tensors [M, ...] that the
    optimizer updates; ``buffers`` (BatchNorm statistics) are updated by the forward pass in
    training mode. ``__call__(x)`` maps x [M, B, ...] (one batch per student) or x [B, ...] (the
    same batch for all) to logits [M, B, C]."""

    def __init__(self, models: Sequence[nn.Module], device: torch.device) -> None:
        reason = why_not_stackable(models)
        if reason is not None:
            raise ValueError(reason)
        self.size = len(models)
        params, buffers = stack_module_state(list(models))  # copies: the students themselves stay as they are
        self.params: dict[str, Tensor] = {k: v.detach().to(device).requires_grad_() for k, v in params.items()}
        self.buffers: dict[str, Tensor] = {k: v.to(device) for k, v in buffers.items()}
        # the architecture without storage: functional_call supplies every tensor
        self.base = copy.deepcopy(models[0]).to("meta")
        self.names = list(self.base.state_dict())  # the architecture's state_dict order
        self._per_member = vmap(self._forward, in_dims=(0, 0, 0), randomness="different")
        self._shared = vmap(self._forward, in_dims=(0, 0, None), randomness="different")

    def _forward(self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.base, (params, buffers), (x,))

    def train(self, mode: bool = True) -> None:
        self.base.train(mode)

    def __call__(self, x: Tensor, shared: bool = False) -> Tensor:
        forward = self._shared if shared else self._per_member
        return forward(self.params, self.buffers, x)

    def state_dict(self, member: int) -> dict[str, Tensor]:
        """Student ``member``'s state_dict (copies), in the architecture's key order."""
        rows = {**self.params, **self.buffers}
        return {name: rows[name][member].detach().clone() for name in self.names}
