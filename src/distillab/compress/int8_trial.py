"""The trial run: refuse, in one line, what an int8 model cannot compute.

A forward that ``fx_rewrite`` could not trace may still do something the int8 model cannot run
(``+`` on int8 tensors, a concatenation of tensors with different scales, an operation without an
int8 kernel). :func:`check_int8_runs` converts a copy of the prepared model and runs it once, so
that the quantizer stops with a ``ConfigError`` naming the module instead of producing a wrong model.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from distillab.compress import torch_ao
from distillab.compress.fx_rewrite import CATS
from distillab.settings import ConfigError


class _Unsupported(Exception):
    """An operation the int8 model would run wrongly (see ``_CatGuard``)."""


class _CatGuard(TorchFunctionMode):
    """``torch.cat`` of int8 tensors keeps the first one's scale and clips the others: refuse it
    (rewritten concatenations use ``FloatFunctional.cat``, which requantizes)."""

    def __torch_function__(self, func: Callable, types: Any, args: Sequence = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in CATS or func is torch.stack:
            parts = args[0] if args else kwargs.get("tensors", ())
            quantized = [t for t in parts if isinstance(t, Tensor) and t.is_quantized]
            if quantized and (
                len(quantized) < len(parts) or len({(t.q_scale(), t.q_zero_point()) for t in quantized}) > 1
            ):
                raise _Unsupported(f"torch.{func.__name__} of int8 tensors with different scales")
        return func(*args, **kwargs)


def check_int8_runs(prepared: nn.Module, example: Tensor, engine: str, arch: str, method: str) -> None:
    """Convert a copy of ``prepared`` and run it once; a ``ConfigError`` naming the module if
    it uses an operation the int8 model cannot run."""
    trial = copy.deepcopy(prepared).eval()
    with torch_ao.quiet_deprecations(), torch.no_grad():
        trial(example)
    trial = torch_ao.convert(trial, engine)
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
        with torch_ao.quiet_deprecations(), torch.no_grad(), _CatGuard():
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
