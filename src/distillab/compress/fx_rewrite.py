"""Preparing a model for eager int8, with torch.fx: the sequences to fuse, and tensor arithmetic
rewritten into calls that can be quantized.

Each module that ``forward`` runs is traced, with its children kept as calls. A conv (1d/2d/3d)
whose only consumer is its BatchNorm, optionally followed by a ReLU that is the BatchNorm's only
consumer, is fusable, as are conv-ReLU and Linear-ReLU, when each module of the group is called
once per forward. Every addition or multiplication of two tensors or of a tensor and a number, and
every concatenation, becomes a call of its own ``FloatFunctional`` (``q_add_0``, ``q_mul_0``,
``q_cat_0``...), and the module is replaced by its traced ``GraphModule``. A forward that does not
trace is left as it is (``Preparation.untraced``). docs/compression.md says what this gives for the
built-in models.
"""

from __future__ import annotations

import copy
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.ao.nn.quantized import FloatFunctional


@dataclass
class Preparation:
    """What preparing a model for int8 did to it, for ``Compressed.details``."""

    fused: list[list[str]] = field(default_factory=list)
    functional_ops: list[str] = field(default_factory=list)
    untraced: list[str] = field(default_factory=list)


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
CATS = {torch.cat, torch.concat, torch.concatenate}
_METHODS = {"add": "add", "add_": "add", "mul": "mul", "mul_": "mul"}


def _functional_call(node: fx.Node, tensors: set[fx.Node]) -> tuple[str, tuple, dict] | None:
    """``(FloatFunctional method, args, kwargs)`` replacing ``node``, or None to leave it."""
    if node.op == "call_function" and node.target in CATS:
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


def rewrite_and_find_fusions(model: nn.Module, example: Tensor) -> tuple[nn.Module, Preparation]:
    """Find the fusable sequences of ``model`` and rewrite its tensor arithmetic into
    ``FloatFunctional`` calls (see the module's docstring). Returns the model (a new object only
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
