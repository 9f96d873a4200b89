"""Weight transfer: start the student from the teacher's weights (``student.init=from_teacher``).

A student of the teacher's family — the same architecture, or fewer blocks per stage —
begins where the teacher is rather than at random, as DistilBERT (Sanh et al., 2019) takes
every other layer of BERT. Which student tensor takes which teacher tensor follows from the
two module trees alone:

* Modules are walked side by side from the root. Children of an ordinary module pair up by
  name (``fc`` with ``fc``, ``conv1`` with ``conv1``).
* Children of a container of repeated blocks (``nn.Sequential``, ``nn.ModuleList``: ``layer1``
  of a CIFAR ResNet or WRN, ``stages`` of the CNN, ``features`` of the MLP) pair up by position
  among the children that hold tensors (so ReLU, pooling and dropout do not count). With
  ``n_s`` such blocks in the student and ``n_t ≥ n_s`` in the teacher, student block ``j`` takes
  teacher block ``floor(j·k + 1/2)`` with ``k = n_t / n_s``: every k-th block from the first
  when ``k`` is whole (resnet56 → resnet20, 9 → 3 blocks a stage: blocks 0, 3, 6), the nearest
  one otherwise (5 → 3: blocks 0, 2, 3). A student with more blocks than the teacher takes
  the teacher's ``n_t`` blocks as its first ``n_t`` and keeps the rest at their initialisation.
* A layer (a module's own parameters and persistent buffers) is copied whole or not at all:
  only when every one of its tensors has a counterpart of the same name and exactly the
  same shape. BatchNorm's running statistics and batch count so travel with its weights.

The copy may be interpolated, ``θ = w·θ_teacher + (1 − w)·θ_student_init`` for floating-point
tensors. Integer tensors (BatchNorm's ``num_batches_tracked``) count batches, they are not
weights: they are copied from the teacher unchanged whatever ``w``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from torch import Tensor, nn

from distillab.settings import Range

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StudentRole:
    """The student node's own keys, beside its architecture's: ``init=from_teacher`` starts it from
    the teacher's matching tensors, interpolated as init_weight·θ_teacher + (1 − init_weight)·θ_init."""

    init: Literal["from_teacher"] | None
    init_weight: Annotated[float, Range(0, 1, what="a weight", note="of the teacher's tensors; 1 = copy them")]


class NoMatchingTensors(ValueError):
    """The student has no layer whose tensors match a teacher layer in name and shape."""


@dataclass
class TransferReport:
    """What ``init_from_teacher`` did: ``copied`` pairs (student name, teacher name) of
    state_dict tensors, and the student tensors ``kept`` at their initialisation."""

    copied: list[tuple[str, str]]
    kept: list[str]
    weight: float

    def as_record(self) -> dict[str, Any]:
        """The ``student.init`` block of results.json."""
        return {
            "from": "teacher",
            "weight": self.weight,
            "copied": len(self.copied),
            "tensors": [list(pair) for pair in self.copied],
            "kept": list(self.kept),
        }


def block_indices(n_student: int, n_teacher: int) -> list[int]:
    """The teacher block each of ``n_student`` student blocks takes (see the module docstring)."""
    if n_teacher < n_student:
        return list(range(n_teacher))
    # floor(j·n_t/n_s + 1/2) in integers, so no rounding error can pick a neighbour
    return [(2 * j * n_teacher + n_student) // (2 * n_student) for j in range(n_student)]


def plan(student: nn.Module, teacher: nn.Module, names: tuple[str, str] | None = None) -> list[tuple[str, str]]:
    """The (student, teacher) state_dict names whose tensors a transfer copies, in the
    student's order; ``NoMatchingTensors`` (one line naming both architectures) when none.
    ``names`` are how the message calls the two models (default: their class names)."""
    pairs = []
    for student_prefix, student_module, teacher_prefix, teacher_module in _module_pairs(student, teacher):
        own, theirs = _own_tensors(student_module), _own_tensors(teacher_module)
        if own and all(name in theirs and theirs[name].shape == tensor.shape for name, tensor in own.items()):
            pairs += [(student_prefix + name, teacher_prefix + name) for name in own]
    if not pairs:
        student_name, teacher_name = names or (type(student).__name__, type(teacher).__name__)
        raise NoMatchingTensors(
            f"no layer of the student ({student_name}) matches a layer of the teacher ({teacher_name}) in names and "
            "shapes: weight transfer needs a student of the teacher's family (the same architecture, or fewer blocks)"
        )
    order = {name: i for i, name in enumerate(student.state_dict())}
    return sorted(pairs, key=lambda pair: order[pair[0]])


def check(student: nn.Module, teacher: nn.Module, names: tuple[str, str] | None = None) -> None:
    """``student.init=from_teacher`` pairs tensors by the architectures alone, so a student that
    shares no layer with the teacher fails here, on the untrained models, before any training."""
    from distillab.settings import ConfigError

    try:
        plan(student, teacher, names)
    except NoMatchingTensors as error:
        raise ConfigError(f"student.init=from_teacher: {error}") from None


def apply(student: nn.Module, teacher: nn.Module, weight: float, names: tuple[str, str]) -> dict[str, Any]:
    """``init_from_teacher``, logged; the ``student.init`` record of results.json."""
    report = init_from_teacher(student, teacher, weight, names)
    log.info(
        "student.init=from_teacher: %d of %d student tensors from the teacher (init_weight=%g)",
        len(report.copied),
        len(report.copied) + len(report.kept),
        weight,
    )
    return report.as_record()


def init_from_teacher(
    student: nn.Module, teacher: nn.Module, weight: float = 1.0, names: tuple[str, str] | None = None
) -> TransferReport:
    """Overwrite, in place, the student's tensors that ``plan`` pairs with teacher tensors by
    ``weight·θ_teacher + (1 − weight)·θ_student`` (integer tensors: the teacher's), and report
    which were copied and which kept. The teacher is not changed."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"init_weight={weight!r}: must be a weight in [0, 1]")
    pairs = plan(student, teacher, names)
    targets = student.state_dict(keep_vars=True)
    sources = teacher.state_dict()
    with torch.no_grad():
        for student_name, teacher_name in pairs:
            _blend(targets[student_name], sources[teacher_name], float(weight))
    copied = {student_name for student_name, _ in pairs}
    return TransferReport(pairs, [name for name in targets if name not in copied], float(weight))


def _blend(target: Tensor, source: Tensor, weight: float) -> None:
    source = source.to(device=target.device, dtype=target.dtype)
    if weight == 1.0 or not target.is_floating_point():
        target.copy_(source)
    else:
        target.copy_(weight * source + (1.0 - weight) * target)


def _module_pairs(
    student: nn.Module, teacher: nn.Module, student_prefix: str = "", teacher_prefix: str = ""
) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """Corresponding (prefix, module) of student and teacher, from the roots down."""
    yield student_prefix, student, teacher_prefix, teacher
    student_children, teacher_children = dict(student.named_children()), dict(teacher.named_children())
    if _is_sequence(student) and _is_sequence(teacher):
        student_blocks = [name for name, child in student_children.items() if _has_tensors(child)]
        teacher_blocks = [name for name, child in teacher_children.items() if _has_tensors(child)]
        indices = block_indices(len(student_blocks), len(teacher_blocks))
        matches = [(student_blocks[j], teacher_blocks[i]) for j, i in enumerate(indices)]
    else:
        matches = [(name, name) for name in student_children if name in teacher_children]
    for student_name, teacher_name in matches:
        yield from _module_pairs(
            student_children[student_name],
            teacher_children[teacher_name],
            f"{student_prefix}{student_name}.",
            f"{teacher_prefix}{teacher_name}.",
        )


def _is_sequence(module: nn.Module) -> bool:
    return isinstance(module, (nn.Sequential, nn.ModuleList))


def _has_tensors(module: nn.Module) -> bool:
    return next(iter(module.state_dict()), None) is not None


def _own_tensors(module: nn.Module) -> dict[str, Tensor]:
    """The module's own parameters and persistent buffers, as its state_dict names them."""
    tensors = {name: p for name, p in module.named_parameters(recurse=False)}
    tensors.update(
        (name, b) for name, b in module.named_buffers(recurse=False) if name not in module._non_persistent_buffers_set
    )
    return tensors


__all__ = ["NoMatchingTensors", "TransferReport", "block_indices", "init_from_teacher", "plan"]
