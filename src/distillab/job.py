"""What Hydra and the launcher tell a running job: its mode, overrides, choices and rank.

Outside Hydra (a config composed in a test or a notebook) each answer has a plain default:
a single run, no overrides, rank 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from distillab.conf import CONF_DIR


def hydra() -> Any:
    """The running job's Hydra node, or None outside Hydra."""
    return HydraConfig.get() if HydraConfig.initialized() else None


def is_multirun() -> bool:
    node = hydra()
    return node is not None and node.mode == RunMode.MULTIRUN


def overrides() -> list[str]:
    """The job's own overrides, as typed on the command line (``distill=kd``, ``seed=1``)."""
    node = hydra()
    return list(node.overrides.task) if node is not None else []


def choice(group: str) -> str | None:
    """The option chosen for a config group (``distill=kd`` → ``kd``); None outside Hydra."""
    node = hydra()
    chosen = node.runtime.choices.get(group) if node is not None else None
    return str(chosen) if chosen else None


def sweep_dir() -> Path | None:
    """The sweep's folder in a multirun, else None."""
    return Path(str(hydra().sweep.dir)) if is_multirun() else None


def config_dirs() -> list[Path]:
    """The folders of the config search path (``conf/`` and any ``--config-dir``)."""
    node = hydra()
    sources = node.runtime.config_sources if node is not None else []
    found = [Path(str(source.path)) for source in sources if source.schema == "file" and source.path]
    return found or [CONF_DIR]


def rank() -> int:
    """This process's rank in a distributed job (0 when there is none)."""
    from pytorch_lightning.utilities import rank_zero_only

    return int(rank_zero_only.rank)


def is_rank_zero() -> bool:
    return rank() == 0
