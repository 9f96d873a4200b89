"""Parts of a run built from their config nodes, with one-line errors.

A constructor that refuses a value (a ``ConfigError`` or ``ValueError`` from its declared
settings or its own cross-checks) becomes one line naming the key, as the up-front check does.
"""

from __future__ import annotations

from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from distillab.conf import MODEL_PROVIDED, ROLE_KEYS
from distillab.data.adapter import DataInfo
from distillab.settings import ConfigError, under


def part(key: str, node: DictConfig, **kwargs: Any) -> Any:
    """Instantiate ``node`` (the config at ``key``); a constructor's complaint becomes one line."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__ or error
        # one line, keeping what follows a first line that ends in ":" (an import's own error)
        message = " ".join(str(cause).split()) or type(cause).__name__
        if isinstance(cause, ConfigError) or under(key, message) != message:
            raise ConfigError(under(key, message)) from None
        raise ConfigError(f"{key}: {type(cause).__name__}: {message}") from None


def model(role: str, node: DictConfig, info: DataInfo) -> nn.Module:
    """The architecture of a teacher or student node, for the data's input shape and class count."""
    arch = OmegaConf.create({k: node._get_node(k) for k in node.keys() if k not in ROLE_KEYS[role]})
    return part(role, arch, **dict(zip(MODEL_PROVIDED, (info.input_shape, info.num_classes))))


def teacher(node: DictConfig, info: DataInfo) -> nn.Module:
    """An untrained teacher. Its initial weights depend on its own seed, never on the run's: the cache
    key leaves the run seed out, so whichever sweep job trains it must get the same teacher."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(node.recipe.seed))
        return model("teacher", node, info)
