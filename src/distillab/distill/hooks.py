"""Intermediate features by module path, captured with forward hooks.

A path names a submodule as ``model.named_modules()`` does (``layer2``, ``stages.1``,
``layer3.2.act``); the feature is that module's output. A ``:in`` suffix takes the module's
(first) input instead: ``fc:in`` is the penultimate embedding, ``layer3.2.act:in`` the
pre-activation sum of a CIFAR ResNet block. Models are used untouched, so any zoo,
torchvision or timm model can be a teacher or a student.

When a method's layers are not given, ``default_paths`` picks them from the model's
structure: the stage outputs (``layer1``… of ResNets and WRNs, ``stages.i`` of the CNN and
MobileNetV2, ``block0``… of VGG, timm's ``feature_info``, the hidden activations of an MLP)
or the embedding (the input of the last linear layer).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from torch import Tensor, nn

from distillab.settings import ConfigError

INPUT_SUFFIX = ":in"


def split_path(path: str) -> tuple[str, bool]:
    """``"fc:in"`` → ``("fc", True)``; ``"layer1"`` → ``("layer1", False)``."""
    if path.endswith(INPUT_SUFFIX):
        return path[: -len(INPUT_SUFFIX)], True
    return path, False


def resolve(model: nn.Module, path: str, key: str) -> nn.Module:
    """The submodule at ``path`` (``:in`` allowed); a wrong path fails with the paths near it."""
    name, _ = split_path(path)
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name]
    paths = [p for p in modules if p]
    near = difflib.get_close_matches(name, paths, n=6, cutoff=0.4) or _top_level(model)
    raise ConfigError(
        f"{key}={path!r} is not a module of {type(model).__name__}; paths near it: {', '.join(near)} "
        f"({len(paths)} modules in all; append {INPUT_SUFFIX} for a module's input)"
    )


def _top_level(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_children()]


class FeatureTaps:
    """Keeps the output (or input) of the modules at ``paths`` from the latest forward pass.

    ``take()`` returns the features of the last forward pass in the order of ``paths`` and
    forgets them, so no step holds on to another step's activations.
    """

    def __init__(self, model: nn.Module, paths: Sequence[str], key: str = "distill") -> None:
        self.paths = list(paths)
        self._features: list[Tensor | None] = [None] * len(self.paths)
        self._handles = []
        for i, path in enumerate(self.paths):
            module = resolve(model, path, key)
            _, use_input = split_path(path)
            if use_input:
                self._handles.append(module.register_forward_pre_hook(self._keep_input(i)))
            else:
                self._handles.append(module.register_forward_hook(self._keep_output(i)))

    def _keep_output(self, i: int):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            self._features[i] = output

        return hook

    def _keep_input(self, i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            self._features[i] = args[0]

        return hook

    def take(self) -> list[Tensor]:
        features, self._features = self._features, [None] * len(self.paths)
        missing = [path for path, feature in zip(self.paths, features) if feature is None]
        if missing:
            raise RuntimeError(f"no feature was captured at {missing}: the forward pass did not reach them")
        return features  # type: ignore[return-value]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# -- default layers -------------------------------------------------------------------------------
def stage_paths(model: nn.Module) -> list[str]:
    """The outputs of the model's stages, from the input side; [] when none are recognised."""
    info = getattr(model, "feature_info", None)
    if info is not None and hasattr(info, "module_name"):  # timm
        return [name for name in info.module_name() if name]
    children = dict(model.named_children())
    layers = sorted((n for n in children if n.startswith("layer") and n[5:].isdigit()), key=lambda n: int(n[5:]))
    if layers:  # CIFAR ResNets, WRNs, torchvision ResNets
        return layers
    blocks = sorted((n for n in children if n.startswith("block") and n[5:].isdigit()), key=lambda n: int(n[5:]))
    if blocks:  # VGG
        return blocks
    for name in ("stages", "features"):
        container = children.get(name)
        if isinstance(container, nn.Sequential):
            spatial = [
                f"{name}.{i}"
                for i, m in enumerate(container)
                if not isinstance(m, (nn.ReLU, nn.Dropout, nn.Flatten, nn.Linear))
            ]
            if name == "stages" or any(isinstance(m, nn.Conv2d) for m in container.modules()):
                return spatial
            # an MLP's hidden representations: the outputs of its activations
            return [f"{name}.{i}" for i, m in enumerate(container) if isinstance(m, nn.ReLU)]
    return []


def embedding_path(model: nn.Module) -> str | None:
    """The input of the model's last linear layer: the penultimate embedding."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    return f"{last}{INPUT_SUFFIX}" if last else None


def default_paths(model: nn.Module, which: str, key: str) -> list[str]:
    """The layers a method uses when none are configured.

    ``which``: ``stages`` (all stage outputs), ``middle`` (the middle stage, FitNet's hint
    layer), ``last`` (the last stage), ``embedding`` (input of the last linear layer).
    """
    if which == "embedding":
        path = embedding_path(model)
        if path is None:
            raise ConfigError(
                f"{key}: {type(model).__name__} has no linear layer to take the embedding from; "
                f"set {key} to a module path"
            )
        return [path]
    stages = stage_paths(model)
    if not stages:
        raise ConfigError(
            f"{key}: no stages recognised in {type(model).__name__}; set {key} to module paths "
            f"(top-level modules: {', '.join(_top_level(model))})"
        )
    if which == "stages":
        return stages
    if which == "middle":
        return [stages[len(stages) // 2]]
    if which == "last":
        return [stages[-1]]
    raise ValueError(f"unknown default layer choice {which!r}")


__all__ = ["FeatureTaps", "default_paths", "embedding_path", "resolve", "split_path", "stage_paths"]
