"""Int8 quantization: ``dynamic`` and ``static`` post-training quantization, and ``qat``
(quantization-aware training with the run's distillation loss).

Every method returns a model whose weights are stored as int8 and that runs int8 CPU kernels
(fbgemm / oneDNN under the ``x86`` engine, QNNPACK on ARM):

``dynamic``
    Linear, LSTM and GRU layers get int8 weights (per output channel for Linear); their input
    activations are quantized on the fly, with a scale computed per batch. Convolutions stay
    float. No data needed. Pays off at batch sizes of tens and more; at batch 1 the per-call
    quantization overhead can make a small model slower than float.
``static``
    Convolutions and Linear layers get int8 weights (per output channel when ``per_channel``)
    and int8 activations whose scales are fixed by calibrating on ``calibration_batches``
    training batches. Before that, conv-BN(-ReLU), conv-ReLU and Linear-ReLU sequences are
    fused (see *Fusion*), and the model is wrapped in a quantize / dequantize pair, so the
    returned model is ``QuantWrapper(model)``: its layers are at ``module.<path>``.
``qat``
    The same fused and wrapped model with fake quantization (``prepare_qat``) is fine-tuned by
    ``context.finetune`` with the distillation loss (the uncompressed model as teacher), after
    ``calibration_batches`` batches initialise the activation ranges; at the start of the last
    epoch (when there are two or more) the ranges and the BatchNorm statistics are frozen.
    Then it is converted to int8 as ``static`` does.

Backend
    One :class:`Backend` object does the quantizing (:data:`BACKEND`); a method only asks it to
    ``dynamic``, ``prepare`` and ``convert``, so another implementation can be swapped in. The
    one used is torch.ao.quantization in eager mode: on this kind of machine it is the one that
    gives int8 *speed* on plain modules, with no compilation step (torchao's eager int8
    tensor subclasses shrink the file but run several times slower than float without
    ``torch.compile``). torch.ao.quantization announces its deprecation on every call; exactly
    those messages are silenced, around the calls into it only (:func:`quiet_deprecations`).

Fusion
    Each module that ``forward`` runs is traced with torch.fx, with its children kept as calls.
    A conv (1d/2d/3d) whose only consumer is its BatchNorm, optionally followed by a ReLU that
    is the BatchNorm's only consumer, is fused, as are conv-ReLU and Linear-ReLU; each module of
    a group must be called once per forward (a ReLU module reused after a residual addition is
    not fused). Distillab's ``CNN`` fuses every ``stages.i.j`` conv-BN-ReLU; the CIFAR ResNets
    fuse stem conv-BN-ReLU, ``conv1``-``bn1``-``relu``, ``conv2``-``bn2`` and the projection
    conv-BN of every block; the pre-activation Wide ResNets fuse ``conv1``-``bn2``-``relu2``.

Residual additions and other tensor arithmetic
    Int8 tensors cannot be added with ``+``. In a module whose forward traces, every addition
    or multiplication of two tensors (``x + y``, ``torch.add``, ``x.mul(y)``...), with a number,
    and every ``torch.cat`` is rewritten as a call of its own ``FloatFunctional`` (observed, so
    its output gets its own scale) named ``q_add_0``, ``q_mul_0``, ``q_cat_0``...; such a module
    is replaced by its traced ``GraphModule`` at the same path, with the same children. This is
    how the CIFAR ResNets, Wide ResNets and MobileNetV2 are quantized. A forward that does not
    trace is left as it is; if it then does something the int8 model cannot run, the method
    stops with a one-line ``ConfigError`` naming the module instead of producing a wrong model
    (checked by running the converted model once before calibration or fine-tuning).

Accuracy budget: mixed precision
    With ``max_acc_drop`` set, each method quantizes everything, measures the validation
    accuracy (``compress.val_accuracy``) and, when it fell by more than the budget below
    ``context.reference_val_acc``, keeps layers in float until it does not. The layers are the
    convolutions and Linear layers (``static``, ``qat``; a fused conv-BN-ReLU counts as its conv)
    or the Linear/LSTM/GRU layers (``dynamic``), by their path in the float model. A scan first
    quantizes each layer alone (all others float) and records the validation accuracy; the
    layers are then kept float in the order of that accuracy, lowest first, the combined model
    checked after each, until the drop is within the budget. N layers cost N + k evaluations
    (k: the layers kept float); activation scales are calibrated on the same cached batches for
    every candidate, so two candidates differ only in their float layers. If the budget is met
    with everything int8, no scan is run and nothing is float. If no float set meets it, the
    candidate with the best validation accuracy is returned and ``within_budget`` is false (a
    float layer still receives and passes on int8 activations, so even all layers float is not
    the float model). A dry run (``context.dry_run``) skips the search.

    ``qat`` chooses its float set by that post-training search (fast, no training) before the
    fine-tuning, fake-quantizes only the other layers, and checks the budget after conversion;
    since fine-tuning usually recovers accuracy, the set is a conservative one.

    A float layer of a static or QAT model sits in a :class:`FloatLayer` at its own path:
    ``dequant`` -> the float layer (``qconfig = None``, so prepare and convert leave it alone)
    -> ``quant``, whose scale is calibrated on the layer's float output. The returned
    ``details`` list ``float_layers``, the int8 ``layers``, ``val_acc``, ``reference_val_acc``,
    ``acc_drop``, ``within_budget`` and the scan (``sensitivity``, also
    ``tables["quant_sensitivity"]``, saved as ``compressed/quant_sensitivity.csv``).

Saving and reloading
    ``Compressed.save(path)`` writes ``{"format", "float_layers", "state_dict"}`` with
    ``torch.save``: the int8 model's state (int8 weights with their scales, the float layers'
    weights) and the paths of its float layers. Packed int8 layers need their module structure
    to be read back: rebuild the float architecture and apply the same preparation, float
    layers and conversion, then ``load_state_dict``. :func:`load_dynamic`, :func:`load_static`
    and :func:`load_qat` (or :func:`load` by method name) do exactly that, reading the float
    layers from the file (with ``weights_only=True``)::

        float_model = CNN((1, 8, 8), 10, width=32, blocks=2, dropout=0.0)
        model = load_static("model_int8.pt", float_model, (1, 8, 8), per_channel=True, engine="x86")
"""

from __future__ import annotations

import abc
import contextlib
import copy
import dataclasses
import functools
import logging
import operator
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Literal

import torch
import torch.ao.nn.intrinsic.qat as intrinsic_qat
import torch.ao.quantization as tq
from torch import Tensor, fx, nn
from torch.ao.nn.quantized import FloatFunctional
from torch.overrides import TorchFunctionMode

from distillab.compress import Compressed, Context, mixed, val_accuracy
from distillab.settings import AccuracyDrop, ConfigError, Count, checked

log = logging.getLogger(__name__)

__all__ = [
    "BACKEND",
    "Backend",
    "EagerBackend",
    "FloatLayer",
    "Preparation",
    "dynamic",
    "int8_layers",
    "load",
    "load_dynamic",
    "load_qat",
    "load_static",
    "qat",
    "quiet_deprecations",
    "static",
]

#: int8 kernels: x86 (fbgemm + oneDNN), fbgemm, or qnnpack (ARM)
Engine = Literal["x86", "fbgemm", "qnnpack"]

# -- the deprecation messages of torch.ao.quantization ------------------------------------------
# (category, regular expression matched at the start of the message). torch.ao.quantization
# warns on every prepare/convert/quantize_dynamic call that it moves to torchao, its observers
# that ``reduce_range`` will be deprecated, its converted layers that quantized tensor creation
# functions are, and saving quantized tensors touches the deprecated TypedStorage. None of it
# is about the user's model.
_DEPRECATION_NOISE: tuple[tuple[type[Warning], str], ...] = (
    (DeprecationWarning, r"torch\.ao\.quantization is deprecated"),
    (UserWarning, r"Please use quant_min and quant_max to specify the range for observers"),
    (UserWarning, r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor creation"),
    (UserWarning, r"TypedStorage is deprecated"),
)


@contextlib.contextmanager
def quiet_deprecations() -> Iterator[None]:
    """Silence exactly the deprecation messages of torch.ao.quantization inside the block;
    every other warning is shown as usual."""
    with warnings.catch_warnings():
        for category, message in _DEPRECATION_NOISE:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


@contextlib.contextmanager
def _engine(name: str) -> Iterator[None]:
    """Select the quantized kernel library for the block (weights are packed for it)."""
    supported = torch.backends.quantized.supported_engines
    if name not in supported:
        raise ConfigError(f"engine={name}: not available in this torch build on this CPU; use one of {supported}")
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def _dynamic_engine() -> str:
    return "x86" if "x86" in torch.backends.quantized.supported_engines else "qnnpack"


# -- the backend ----------------------------------------------------------------------------------
@dataclass
class Preparation:
    """What ``Backend.prepare`` did to a model, for ``Compressed.details``."""

    fused: list[list[str]] = field(default_factory=list)
    functional_ops: list[str] = field(default_factory=list)
    untraced: list[str] = field(default_factory=list)


class Backend(abc.ABC):
    """One implementation of int8 quantization.

    ``dynamic(model, engine, keep_float)`` returns the dynamically quantized model. ``prepare(model,
    example, engine, per_channel, qat, method, keep_float)`` returns the model ready for calibration
    (observers) or for quantization-aware training (fake quantization) and what was done to it;
    ``convert(model, engine)`` turns such a model into the int8 one. ``keep_float``: paths of
    layers of ``model`` that stay in float (mixed precision). Inputs may be modified.
    """

    name = ""

    def describe(self, engine: str) -> str:
        return f"{self.name}, {engine} engine"

    @abc.abstractmethod
    def dynamic(self, model: nn.Module, engine: str, keep_float: Sequence[str]) -> nn.Module:
        """The model with dynamically quantized Linear/LSTM/GRU layers, but those of ``keep_float``."""

    @abc.abstractmethod
    def prepare(
        self,
        model: nn.Module,
        example: Tensor,
        engine: str,
        per_channel: bool,
        qat: bool,
        method: str,
        keep_float: Sequence[str],
    ) -> tuple[nn.Module, Preparation]:
        """The model with observers (or fake quantization for QAT), and what was done to it."""

    @abc.abstractmethod
    def convert(self, model: nn.Module, engine: str) -> nn.Module:
        """The calibrated or trained prepared model as a real int8 model."""


DYNAMIC_TYPES = (nn.Linear, nn.LSTM, nn.GRU)
STATIC_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class EagerBackend(Backend):
    """torch.ao.quantization eager mode: module swaps to ``torch.ao.nn.quantized`` layers."""

    name = "torch.ao.quantization eager"

    def dynamic(self, model: nn.Module, engine: str, keep_float: Sequence[str]) -> nn.Module:
        for path in keep_float:  # quantize_dynamic keeps a module's own qconfig over the spec's
            _layer(model, path, "quant_dynamic").qconfig = None
        spec = {
            nn.Linear: tq.per_channel_dynamic_qconfig if engine != "qnnpack" else tq.default_dynamic_qconfig,
            nn.LSTM: tq.default_dynamic_qconfig,
            nn.GRU: tq.default_dynamic_qconfig,
        }
        with quiet_deprecations(), _engine(engine):
            return tq.quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)

    def prepare(
        self,
        model: nn.Module,
        example: Tensor,
        engine: str,
        per_channel: bool,
        qat: bool,
        method: str,
        keep_float: Sequence[str],
    ) -> tuple[nn.Module, Preparation]:
        arch = type(model).__name__
        model.eval()
        model, done = _rewrite_and_find_fusions(model, example)
        with quiet_deprecations(), _engine(engine):
            if qat:
                model.train()
            if done.fused:
                fuse = tq.fuse_modules_qat if qat else tq.fuse_modules
                fuse(model, done.fused, inplace=True)
            for path in keep_float:
                _replace(model, path, FloatLayer(_layer(model, path, method)))
            wrapped = tq.QuantWrapper(model)
            wrapped.qconfig = _qconfig(engine, per_channel, qat)
            if qat:
                tq.prepare_qat(wrapped, inplace=True)
            else:
                tq.prepare(wrapped, inplace=True)
        if not keep_float:  # a float layer only adds a dequantize / quantize pair: the all-int8 check covers it
            _check_int8_runs(wrapped, example, engine, arch, method, self)
        return wrapped, done

    def convert(self, model: nn.Module, engine: str) -> nn.Module:
        model.cpu().eval()
        with quiet_deprecations(), _engine(engine):
            return tq.convert(model, inplace=True)


BACKEND: Backend = EagerBackend()


class FloatLayer(nn.Module):
    """A layer kept in float inside an eager int8 model: its int8 input is dequantized, and its
    float output quantized again (with a scale calibrated like any other activation), so the
    int8 layers around it are unchanged. ``layer.qconfig = None`` makes prepare and convert
    leave it (and a fused group's members) alone."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        layer.qconfig = None
        self.dequant, self.layer, self.quant = tq.DeQuantStub(), layer, tq.QuantStub()

    def forward(self, x: Tensor) -> Tensor:
        return self.quant(self.layer(self.dequant(x)))


def _layer(model: nn.Module, path: str, method: str) -> nn.Module:
    """The submodule of ``model`` at ``path``; a ``ConfigError`` naming it when there is none."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ConfigError(
            f"float layer '{path}' is not a layer of {type(model).__name__}: {method} was given another architecture"
        ) from None


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _qconfig(engine: str, per_channel: bool, qat: bool) -> tq.QConfig:
    """The engine's default qconfig, with per-channel or per-tensor symmetric int8 weights."""
    if qat:
        base = tq.get_default_qat_qconfig(engine)
        weight = tq.default_per_channel_weight_fake_quant if per_channel else tq.default_weight_fake_quant
    else:
        base = tq.get_default_qconfig(engine)
        weight = tq.default_per_channel_weight_observer if per_channel else tq.default_weight_observer
    return tq.QConfig(activation=base.activation, weight=weight)


# -- tracing: fusable sequences and tensor arithmetic ---------------------------------------------
class _ChildrenAsCalls(fx.Tracer):
    """Traces one module's own forward; every submodule it calls stays one call node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _is_builtin_layer(module: nn.Module) -> bool:
    """A torch layer with a known forward (Conv2d, ReLU...): nothing to trace inside it."""
    return type(module).__module__.startswith(("torch.nn.modules", "torch.ao.")) and not isinstance(
        module, nn.Sequential
    )


def _record_calls(model: nn.Module, example: Tensor) -> tuple[dict[str, tuple | None], Counter]:
    """The first positional inputs of every module in one forward pass (None when it was called
    with keyword arguments), and how many times each module was called."""
    inputs: dict[str, tuple | None] = {}
    calls: Counter = Counter()
    handles = []
    for name, module in model.named_modules():

        def hook(module: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            calls[name] += 1
            if name not in inputs:  # copies: an in-place layer later in the pass would change them
                copies = tuple(a.detach().clone() if isinstance(a, Tensor) else a for a in args)
                inputs[name] = None if kwargs else copies

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, calls


def _tensor_nodes(module: nn.Module, graph: fx.Graph, args: tuple) -> set[fx.Node]:
    """The nodes of ``module``'s traced graph whose value is a tensor, found by running a copy
    of the graph on ``args``."""
    names: set[str] = set()

    class Probe(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if isinstance(result, Tensor):
                names.add(n.name)
            return result

    with torch.no_grad():
        Probe(fx.GraphModule(module, copy.deepcopy(graph))).run(*args)
    return {node for node in graph.nodes if node.name in names}


_ADDS = {operator.add, operator.iadd, torch.add}
_MULS = {operator.mul, operator.imul, torch.mul}
_CATS = {torch.cat, torch.concat, torch.concatenate}
_METHODS = {"add": "add", "add_": "add", "mul": "mul", "mul_": "mul"}


def _functional_call(node: fx.Node, tensors: set[fx.Node]) -> tuple[str, tuple, dict] | None:
    """``(FloatFunctional method, args, kwargs)`` replacing ``node``, or None to leave it."""
    if node.op == "call_function" and node.target in _CATS:
        parts = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if isinstance(parts, (list, tuple)) and parts and all(p in tensors for p in parts):
            return "cat", (list(parts),), {"dim": dim}
        return None
    if node.op == "call_function" and node.target in _ADDS | _MULS:
        kind = "add" if node.target in _ADDS else "mul"
    elif node.op == "call_method" and node.target in _METHODS:
        kind = _METHODS[node.target]
    else:
        return None
    if len(node.args) != 2 or node.kwargs:  # torch.add(x, y, alpha=...) and the like stay
        return None
    a, b = node.args
    if a in tensors and b in tensors:
        return kind, (a, b), {}
    if a in tensors or b in tensors:
        tensor, number = (a, b) if a in tensors else (b, a)
        return f"{kind}_scalar", (tensor, number), {}
    return None


def _only_consumer(node: fx.Node) -> fx.Node | None:
    """The single module call that consumes ``node`` (and nothing else), if there is one."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.op != "call_module" or list(user.args) != [node] or user.kwargs:
        return None
    return user


_BN_OF = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


def _fusable(module: nn.Module, graph: fx.Graph, prefix: str, calls: Counter) -> list[list[str]]:
    """conv-BN(-ReLU), conv-ReLU and Linear-ReLU chains of one traced forward, as module paths."""
    groups = []
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        first = type(module.get_submodule(node.target))
        if first not in _BN_OF and first is not nn.Linear:
            continue
        chain, nxt = [node], _only_consumer(node)
        if nxt is not None and first in _BN_OF and type(module.get_submodule(nxt.target)) is _BN_OF[first]:
            chain.append(nxt)
            nxt = _only_consumer(nxt)
        if nxt is not None and type(module.get_submodule(nxt.target)) is nn.ReLU:
            chain.append(nxt)
        paths = [f"{prefix}.{n.target}" if prefix else str(n.target) for n in chain]
        if len(chain) > 1 and all(calls.get(path, 0) == 1 for path in paths):
            groups.append(paths)
    return groups


def _rewrite_and_find_fusions(model: nn.Module, example: Tensor) -> tuple[nn.Module, Preparation]:
    """Find the fusable sequences of ``model`` and rewrite its tensor arithmetic into
    ``FloatFunctional`` calls (see the module docstring). Returns the model (a new object only
    when its own forward was rewritten) and what was found."""
    inputs, calls = _record_calls(model, example)
    done = Preparation()
    # children before their parents, so a parent's graph calls the already rewritten child
    for name, module in reversed(list(model.named_modules())):
        args = inputs.get(name)
        if args is None or _is_builtin_layer(module):
            continue
        try:
            graph = _ChildrenAsCalls().trace(module)
            tensors = _tensor_nodes(module, graph, args)
        except Exception:  # data-dependent control flow and the like: left as it is
            done.untraced.append(name or type(module).__name__)
            continue
        done.fused += _fusable(module, graph, name, calls)
        counts: Counter = Counter()
        for node in list(graph.nodes):
            call = _functional_call(node, tensors)
            if call is None:
                continue
            method, call_args, call_kwargs = call
            kind = method.removesuffix("_scalar")
            attribute = f"q_{kind}_{counts[kind]}"
            while hasattr(module, attribute):  # a model quantized before keeps its own
                counts[kind] += 1
                attribute = f"q_{kind}_{counts[kind]}"
            counts[kind] += 1
            module.add_module(attribute, FloatFunctional())
            with graph.inserting_before(node):
                owner = graph.get_attr(attribute)
                replacement = graph.call_method(method, (owner, *call_args), call_kwargs)
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
            done.functional_ops.append(f"{name + '.' if name else ''}{attribute}")
        if not counts:
            continue
        rewritten = fx.GraphModule(module, graph, class_name=type(module).__name__)
        rewritten.graph.lint()
        rewritten.train(module.training)
        if name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, rewritten)
        else:
            model = rewritten
    done.fused.sort()
    return model, done


# -- the trial run: refuse what the int8 model cannot compute -------------------------------------
class _Unsupported(Exception):
    """An operation the int8 model would run wrongly (see ``_CatGuard``)."""


class _CatGuard(TorchFunctionMode):
    """``torch.cat`` of int8 tensors keeps the first one's scale and clips the others: refuse it
    (rewritten concatenations use ``FloatFunctional.cat``, which requantizes)."""

    def __torch_function__(self, func: Callable, types: Any, args: Sequence = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _CATS or func is torch.stack:
            parts = args[0] if args else kwargs.get("tensors", ())
            quantized = [t for t in parts if isinstance(t, Tensor) and t.is_quantized]
            if quantized and (
                len(quantized) < len(parts) or len({(t.q_scale(), t.q_zero_point()) for t in quantized}) > 1
            ):
                raise _Unsupported(f"torch.{func.__name__} of int8 tensors with different scales")
        return func(*args, **kwargs)


def _check_int8_runs(
    prepared: nn.Module, example: Tensor, engine: str, arch: str, method: str, backend: Backend
) -> None:
    """Convert a copy of ``prepared`` and run it once; a ``ConfigError`` naming the module if
    it uses an operation the int8 model cannot run."""
    trial = copy.deepcopy(prepared).eval()
    with quiet_deprecations(), torch.no_grad():
        trial(example)
    trial = backend.convert(trial, engine)
    stack: list[str] = []  # the modules being run, innermost last; left as it is by an error

    def enter(module: nn.Module, args: tuple, name: str = "") -> None:
        stack.append(name)

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        stack.pop()

    handles = []
    for name, module in trial.named_modules():
        handles.append(module.register_forward_pre_hook(functools.partial(enter, name=name)))
        handles.append(module.register_forward_hook(leave))
    try:
        with quiet_deprecations(), torch.no_grad(), _CatGuard():
            trial(example)
    except (_Unsupported, NotImplementedError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if not isinstance(error, _Unsupported) and "quantized" not in str(error).lower():
            raise
        where = stack[-1].removeprefix("module.") if stack and stack[-1] not in ("", "module") else arch
        raise ConfigError(
            f"{method} cannot run {arch} in int8: '{where}' uses an operation without an int8 kernel "
            f"({reason[:160]}); supported are conv, linear, batch norm, ReLU, pooling, and tensor "
            f"add/mul/cat in forward methods torch.fx can trace"
        ) from None
    finally:
        for handle in handles:
            handle.remove()


# -- what a converted model holds --------------------------------------------------------------
def int8_layers(model: nn.Module) -> dict[str, str]:
    """Module path -> stored weight dtype of every quantized layer of ``model``."""
    layers = {}
    for name, module in model.named_modules():
        if not type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")):
            continue
        weight = getattr(module, "weight", None)
        if callable(weight):
            layers[name] = str(weight().dtype)
        elif hasattr(module, "_all_weight_values"):  # dynamic LSTM / GRU: packed per gate
            layers[name] = str(module.dtype)
    return layers


#: what ``Compressed.save`` writes: ``{"format", "float_layers", "state_dict"}``
ARTIFACT_FORMAT = "distillab.quantize/1"
#: the name of the sensitivity scan among ``Compressed.tables`` (``compressed/<name>.csv``)
SENSITIVITY_TABLE = "quant_sensitivity"


def _save(model: nn.Module, float_layers: Sequence[str]) -> Callable[[Any], None]:
    """Write the artifact: the state of the int8 model and the paths of its float layers."""

    def save(path: Any) -> None:
        artifact = {"format": ARTIFACT_FORMAT, "float_layers": list(float_layers), "state_dict": model.state_dict()}
        with quiet_deprecations():
            torch.save(artifact, path)

    return save


def _read(path: Any) -> tuple[dict[str, Any], list[str]]:
    """The state and the float layers of an artifact written by ``Compressed.save``."""
    with quiet_deprecations():
        artifact = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(artifact, dict) or artifact.get("format") != ARTIFACT_FORMAT:
        raise ConfigError(f"path={str(path)!r} is not allowed: an int8 artifact in the {ARTIFACT_FORMAT} format")
    return artifact["state_dict"], list(artifact["float_layers"])


def _load_state(model: nn.Module, state: dict[str, Any], engine: str) -> nn.Module:
    with quiet_deprecations(), _engine(engine):
        model.load_state_dict(state)
    return model.eval()


def _example(input_shape: Sequence[int]) -> Tensor:
    """Two random inputs: the structure of a forward pass, for tracing and the trial run."""
    return torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))


def _float_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).cpu().float().eval()


def _calibration_inputs(context: Context, batches: int, method: str) -> list[Tensor]:
    """The inputs of the first ``batches`` training batches, kept so that every candidate of a
    budget search is calibrated on the same data."""
    inputs = [x.cpu() for x, *_ in islice(context.train_batches(), batches)]
    if not inputs:
        raise ConfigError(f"{method}: context.train_batches() gave no batch to calibrate on")
    return inputs


def _calibrate(model: nn.Module, inputs: Sequence[Tensor]) -> None:
    """Run ``inputs`` through ``model`` (eval mode, no gradients) so its observers record ranges."""
    model.eval()
    with quiet_deprecations(), torch.no_grad():
        for x in inputs:
            model(x)


def _require_layers(model: nn.Module, types: tuple[type, ...], method: str, what: str) -> None:
    if not any(isinstance(m, types) for m in model.modules()):
        raise ConfigError(f"{method} quantizes {what} layers; {type(model).__name__} has none")


def _candidates(model: nn.Module, types: tuple[type, ...]) -> list[str]:
    """Paths of the layers of ``model`` a budget search may keep float, in module order."""
    return [name for name, module in model.named_modules() if name and isinstance(module, types)]


# -- the accuracy budget ---------------------------------------------------------------------------
def _budget_applies(max_acc_drop: float | None, context: Context) -> bool:
    """A budget is searched when one is set, except on a dry run (untrained model, one batch)."""
    return max_acc_drop is not None and not context.dry_run


def _search(
    all_int8: nn.Module,
    build: Callable[[list[str]], nn.Module],
    layers: list[str],
    context: Context,
    max_acc_drop: float,
    method: str,
) -> mixed.MixedPrecision[nn.Module]:
    """Keep the fewest ``layers`` float that bring the validation accuracy within ``max_acc_drop`` of
    ``context.reference_val_acc``, starting from ``all_int8`` (``compress.mixed``).
    ``build(keep_float)`` quantizes the float model with the layers ``keep_float`` left in float."""
    if context.reference_val_acc is None or context.val_batches is None:
        raise ValueError(f"{method}: max_acc_drop needs context.reference_val_acc and context.val_batches")
    batches = list(context.val_batches())  # read once: every candidate is evaluated on them
    context = dataclasses.replace(context, val_batches=lambda: batches)
    return mixed.search(
        build,
        lambda model: val_accuracy(model, context),
        layers,
        context.reference_val_acc,
        max_acc_drop,
        method,
        first=all_int8,
    )


def _compressed(
    method: str, search: mixed.MixedPrecision | None, quantized: nn.Module, details: dict[str, Any], engine: str
) -> Compressed:
    """The ``Compressed`` of ``method``: the searched model when there was a budget, with the
    search in its details and its scan among its tables."""
    model = search.candidate if search is not None else quantized
    float_layers = search.float_layers if search is not None else []
    details["float_layers"] = list(float_layers)
    tables = {}
    if search is not None:
        details.update(search.details())
        if search.scan:
            tables[SENSITIVITY_TABLE] = search.scan
    return Compressed(model, method, BACKEND.describe(engine), _save(model, float_layers), details, tables)


# -- the methods -------------------------------------------------------------------------------
@checked
def dynamic(model: nn.Module, context: Context, *, max_acc_drop: AccuracyDrop | None) -> Compressed:
    """Int8 weights for Linear / LSTM / GRU layers, activations quantized per batch at run time;
    within ``max_acc_drop`` (when set) by keeping the most sensitive of those layers float."""
    _require_layers(model, DYNAMIC_TYPES, "quant_dynamic", "Linear, LSTM and GRU")
    engine = _dynamic_engine()

    def build(keep_float: list[str]) -> nn.Module:
        return BACKEND.dynamic(_float_copy(model), engine, keep_float).eval()

    quantized = build([])
    layers = _candidates(model, DYNAMIC_TYPES)
    search = None
    if _budget_applies(max_acc_drop, context):
        search = _search(quantized, build, layers, context, max_acc_drop, "quant_dynamic")
    float_layers = set(search.float_layers if search is not None else [])
    final = search.candidate if search is not None else quantized
    total = sum(p.numel() for p in model.parameters())
    covered = sum(
        p.numel() for name in layers if name not in float_layers for p in model.get_submodule(name).parameters()
    )
    int8 = int8_layers(final)
    share = covered / total if total else 0.0
    if share < 0.5:
        log.warning(
            "quant_dynamic: the %d int8 Linear/LSTM/GRU layers of %s hold %.0f%% of its weights; the rest stays float "
            "(quant_static quantizes convolutions)",
            len(int8),
            type(model).__name__,
            100 * share,
        )
    details = {
        "engine": engine,
        "weights": "int8, per output channel (Linear)",
        "activations": "int8, scale computed per batch at run time",
        "int8_layers": len(int8),
        "int8_weight_share": round(share, 4),
        "layers": int8,
    }
    return _compressed("quant_dynamic", search, quantized, details, engine)


def _post_training(
    model: nn.Module,
    inputs: Sequence[Tensor],
    input_shape: Sequence[int],
    per_channel: bool,
    engine: str,
    method: str,
    keep_float: list[str],
) -> tuple[nn.Module, Preparation]:
    """A copy of ``model`` quantized statically, calibrated on ``inputs``, with ``keep_float`` left float."""
    prepared, done = BACKEND.prepare(
        _float_copy(model), _example(input_shape), engine, per_channel, qat=False, method=method, keep_float=keep_float
    )
    _calibrate(prepared, inputs)
    return BACKEND.convert(prepared, engine), done


@checked
def static(
    model: nn.Module,
    context: Context,
    *,
    calibration_batches: Count,
    per_channel: bool,
    engine: Engine,
    max_acc_drop: AccuracyDrop | None,
) -> Compressed:
    """Post-training static int8: fuse, insert quant/dequant stubs, calibrate, convert; within
    ``max_acc_drop`` (when set) by keeping the most sensitive convolutions / Linear layers float."""
    _require_layers(model, STATIC_TYPES, "quant_static", "convolution and Linear")
    inputs = _calibration_inputs(context, calibration_batches, "quant_static")
    build = functools.partial(_post_training, model, inputs, context.input_shape, per_channel, engine, "quant_static")
    quantized, done = build([])
    search = None
    if _budget_applies(max_acc_drop, context):
        layers = _candidates(model, STATIC_TYPES)
        search = _search(quantized, lambda keep: build(keep)[0], layers, context, max_acc_drop, "quant_static")
    details = _details(search.candidate if search is not None else quantized, done, engine, per_channel, inputs)
    return _compressed("quant_static", search, quantized, details, engine)


@checked
def qat(
    model: nn.Module,
    context: Context,
    *,
    calibration_batches: Count,
    per_channel: bool,
    engine: Engine,
    max_acc_drop: AccuracyDrop | None,
) -> Compressed:
    """Quantization-aware fine-tuning with the distillation loss, then conversion to int8; with
    ``max_acc_drop`` set, the layers a post-training search keeps float stay float throughout,
    and the budget is checked after the fine-tuning."""
    if context.finetune is None or context.finetune_epochs < 1:
        raise ConfigError(
            f"finetune_epochs={context.finetune_epochs} is not allowed: an integer >= 1: "
            "quantization-aware training needs epochs"
        )
    _require_layers(model, STATIC_TYPES, "qat", "convolution and Linear")
    inputs = _calibration_inputs(context, calibration_batches, "qat")
    search = None
    if _budget_applies(max_acc_drop, context):
        build = functools.partial(_post_training, model, inputs, context.input_shape, per_channel, engine, "qat")
        layers = _candidates(model, STATIC_TYPES)
        search = _search(build([])[0], lambda keep: build(keep)[0], layers, context, max_acc_drop, "qat")
    float_layers = search.float_layers if search is not None else []
    prepared, done = BACKEND.prepare(
        _float_copy(model),
        _example(context.input_shape),
        engine,
        per_channel,
        qat=True,
        method="qat",
        keep_float=float_layers,
    )
    _calibrate(prepared, inputs)
    quantized = _fine_tune_and_convert(prepared, context, engine)
    extra: dict[str, Any] = {
        "finetune_epochs": context.finetune_epochs,
        "frozen_last_epoch": context.finetune_epochs >= 2,
    }
    if search is not None:
        extra["ptq_val_acc"] = round(search.val_acc, 6)
        search = dataclasses.replace(search, candidate=quantized, val_acc=val_accuracy(quantized, context))
        if not search.within_budget:
            log.warning(
                "qat: %.4f validation accuracy after fine-tuning with %d float layers misses max_acc_drop=%g "
                "(reference %.4f)",
                search.val_acc,
                len(float_layers),
                search.max_acc_drop,
                search.reference,
            )
    details = {**_details(quantized, done, engine, per_channel, inputs), **extra}
    return _compressed("qat", search, quantized, details, engine)


def _fine_tune_and_convert(prepared: nn.Module, context: Context, engine: str) -> nn.Module:
    """Fine-tune the fake-quantized ``prepared`` with ``context.finetune``, freezing the ranges
    and BatchNorm statistics at the start of the last epoch (when there are two or more), and
    convert it to int8."""
    epochs = context.finetune_epochs
    started = [0]

    def on_epoch_start(epoch: int) -> None:
        started[0] += 1
        if epochs >= 2 and started[0] == epochs:  # the last epoch: freeze ranges and BN statistics
            prepared.apply(tq.disable_observer)
            prepared.apply(intrinsic_qat.freeze_bn_stats)

    prepared.train()
    for parameter in prepared.parameters():  # a frozen teacher (target: teacher) comes without gradients
        parameter.requires_grad_(True)
    context.finetune(prepared, epochs, on_epoch_start=on_epoch_start)
    return BACKEND.convert(prepared, engine)


def _details(
    quantized: nn.Module, done: Preparation, engine: str, per_channel: bool, inputs: Sequence[Tensor]
) -> dict[str, Any]:
    layers = int8_layers(quantized)
    return {
        "engine": engine,
        "per_channel": per_channel,
        "calibration_batches": len(inputs),
        "calibration_samples": sum(len(x) for x in inputs),
        "int8_layers": len(layers),
        "layers": layers,
        "fused": ["+".join(group) for group in done.fused],
        "functional_ops": done.functional_ops,
        "untraced": done.untraced,
    }


# -- reloading -----------------------------------------------------------------------------------
def load_dynamic(path: Any, model: nn.Module) -> nn.Module:
    """The int8 model saved by ``dynamic``, given a freshly built float ``model`` of the same
    architecture; the float layers named in the file stay float."""
    state, float_layers = _read(path)
    engine = _dynamic_engine()
    return _load_state(BACKEND.dynamic(_float_copy(model), engine, float_layers), state, engine)


def load_static(
    path: Any, model: nn.Module, input_shape: Sequence[int], per_channel: bool = True, engine: str = "x86"
) -> nn.Module:
    """The int8 model saved by ``static``: same fusion, float layers, stubs and conversion, then the saved state."""
    return _load_prepared(path, model, input_shape, per_channel, engine, qat=False)


def load_qat(
    path: Any, model: nn.Module, input_shape: Sequence[int], per_channel: bool = True, engine: str = "x86"
) -> nn.Module:
    """The int8 model saved by ``qat``: same fusion, float layers, stubs, prepare_qat and conversion,
    then the saved state."""
    return _load_prepared(path, model, input_shape, per_channel, engine, qat=True)


def _load_prepared(
    path: Any, model: nn.Module, input_shape: Sequence[int], per_channel: bool, engine: str, qat: bool
) -> nn.Module:
    state, float_layers = _read(path)
    example = _example(input_shape)
    method = "qat" if qat else "quant_static"
    prepared, _ = BACKEND.prepare(
        _float_copy(model), example, engine, per_channel, qat=qat, method=method, keep_float=float_layers
    )
    prepared.eval()
    with quiet_deprecations(), torch.no_grad():
        prepared(example)  # gives the observers a range; the saved scales replace it
    return _load_state(BACKEND.convert(prepared, engine), state, engine)


def load(
    path: Any,
    model: nn.Module,
    method: str,
    input_shape: Sequence[int] | None = None,
    per_channel: bool = True,
    engine: str = "x86",
) -> nn.Module:
    """``load_dynamic`` / ``load_static`` / ``load_qat`` by method name."""
    if method == "quant_dynamic":
        return load_dynamic(path, model)
    if method not in ("quant_static", "qat"):
        raise ConfigError(f"method={method}: not a quantization method; one of quant_dynamic, quant_static, qat")
    if input_shape is None:
        raise ConfigError(f"input_shape: {method} needs the model's input shape to rebuild the int8 model")
    loader = load_static if method == "quant_static" else load_qat
    return loader(path, model, input_shape, per_channel=per_channel, engine=engine)
