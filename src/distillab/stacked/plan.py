"""Which jobs of a sweep can train together, and why the others cannot.

Two jobs stack when their configurations are the same except in values that only change the
numbers a student trains with, not its shape or its schedule: ``seed`` (its initial weights and
batch order), the optimizer's ``lr`` and ``weight_decay``, and the numeric settings of the
distillation method (``distill.lam``, ``distill.temperature``, any method's weights). Everything
else (data and split, teacher, student architecture, method, epochs, batch size, schedule) must
be equal; ``paths``, ``logger``, ``callbacks`` and ``rerun`` do not count, as for the config hash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from distillab.results import NOT_HASHED

#: the optimizer's keys that may differ within a group
OPTIMIZER_KEYS = ("lr", "weight_decay")
#: the trainer keys of a stacked fit and the values it implements; anything else runs unstacked
TRAINER_VALUES: dict[str, tuple[Any, ...]] = {
    "devices": (1, "1", "auto"),
    "num_nodes": (1,),
    "strategy": ("auto",),
    "precision": ("32", "32-true", 32),
    "max_steps": (-1,),
    "max_time": (None,),
    "limit_train_batches": (None, 1.0),
    "limit_val_batches": (None, 1.0),
    "check_val_every_n_epoch": (1,),
    "val_check_interval": (None,),
    "accumulate_grad_batches": (1,),
    "gradient_clip_val": (None, 0, 0.0),
    "fast_dev_run": (False, 0),
}
#: callbacks that only show progress; any other callback acts per job and is not stacked
DISPLAY_CALLBACKS = ("EpochProgressBar",)


def stacking_key(cfg: DictConfig) -> str:
    """What a job's group shares: its resolved config without the stackable values."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in (*NOT_HASHED, "seed"):
        container.pop(key, None)
    container.get("trainer", {}).pop("enable_progress_bar", None)
    optimizer = container.get("optim", {}).get("optimizer", {})
    for key in OPTIMIZER_KEYS:
        optimizer.pop(key, None)
    distill = container.get("distill") or {}
    for key in [k for k, v in distill.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]:
        distill.pop(key)
    blob = json.dumps(container, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def groups(keys: Sequence[str], max_stack: int) -> list[list[int]]:
    """Job positions grouped by stacking key, in the order of each group's first job, each group
    split into chunks of at most ``max_stack`` jobs."""
    by_key: dict[str, list[int]] = {}
    for position, key in enumerate(keys):
        by_key.setdefault(key, []).append(position)
    return [members[i : i + max_stack] for members in by_key.values() for i in range(0, len(members), max_stack)]


def why_not_trainer(trainer: DictConfig, callbacks: DictConfig | None) -> str | None:
    """None when the stacked fit implements the ``trainer`` and ``callbacks`` nodes, else why not."""
    for key, allowed in TRAINER_VALUES.items():
        value = trainer.get(key)
        if key in trainer and value not in allowed:
            return f"trainer.{key}={value} (a stacked fit takes {', '.join(map(str, allowed))})"
    for name, conf in (callbacks or {}).items():
        if conf is not None and not str(conf.get("_target_", "")).endswith(DISPLAY_CALLBACKS):
            return f"callbacks.{name} acts on each job's own fit"
    return None


def differing(configs: Sequence[DictConfig]) -> list[str]:
    """The stackable keys whose values differ between ``configs`` (for the log)."""
    keys = ["seed", *(f"optim.optimizer.{k}" for k in OPTIMIZER_KEYS)]
    keys += [f"distill.{k}" for k, v in configs[0].distill.items() if isinstance(v, (int, float))]
    return [key for key in keys if len({str(OmegaConf.select(c, key)) for c in configs}) > 1]
