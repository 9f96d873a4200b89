"""What a distillation method is, for the run that trains with it.

**A logit method** is any ``nn.Module`` whose ``forward(student_logits, teacher_logits, targets)``
returns a dict of named loss terms with the total under ``"loss"``; each term is logged as
``train/<term>``. No base class is needed. Optional attributes, read with these defaults:
``needs_teacher = True`` (False: no teacher is run, as for ``distill=none``), ``temperature``
(the temperature at which an ensemble of teachers averages probabilities; 1) and
``on_epoch_start(epoch)`` (called at each training epoch, for schedules of weights). A logit
method can read the teacher's logits from a table computed once (cached teacher outputs); with
the optional pair ``prepare_teacher(table)`` / ``forward_prepared(student_logits, rows, targets)``
(``KD`` has it) its teacher side is computed once from that table too (``DistillationModule``).

**A feature method** derives from ``FeatureMethod``. It declares the layers it reads by module
path (``student_layers`` / ``teacher_layers``, or ``default_layers`` picked from each model's
structure), builds its own trainable modules from the traced feature shapes (``build``; they
train with the student and are counted apart from it) and returns its own weighted terms
(``feature_terms``), to which the base adds the CE and KD terms of ``kd``::

    loss = (1 − kd.lam)·CE(y, s) + kd.lam·T²·KL(softmax(t/T) ‖ softmax(s/T)) + feature terms

**A co-training method** (``cotrains = True``) trains several models together from scratch, none
of them a frozen teacher: ``peer_roles`` names each peer's architecture (``"student"`` or
``"teacher"``: the run's student or teacher architecture, freshly initialised; peer 0 is the
student that is kept) and ``forward(logits, targets)`` gets the list of the peers' logits and
returns the named terms of all of them, total under ``"loss"`` (``dml``, ``online``);
``finetune_method()`` gives the logit method that compression fine-tunes its student with.

**Settings** of any kind are the typed parameters of its constructor (``distillab.settings``);
their values are in ``conf/distill/<name>.yaml``.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from distillab.distill.hooks import FeatureTaps, default_paths
from distillab.distill.methods.kd import Lam, kd_terms
from distillab.settings import ConfigError, Temperature, checked


# -- the contract, as the run reads it ----------------------------------------------------------------
def needs_teacher(method: nn.Module) -> bool:
    """Whether the method reads the teacher at all (``distill=none`` does not)."""
    return bool(getattr(method, "needs_teacher", True))


def is_feature_method(method: nn.Module) -> bool:
    return isinstance(method, FeatureMethod)


def cotrains(method: nn.Module) -> bool:
    """Whether the method trains its peers together, with no pre-trained teacher (``dml``, ``online``)."""
    return bool(getattr(method, "cotrains", False))


def peer_roles(method: nn.Module) -> list[str]:
    """The architecture of each peer of a co-training method, by role: peer 0 is the student."""
    return [str(role) for role in getattr(method, "peer_roles", ["student"])]


def for_finetuning(method: nn.Module) -> nn.Module:
    """The method compression fine-tunes with, against the uncompressed model: the method itself,
    or for a co-training method its ``finetune_method()``, the loss its student had with the
    other peers held fixed (their role taken by the uncompressed model)."""
    return method.finetune_method() if cotrains(method) else method


def needs_index(method: nn.Module) -> bool:
    """Whether the method reads each training sample's index (CRD's memory bank): the training
    batches are then ``(x, y, index)`` (``data.adapter.fit_arguments``)."""
    return bool(getattr(method, "needs_index", False))


def temperature(method: nn.Module) -> float:
    """The temperature of the method's soft targets, at which an ensemble averages probabilities."""
    return float(getattr(method, "temperature", 1.0))


def on_epoch_start(method: nn.Module, epoch: int) -> None:
    hook = getattr(method, "on_epoch_start", None)
    if callable(hook):
        hook(epoch)


def check_terms(terms: Any, method: nn.Module) -> None:
    """What a method returned must be a dict of scalar tensors with the total under ``"loss"``."""
    name = type(method).__name__
    if not isinstance(terms, Mapping) or "loss" not in terms:
        got = f"a dict with keys {sorted(terms)}" if isinstance(terms, Mapping) else type(terms).__name__
        raise ConfigError(
            f"distill: {name}.forward returned {got}; a method returns a dict of named terms with the "
            "total under 'loss'"
        )
    for key, value in terms.items():
        if not isinstance(value, Tensor) or value.dim() != 0:
            shape = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ConfigError(
                f"distill: {name}.forward returned {key!r} as {shape}; every term must be a scalar tensor"
            )


def check_method(method: nn.Module, student: nn.Module, teacher: nn.Module, example: Tensor) -> None:
    """One forward pass of a logit method on the untrained models, before any training: what it
    returns must be terms by name (``check_terms``). Models and random state are left as they were."""
    if is_feature_method(method):
        return  # its terms are checked at the first step, with that step's features
    targets = torch.zeros(len(example), dtype=torch.long)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        modes = student.training, teacher.training
        student.eval(), teacher.eval()
        try:
            if cotrains(method):
                models = {"student": student, "teacher": teacher}
                terms = method([models[role](example) for role in peer_roles(method)], targets)
            else:
                teacher_logits = teacher(example) if needs_teacher(method) else None
                terms = method(student(example), teacher_logits, targets)
        finally:
            student.train(modes[0]), teacher.train(modes[1])
    check_terms(terms, method)


# -- feature methods ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KDTerm:
    """The cross-entropy/KD part of a feature method: (1 − lam)·CE + lam·T²·KL, lam = 0 for none."""

    lam: Lam
    temperature: Temperature


@torch.no_grad()
def feature_shapes(model: nn.Module, paths: Sequence[str], example: Tensor, key: str) -> list[torch.Size]:
    """The shapes of the features at ``paths`` for ``example``, without touching the model's
    state (eval mode for the pass: BatchNorm statistics are not updated)."""
    taps = FeatureTaps(model, paths, key)
    was_training = model.training
    try:
        model.eval()
        model(example)
        return [feature.shape for feature in taps.take()]
    finally:
        taps.remove()
        model.train(was_training)


def as_paths(value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


class FeatureMethod(nn.Module, abc.ABC):
    """Base of a feature method: the layers it reads, its own modules, its terms.

    A subclass sets ``default_layers`` (``stages``, ``middle``, ``last`` or ``embedding``, see
    ``distill.hooks.default_paths``), passes the configured layers and ``kd`` to this constructor,
    may override ``build`` to create learned modules (a regressor when shapes differ) and
    implements ``feature_terms``. ``bind`` resolves the layers and traces their shapes on one
    batch before any training, so a wrong path or shape fails in one line first. Subclasses'
    constructors check their declared settings when called.
    """

    default_layers: ClassVar[str] = "last"
    #: True: ``feature_terms`` also gets ``index``, the training samples' indices (a memory bank
    #: of the training set, sized from ``self.train_size`` in ``build``)
    needs_index: ClassVar[bool] = False
    #: config keys of the layers, for messages: ``student_layer`` for methods that read one layer
    student_key: ClassVar[str] = "distill.student_layers"
    teacher_key: ClassVar[str] = "distill.teacher_layers"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in vars(cls):
            checked(cls)

    def __init__(
        self,
        kd: KDTerm,
        student_layers: str | Sequence[str] | None = None,
        teacher_layers: str | Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        kd = kd if isinstance(kd, KDTerm) else KDTerm(**dict(kd))  # a config mapping
        self.lam, self.temperature = float(kd.lam), float(kd.temperature)
        self.student_layers, self.teacher_layers = as_paths(student_layers), as_paths(teacher_layers)
        self.student_paths: list[str] = []
        self.teacher_paths: list[str] = []
        self.train_size: int | None = None

    def bind(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        example: Tensor,
        same_architecture: bool = False,
        train_size: int | None = None,
    ) -> None:
        """Resolve the layers of this student/teacher pair and build the method's own modules from
        the shapes they give on ``example``. ``same_architecture``: the teacher is the student's
        uncompressed copy (compression fine-tuning), so the student's paths serve both.
        ``train_size``: the number of training samples, for a method that ``needs_index``."""
        if self.needs_index and not train_size:
            raise ConfigError(
                f"distill: {type(self).__name__} keeps one entry per training sample and needs a map-style "
                "training set whose size is known"
            )
        self.train_size = int(train_size) if train_size else None
        if teacher is None:
            raise ConfigError(f"distill: {type(self).__name__} reads the teacher's features and needs a teacher")
        student_paths = self.student_layers or default_paths(student, self.default_layers, self.student_key)
        if same_architecture:
            teacher_paths = student_paths
        else:
            teacher_paths = self.teacher_layers or default_paths(teacher, self.default_layers, self.teacher_key)
        if len(student_paths) != len(teacher_paths) and not (self.student_layers or self.teacher_layers):
            # default stages of models of different depth: pair them from the output side, where
            # the resolutions agree (a 2-stage student and a 3-stage teacher: the last two of each)
            n = min(len(student_paths), len(teacher_paths))
            student_paths, teacher_paths = student_paths[-n:], teacher_paths[-n:]
        if len(student_paths) != len(teacher_paths):
            raise ConfigError(
                f"{self.student_key} and {self.teacher_key} must pair up, got {len(student_paths)} student layers "
                f"{student_paths} and {len(teacher_paths)} teacher layers {teacher_paths}"
            )
        student_shapes = feature_shapes(student, student_paths, example, self.student_key)
        teacher_shapes = feature_shapes(teacher, teacher_paths, example, self.teacher_key)
        self.student_paths, self.teacher_paths = list(student_paths), list(teacher_paths)
        self.build(student_shapes, teacher_shapes)

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        """Check the feature shapes and create any learned modules; the default needs none."""

    @abc.abstractmethod
    def feature_terms(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> dict[str, Tensor]:
        """The method's own weighted terms; teacher features arrive detached. A method that
        ``needs_index`` takes a third argument, ``index``: the batch's training-sample indices."""

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | None,
        targets: Tensor,
        student_feats: Sequence[Tensor] = (),
        teacher_feats: Sequence[Tensor] = (),
        index: Tensor | None = None,
    ) -> dict[str, Tensor]:
        if teacher_logits is None:
            teacher_logits = student_logits.detach()  # only read when lam > 0, which needs a teacher
        terms = kd_terms(student_logits, teacher_logits, targets, self.lam, self.temperature)
        teacher_feats = [f.detach() for f in teacher_feats]
        if self.needs_index:
            if index is None:
                raise ValueError(f"{type(self).__name__} needs (x, y, index) training batches")
            terms.update(self.feature_terms(student_feats, teacher_feats, index))  # type: ignore[call-arg]
        else:
            terms.update(self.feature_terms(student_feats, teacher_feats))
        terms["loss"] = sum(terms.values())
        return terms

    def require_maps(
        self, student_shapes: Sequence[torch.Size], teacher_shapes: Sequence[torch.Size], method: str
    ) -> None:
        """Fail in one line unless every layer gives N×C×H×W feature maps (``distill=<method>``)."""
        for role, key, paths, shapes in (
            ("student", self.student_key, self.student_paths, student_shapes),
            ("teacher", self.teacher_key, self.teacher_paths, teacher_shapes),
        ):
            for path, shape in zip(paths, shapes):
                if len(shape) != 4:
                    raise ConfigError(
                        f"{key}: distill={method} needs N×C×H×W feature maps, but {role} layer {path!r} gives shape "
                        f"{list(shape)}; use a convolutional {role} (e.g. {role}=cnn) or set {key} to conv layers"
                    )
