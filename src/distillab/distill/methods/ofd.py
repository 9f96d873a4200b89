"""A comprehensive overhaul of feature distillation (Heo et al., ICCV 2019), ``distill=ofd``:

    loss = (1 − kd.lam)·CE + kd.lam·T²·KL
           + ofd_weight · Σ_i 2^−(n−1−i) · Σ_{b,c,h,w} d_p(r_i(f_s,i), max(f_t,i, m_i)) / N

over n pairs of pre-ReLU features f (the input of each stage's last ReLU), r_i a learned 1×1
conv + BN to the teacher's channels, N the batch size, m_i the per-channel margin of the
teacher's BatchNorm before that ReLU and d_p the partial L2 distance: (s − t)², except where
s ≤ t and t ≤ 0 (a student value below a non-positive target is left alone: the ReLU would
zero both). The deepest pair has weight 1, each shallower one half the next.

The margin is the expectation of the negative part of the BN output, modelled as N(β, γ²)
with γ, β the BN's weight and bias: m = β − |γ|·φ(β/|γ|)/Φ(−β/|γ|) when Φ(−β/|γ|) > 0.001,
otherwise −3|γ| (the authors' code, ``CIFAR-100/distiller.py`` of clovaai/overhaul-distillation).

The layers and BatchNorms are found from one traced forward pass (``preactivation_paths``,
``preceding_batchnorms``); the helpers serve ``distill=reviewkd`` too.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from distillab.distill.hooks import default_paths, resolve, split_path
from distillab.distill.methods.base import FeatureMethod, KDTerm
from distillab.settings import ConfigError, Weight

#: below this probability of a negative BN output the margin is −3|γ| (the authors' code)
MARGIN_MIN_PROBABILITY = 1e-3
#: the margin, in units of |γ|, when a negative BN output is that unlikely
MARGIN_FALLBACK = -3.0


# -- the maths -----------------------------------------------------------------------------------------
def bn_margin(weight: Tensor | None, bias: Tensor | None, channels: int | None = None) -> Tensor:
    """The per-channel margin of a BatchNorm with affine ``weight`` γ and ``bias`` β: the mean of
    its output's negative part, taken as N(β, γ²) — E[x | x < 0] = β − |γ|·φ(β/|γ|)/Φ(−β/|γ|) —
    when Φ(−β/|γ|) > 0.001, otherwise −3|γ|. A channel with γ = 0 is the constant β: its margin
    is min(β, 0), the limit of both branches. Computed in float64, returned in γ's dtype
    (float32 for a BN without affine parameters, then γ = 1, β = 0 over ``channels``)."""
    if weight is None and bias is None and channels is None:
        raise ValueError("bn_margin needs the BN's weight, its bias or its channel count")
    reference = weight if weight is not None else bias
    like = reference.detach() if reference is not None else torch.zeros(int(channels))  # type: ignore[arg-type]
    gamma = (weight.detach() if weight is not None else torch.ones_like(like)).double().abs()
    beta = (bias.detach() if bias is not None else torch.zeros_like(like)).double()
    positive = gamma > 0
    scale = torch.where(positive, gamma, torch.ones_like(gamma))
    ratio = beta / scale
    below = torch.special.ndtr(-ratio)  # Φ(−β/γ), the probability of a negative output
    density = torch.exp(-0.5 * ratio**2) / math.sqrt(2 * math.pi)  # φ(β/γ)
    expected = beta - scale * density / below.clamp_min(torch.finfo(torch.float64).tiny)
    margin = torch.where(below > MARGIN_MIN_PROBABILITY, expected, MARGIN_FALLBACK * gamma)
    margin = torch.where(positive, margin, beta.clamp_max(0.0))
    return margin.to(like.dtype if like.is_floating_point() else torch.float32)


def partial_l2(student: Tensor, target: Tensor) -> Tensor:
    """Σ (s − t)² over every element except where s ≤ t and t ≤ 0 (the partial L2 distance)."""
    counted = (student > target) | (target > 0)
    return ((student - target).pow(2) * counted).sum()


def margin_target(teacher: Tensor, margin: Tensor) -> Tensor:
    """The teacher's feature through the margin ReLU: max(t, m), ``margin`` one value per channel."""
    shape = (1, -1) + (1,) * (teacher.dim() - 2)
    return torch.maximum(teacher, margin.to(teacher).view(shape))


def ofd_loss(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], margins: Sequence[Tensor]) -> Tensor:
    """Σ_i 2^−(n−1−i) · partial_l2(s_i, max(t_i, m_i)) / N over n pairs, the last (deepest) pair
    weighted 1: the authors' sum divided by the batch size. ``student_feats`` are already mapped
    to the teacher's shape."""
    n = len(student_feats)
    total = student_feats[0].new_zeros(()) if n else torch.zeros(())
    for i, (student, teacher, margin) in enumerate(zip(student_feats, teacher_feats, margins)):
        total = total + partial_l2(student, margin_target(teacher, margin)) / 2 ** (n - 1 - i)
    return total / (len(student_feats[0]) if n else 1)


# -- the layers: pre-activations and the BatchNorms behind them, from one traced forward pass ----------
def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


@torch.no_grad()
def _call_trace(model: nn.Module, example: Tensor, watched: set[str]) -> list[tuple[str, str, Any]]:
    """One forward pass in eval mode: ``("call", name, first input)`` each time a leaf module or a
    ``watched`` one is called and ``("exit", name, output)`` when a watched one returns, in order."""
    events: list[tuple[str, str, Any]] = []
    handles = []

    def on_call(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            events.append(("call", name, args[0] if args else None))

        return hook

    def on_exit(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            events.append(("exit", name, output))

        return hook

    was_training = model.training
    try:
        for name, module in model.named_modules():
            if name and (name in watched or _is_leaf(module)):
                handles.append(module.register_forward_pre_hook(on_call(name)))
            if name in watched:
                handles.append(module.register_forward_hook(on_exit(name)))
        model.eval()
        model(example)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return events


def preactivation_paths(model: nn.Module, example: Tensor, key: str) -> list[str]:
    """The pre-activation feature at the end of each stage (``distill.hooks.stage_paths``), from one
    forward pass of ``example``:

    * a stage whose last ReLU is followed by nothing with weights (a max-pool at most): that
      ReLU's input, ``<relu>:in`` (the CNN, the CIFAR ResNets' ``act``, VGG blocks);
    * a stage that ends un-activated and whose output goes straight through a BatchNorm and a
      ReLU (pre-activation designs: the WRN's next ``bn1``-``relu1``, or its final ``bn``-``relu``):
      that ReLU's input, the BN output, as the authors' code takes it;
    * otherwise the stage output itself, which no ReLU follows (MobileNetV2's linear bottlenecks).

    A ReLU module that runs again after its stage (one activation shared across the network)
    cannot be read at the stage and fails in one line naming ``key``.
    """
    stages = default_paths(model, "stages", key)
    modules = dict(model.named_modules())
    events = _call_trace(model, example, set(stages))
    leaves = {name for name, module in modules.items() if name and _is_leaf(module)}
    paths = []
    for stage in stages:
        calls = [i for i, event in enumerate(events) if event[:2] == ("call", stage)]
        exits = [i for i, event in enumerate(events) if event[:2] == ("exit", stage)]
        if not calls or not exits:
            raise ConfigError(
                f"{key}: the forward pass of {type(model).__name__} does not run its stage {stage!r}; "
                f"set {key} to module paths"
            )
        start, end = calls[-1], exits[-1]
        inside = [name for kind, name, _ in events[start:end] if kind == "call" and name in leaves]
        relus = [j for j, name in enumerate(inside) if isinstance(modules[name], nn.ReLU)]
        if relus and not any(_has_state(modules[name]) for name in inside[relus[-1] + 1 :]):
            relu = inside[relus[-1]]
            if any(event[:2] == ("call", relu) for event in events[end:]):
                raise ConfigError(
                    f"{key}: the ReLU {relu!r} of {type(model).__name__} ends stage {stage!r} but runs again "
                    f"later, so its input at the stage cannot be read; set {key} to module paths"
                )
            paths.append(f"{relu}:in")
            continue
        output = events[end][2]
        after = [(name, first) for kind, name, first in events[end + 1 :] if kind == "call" and name in leaves][:2]
        if (
            len(after) == 2
            and isinstance(modules[after[0][0]], _BatchNorm)
            and after[0][1] is output
            and isinstance(modules[after[1][0]], nn.ReLU)
        ):
            paths.append(f"{after[1][0]}:in")
        else:
            paths.append(stage)
    return paths


def preceding_batchnorms(model: nn.Module, paths: Sequence[str], example: Tensor, key: str) -> list[str]:
    """For each feature at ``paths``, the BatchNorm that produces it, found in the autograd graph
    of one forward pass of ``example`` (eval mode; the model's state is left as it was):

    * the BN whose output the feature is (a BN-ReLU's ``<relu>:in``), exactly;
    * for a residual sum, BN output + shortcut (the CIFAR ResNets' ``act:in``), the residual
      branch's last BN, as the authors' code does (``bn2`` of the stage's last block): among the
      BNs whose outputs are terms of the sum, the one with the most of the graph behind it. The
      branch holds the block input, so a shortcut that is the input itself (a BN output, as
      between MobileNetV2 blocks) or a projection of it (conv + BN) is never taken. The
      pre-activation is then not that BN's output alone, and its margin an approximation.

    A feature that no BN output reaches, directly or through one sum, fails in one line naming
    ``key``."""
    modules = dict(model.named_modules())
    order = {name: i for i, name in enumerate(modules)}
    norms: dict[Any, str] = {}  # autograd node of a BN output → the BN's path
    found: dict[int, Any] = {}  # feature i → its autograd node when it was read
    handles = []

    def keep_norm(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if output.grad_fn is not None:
                norms[output.grad_fn] = name

        return hook

    def keep_feature(i: int, use_input: bool) -> Callable:
        if use_input:
            return lambda module, args: found.__setitem__(i, args[0].grad_fn)
        return lambda module, args, output: found.__setitem__(i, output.grad_fn)

    was_training = model.training
    try:
        for name, module in modules.items():
            if isinstance(module, _BatchNorm):
                handles.append(module.register_forward_hook(keep_norm(name)))
        for i, path in enumerate(paths):
            module = resolve(model, path, key)
            use_input = split_path(path)[1]
            hook = keep_feature(i, use_input)
            handles.append(module.register_forward_pre_hook(hook) if use_input else module.register_forward_hook(hook))
        model.eval()
        x = example.detach().clone()
        if x.is_floating_point():
            x.requires_grad_(True)
        with torch.enable_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    result = []
    for i, path in enumerate(paths):
        node = found.get(i)
        if node is not None and node in norms:
            result.append(norms[node])
            continue
        if node is not None and type(node).__name__.startswith("AddBackward"):
            terms = [n for n, _ in node.next_functions if n is not None and n in norms]
            if terms:
                # the residual branch: the deepest term (most of the graph behind it), which
                # holds the block input and any projection of it; ties by registration order
                deepest = max(terms, key=lambda n: (_graph_size(n), -order[norms[n]]))
                result.append(norms[deepest])
                continue
        raise ConfigError(
            f"{key}: distill=ofd takes each teacher feature's margin from the BatchNorm that produces it, and no "
            f"BatchNorm output reaches {path!r} of {type(model).__name__} (directly or through a residual sum); "
            f"set {key} to pre-ReLU BatchNorm outputs, e.g. the input of a ReLU that follows a BatchNorm ('<relu>:in')"
        )
    return result


def _graph_size(node: Any) -> int:
    """The number of autograd nodes ``node`` depends on, itself included."""
    seen, stack = {node}, [node]
    while stack:
        for parent, _ in stack.pop().next_functions:
            if parent is not None and parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return len(seen)


def check_readable(model: nn.Module, paths: Sequence[str], key: str, method: str) -> None:
    """Fail in one line when a ``<module>:in`` path names a module that works in place: it would
    overwrite the input read there (the pre-activation) with its output."""
    for path in paths:
        name, use_input = split_path(path)
        module = resolve(model, path, key)
        if use_input and getattr(module, "inplace", False):
            raise ConfigError(
                f"{key}={path!r}: {type(module).__name__} {name!r} of {type(model).__name__} works in place and "
                f"overwrites the input distill={method} reads there; build it with inplace=False or choose "
                "another layer"
            )


PathRule = Callable[[nn.Module, str], list[str]]


def layer_pair(
    method: FeatureMethod,
    student: nn.Module,
    teacher: nn.Module,
    same_architecture: bool,
    student_rule: PathRule,
    teacher_rule: PathRule,
) -> tuple[list[str], list[str]]:
    """The configured layers, else ``rule(model, key)`` of each model; default layers of models of
    different depth pair up from the output side, as ``FeatureMethod.bind`` pairs default stages.
    ``same_architecture``: the student's layers serve both."""
    student_paths = method.student_layers or student_rule(student, method.student_key)
    if same_architecture:
        return list(student_paths), list(student_paths)
    teacher_paths = method.teacher_layers or teacher_rule(teacher, method.teacher_key)
    if len(student_paths) != len(teacher_paths) and not (method.student_layers or method.teacher_layers):
        n = min(len(student_paths), len(teacher_paths))
        student_paths, teacher_paths = student_paths[-n:], teacher_paths[-n:]
    return list(student_paths), list(teacher_paths)


@contextlib.contextmanager
def layers_given(method: FeatureMethod, student_paths: Sequence[str], teacher_paths: Sequence[str]) -> Iterator[None]:
    """``method`` with these layers in place of its configured ones while the block runs, so that
    ``FeatureMethod.bind`` traces them; the configured values are restored afterwards."""
    configured = method.student_layers, method.teacher_layers
    method.student_layers, method.teacher_layers = list(student_paths), list(teacher_paths)
    try:
        yield
    finally:
        method.student_layers, method.teacher_layers = configured


# -- the module ----------------------------------------------------------------------------------------
class Connector(nn.Module):
    """The student transform: a 1×1 conv (no bias) + BN from the student's channels to the
    teacher's, initialised as in the authors' code (conv weights N(0, 2/(k²·C_out)), BN γ = 1,
    β = 0). A student map of another spatial size is first average-pooled to the teacher's
    (adaptive pooling, which repeats pixels when it enlarges)."""

    def __init__(self, student_channels: int, teacher_channels: int, teacher_size: Sequence[int]) -> None:
        super().__init__()
        self.teacher_size = tuple(int(s) for s in teacher_size)
        self.conv = nn.Conv2d(student_channels, teacher_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(teacher_channels)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[2:]) != self.teacher_size:
            x = F.adaptive_avg_pool2d(x, self.teacher_size)
        return self.bn(self.conv(x))


class OFD(FeatureMethod):
    """A comprehensive overhaul of feature distillation (Heo et al., ICCV 2019):

        ofd = ofd_weight · Σ_i 2^−(n−1−i) · partial_l2(r_i(f_s,i), max(f_t,i, m_i)) / N

    (``ofd_loss``), r_i a ``Connector`` per pair, m_i the margins of the teacher's BatchNorms
    (``bn_margin``), read from the live teacher at every step: the teacher is trained or loaded
    after ``bind``, and frozen while the student learns. Default layers: the pre-ReLU feature at
    the end of every stage of each model (``preactivation_paths``), paired from the output side
    when the depths differ. Needs N×C×H×W maps on both sides and a BatchNorm before each teacher
    feature; logs ``ofd``.
    """

    default_layers = "stages"  # the stages whose pre-activations ``bind`` reads

    def __init__(
        self,
        ofd_weight: Weight,
        student_layers: str | Sequence[str] | None,
        teacher_layers: str | Sequence[str] | None,
        kd: KDTerm,
    ) -> None:
        super().__init__(kd, student_layers, teacher_layers)
        self.ofd_weight = float(ofd_weight)
        self.connectors = nn.ModuleList()
        #: the teacher's BatchNorms behind its features: read, never registered (they are the
        #: teacher's, neither trained nor counted with the method)
        self.teacher_norms: list[nn.Module] = []
        self.teacher_norm_paths: list[str] = []

    def bind(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        example: Tensor,
        same_architecture: bool = False,
        train_size: int | None = None,
    ) -> None:
        """Resolve the pre-ReLU layers and the teacher's BatchNorm behind each, then build the
        connectors (``FeatureMethod.bind``)."""
        if teacher is None:  # the base says in one line that a teacher is needed
            super().bind(student, teacher, example, same_architecture, train_size)
            return

        def rule(model: nn.Module, key: str) -> list[str]:
            return preactivation_paths(model, example, key)

        student_paths, teacher_paths = layer_pair(self, student, teacher, same_architecture, rule, rule)
        norm_paths = preceding_batchnorms(teacher, teacher_paths, example, self.teacher_key)
        check_readable(student, student_paths, self.student_key, "ofd")
        check_readable(teacher, teacher_paths, self.teacher_key, "ofd")
        modules = dict(teacher.named_modules())
        self.teacher_norm_paths, self.teacher_norms = norm_paths, [modules[name] for name in norm_paths]
        with layers_given(self, student_paths, teacher_paths):
            super().bind(student, teacher, example, same_architecture, train_size)

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        self.require_maps(student_shapes, teacher_shapes, "ofd")
        for path, norm_path, norm, shape in zip(
            self.teacher_paths, self.teacher_norm_paths, self.teacher_norms, teacher_shapes
        ):
            channels = getattr(norm, "num_features", None)
            if channels != shape[1]:
                raise ConfigError(
                    f"{self.teacher_key}: the BatchNorm {norm_path!r} before teacher layer {path!r} has {channels} "
                    f"channels, the feature {shape[1]}; set {self.teacher_key} to BatchNorm outputs"
                )
        self.connectors = nn.ModuleList(
            Connector(s[1], t[1], t[2:]) for s, t in zip(student_shapes, teacher_shapes, strict=True)
        )

    def margins(self) -> list[Tensor]:
        """The margin of each teacher feature, from its BatchNorm's current weight and bias."""
        with torch.no_grad():
            return [bn_margin(norm.weight, norm.bias, norm.num_features) for norm in self.teacher_norms]

    def feature_terms(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> dict[str, Tensor]:
        mapped = [connector(f) for connector, f in zip(self.connectors, student_feats)]
        return {"ofd": self.ofd_weight * ofd_loss(mapped, teacher_feats, self.margins())}

    def extra_repr(self) -> str:
        return f"ofd_weight={self.ofd_weight}, lam={self.lam}, temperature={self.temperature}"
