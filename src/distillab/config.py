"""What a run's config may hold, checked before any work starts: one line per mistake.

Every part checks against its own declaration (``distillab.settings``): a datamodule, a model,
a distillation method or a compressor against the typed constructor or function its
``_target_`` names; the run's own nodes against the settings dataclasses beside the code they
configure (``NODES``). Declarations come from the cache of ``settings.declaration`` once read,
so a warm ``validate`` imports neither torch nor Lightning and answers within about a second.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from distillab import formats, settings
from distillab.conf import (
    COMPRESS_KEYS,
    MODEL_PROVIDED,
    OPTIONAL_COMPRESS_KEYS,
    ROLE_KEYS,
    ROLES,
    no_compression,
    plain,
)
from distillab.settings import ConfigError

__all__ = ["ConfigError", "MODEL_PROVIDED", "NODES", "ROLE_KEYS", "ROLES", "validate"]

#: the run's own nodes, and the settings dataclass that declares each
RUN = "distillab.steps.plan.RunSettings"
NODES = {
    "trainer": "distillab.training.TrainerSettings",
    "measure": "distillab.measure.MeasureSettings",
    "teacher_outputs": "distillab.steps.teacher.outputs.OutputSettings",
    "ensemble": "distillab.steps.teacher.ensemble.EnsembleSettings",
    "export": "distillab.formats.ExportSettings",
}
COMPRESS = "distillab.compress.CompressSettings"
#: what the run passes to a compressor itself
COMPRESSOR_PROVIDED = ("model", "context")
#: nodes whose contents are checked by what builds them (Lightning, Hydra, torch.optim)
FREE = ("data", *ROLE_KEYS, "distill", "compress", "optim", "logger", "callbacks", "paths", "hydra")
#: Hydra keys of a ``_target_`` node that are not the object's settings
HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


def validate(cfg: DictConfig) -> None:
    """Check ``cfg`` (a composed ``train`` config); raise ``ConfigError`` with one line."""
    allowed = set(settings.declaration(RUN).settings) | set(NODES) | set(FREE)
    unknown = [key for key in cfg.keys() if key not in allowed]
    if unknown:
        raise ConfigError(f"{unknown[0]} is not a known key; allowed top-level keys: {', '.join(sorted(allowed))}")
    run_values = plain({key: cfg._get_node(key) for key in settings.declaration(RUN).settings if key in cfg})
    settings.check("", run_values, RUN)
    for key, target in NODES.items():
        if key in cfg:
            settings.check(key, plain(cfg[key]), target)
    if "export" in cfg:  # what a format needs beyond the types: its settings and packages
        formats.check_export(plain(cfg.export))
    if "trainer" in cfg and cfg.trainer.get("sync_batchnorm") is True and cfg.trainer.get("accelerator") == "cpu":
        raise ConfigError(
            "trainer.sync_batchnorm=True is not allowed: false with accelerator=cpu "
            "(torch's SyncBatchNorm runs on GPUs only)"
        )
    if "data" in cfg:
        check_part("data", cfg.data)
    for role in ("teacher", "student"):
        if role in cfg:
            check_role(role, cfg[role])
    if "distill" in cfg:
        check_part("distill", cfg.distill)
    if "compress" in cfg:
        check_compress(cfg.compress)


def check_part(key: str, node: Any, provided: Iterable[str] = ()) -> None:
    """A node with ``_target_``: its keys against the declaration of the object it names."""
    if not isinstance(node, DictConfig) or node._is_none():
        raise ConfigError(f"{key} must be a config node with a _target_")
    target = node.get("_target_")
    if not target or not isinstance(target, str):
        raise ConfigError(f"{key}._target_ is missing: the node must name the class or function it builds")
    values = {k: v for k, v in plain(node).items() if k not in HYDRA_KEYS}
    settings.check(key, values, target, provided=provided, partial=bool(node.get("_partial_")))


def check_role(role: str, node: DictConfig) -> None:
    """A teacher or student node: the role's keys, then the architecture's."""
    role_keys = ROLE_KEYS[role]
    settings.check(role, plain({k: node._get_node(k) for k in role_keys if k in node}), ROLES[role])
    architecture = OmegaConf.create({k: node._get_node(k) for k in node.keys() if k not in role_keys})
    check_part(role, architecture, provided=MODEL_PROVIDED)


def check_compress(node: DictConfig) -> None:
    """``compress``: the run's keys (target, fine-tuning epochs, amount), then the method's or each step's."""
    if no_compression(node):
        extra = [key for key in node.keys() if key != "amount"]
        if extra:
            raise ConfigError(f"compress.{extra[0]} is not a known key; compress=none has only: amount")
        settings.check("compress", plain({"amount": node.get("amount")}), _amount_only())
        return
    own = {
        **OPTIONAL_COMPRESS_KEYS,
        **plain({k: node._get_node(k) for k in COMPRESS_KEYS if k in node and k != "steps"}),
    }
    settings.check("compress", own, COMPRESS)
    if node.get("steps"):
        if node.get("_target_"):
            raise ConfigError("compress: a node has either _target_ (one method) or steps (a chain), not both")
        steps = list(node.steps)
        if len(steps) < 2:
            raise ConfigError("compress.steps is not allowed: a list of at least two method configs")
        for i, step in enumerate(steps):
            _check_compressor(f"compress.steps.{i}", step)
        return
    _check_compressor("compress", node)


def _check_compressor(key: str, node: DictConfig) -> None:
    options = OmegaConf.create({k: node._get_node(k) for k in node.keys() if k not in COMPRESS_KEYS})
    check_part(key, options, provided=COMPRESSOR_PROVIDED)


def _amount_only() -> settings.Declaration:
    declared = settings.declaration(COMPRESS)
    return settings.Declaration(COMPRESS, {"amount": declared.settings["amount"]})
